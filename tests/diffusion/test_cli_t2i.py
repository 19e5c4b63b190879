"""The t2i command group: help lists the commands; bad input is one red line naming it, exit code 2."""

from __future__ import annotations

from typer.testing import CliRunner

from patchtrace.cli import build_app


def test_t2i_help_lists_commands():
    r = CliRunner().invoke(build_app(), ["t2i", "--help"])
    assert r.exit_code == 0
    for cmd in ("info", "localize", "edit", "trace-text"):
        assert cmd in r.output


def test_attribute_without_classifier_is_refused(tmp_path):
    r = CliRunner().invoke(build_app(), ["t2i", "localize", "--attribute", "size", "--value", "big", "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert "no classifier for attribute 'size'" in r.output
    r = CliRunner().invoke(build_app(), ["t2i", "localize", "--attribute", "color", "--value", "purple", "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert "has no value 'purple'" in r.output
    assert not (tmp_path / "scores").exists()


def test_info_lists_the_small_models_layers():
    r = CliRunner().invoke(build_app(), ["t2i", "info"])
    assert r.exit_code == 0, r.output
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn2" in r.output
    assert len([line for line in r.output.splitlines() if "attn2" in line]) == 7


def test_tampered_weights_are_refused(tmp_path):
    import shutil

    import pytest

    from patchtrace.diffusion.small.pipeline import build_small
    from patchtrace.diffusion.small.train import WEIGHTS_DIR
    from patchtrace.errors import PatchtraceError

    for f in ("small_t2i.safetensors", "small_t2i.json"):
        shutil.copy(WEIGHTS_DIR / f, tmp_path / f)
    data = bytearray((tmp_path / "small_t2i.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "small_t2i.safetensors").write_bytes(bytes(data))
    with pytest.raises(PatchtraceError, match="does not match the sha256"):
        build_small(tmp_path / "small_t2i.safetensors")
