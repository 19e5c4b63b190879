"""Checkpoints are checked, locked and never mixed with another run (issue: silent wrong results, 3-5).

A damaged block (edited floats in a well-formed file, a truncated file) or manifest is recomputed
with a warning and the result equals an uninterrupted run's; a second run into a held folder is
refused; a finished folder of a different run is refused unless overwriting, and stale per-kind
results are cleared.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from patchtrace.engine.checkpoint import Checkpoint, CheckpointError, CheckpointWarning, FolderLock
from patchtrace.methods.activation_patching import PatchingConfig, run
from patchtrace.results import Scores
from patchtrace.sites import SiteSpec
from patchtrace.tasks import make_task

SPEC = SiteSpec("head", per_unit=True, positions=[0, -1])
CFG = PatchingConfig(block_rows=8, sanity_check=False)  # 2 examples → 4 cells per block


@pytest.fixture(scope="module")
def llama(smol_tokenizer):
    from conftest import make_tiny

    return make_tiny("llama", seed=4, tokenizer=smol_tokenizer)


@pytest.fixture(scope="module")
def tok(llama):
    return make_task("ioi", n=2, seed=2).tokenize(llama.tokenizer)


@pytest.fixture(scope="module")
def truth(llama, tok):
    return run(llama, tok, SPEC, CFG)


def _seed_partial(llama, tok, out: Path) -> list[Path]:
    """A .partial with 3 finished blocks of the SPEC run, written through the real Checkpoint."""
    saved: dict[int, dict] = {}
    orig = Checkpoint.save

    def spy(self, block, tensors):
        saved[block] = {k: v.clone() for k, v in tensors.items()}
        orig(self, block, tensors)
        if len(saved) == 3:
            raise KeyboardInterrupt  # stop the sweep as Ctrl-C would

    Checkpoint.save = spy  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            run(llama, tok, SPEC, CFG, out_dir=out)
    finally:
        Checkpoint.save = orig  # type: ignore[method-assign]
    blocks = sorted((out / ".partial").glob("block-*.safetensors"))
    assert len(blocks) == 3
    return blocks


def test_resume_equals_uninterrupted(llama, tok, truth, tmp_path):
    _seed_partial(llama, tok, tmp_path / "o")
    s = run(llama, tok, SPEC, CFG, out_dir=tmp_path / "o")
    torch.testing.assert_close(s.values, truth.values, atol=0, rtol=0)


def test_tampered_block_is_recomputed_with_a_warning(llama, tok, truth, tmp_path):
    from safetensors.torch import load_file, save_file

    blocks = _seed_partial(llama, tok, tmp_path / "o")
    t = load_file(str(blocks[1]))
    save_file({k: torch.full_like(v, 128.18) for k, v in t.items()}, str(blocks[1]))  # well-formed, wrong
    with pytest.warns(CheckpointWarning, match=r"block-00001.*checksum"):
        s = run(llama, tok, SPEC, CFG, out_dir=tmp_path / "o")
    torch.testing.assert_close(s.values, truth.values, atol=0, rtol=0)


def test_truncated_block_is_recomputed_with_a_warning(llama, tok, truth, tmp_path):
    blocks = _seed_partial(llama, tok, tmp_path / "o")
    data = blocks[0].read_bytes()
    blocks[0].write_bytes(data[: len(data) // 2])
    with pytest.warns(CheckpointWarning, match="block-00000"):
        s = run(llama, tok, SPEC, CFG, out_dir=tmp_path / "o")
    torch.testing.assert_close(s.values, truth.values, atol=0, rtol=0)


@pytest.mark.parametrize("damage", ["{not json", '{"key": "x", "blocks": {}, "checksum": "0"}'])
def test_damaged_manifest_discards_and_recomputes(llama, tok, truth, tmp_path, damage):
    _seed_partial(llama, tok, tmp_path / "o")
    (tmp_path / "o" / ".partial" / "manifest.json").write_text(damage)
    with pytest.warns(CheckpointWarning, match="manifest.json is damaged"):
        s = run(llama, tok, SPEC, CFG, out_dir=tmp_path / "o")
    torch.testing.assert_close(s.values, truth.values, atol=0, rtol=0)


def test_a_held_folder_is_refused(tmp_path):
    with FolderLock(tmp_path):
        with pytest.raises(CheckpointError, match="in use by another patchtrace run"):
            Checkpoint(tmp_path, "k")
    Checkpoint(tmp_path, "k").close()  # free again once released


def test_a_folder_held_by_another_process_is_refused(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from patchtrace.engine.checkpoint import FolderLock
        lock = FolderLock({str(tmp_path)!r}).acquire()
        print("held", flush=True)
        time.sleep(30)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"pid {p.pid}"):
            Checkpoint(tmp_path, "k")
    finally:
        p.kill()
        p.wait()
    Checkpoint(tmp_path, "k").close()  # a killed holder leaves no lock behind


def test_a_finished_folder_of_another_run_is_refused(llama, tok, tmp_path):
    out = tmp_path / "o"
    run(llama, tok, SPEC, CFG, out_dir=out)
    other = make_task("ioi", n=2, seed=9).tokenize(llama.tokenizer)
    with pytest.raises(CheckpointError, match="different run"):
        run(llama, other, SPEC, CFG, out_dir=out)
    s = run(llama, other, SPEC, CFG, out_dir=out, overwrite=True)
    assert Scores.load(out).provenance["task"]["hash"] == other.task.hash() == s.provenance["task"]["hash"]
    run(llama, other, SPEC, CFG, out_dir=out)  # the same run again is fine
