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
