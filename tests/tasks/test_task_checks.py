"""Degenerate tasks are refused, and the scored token is said (issue: silent wrong results, item 6)."""

from __future__ import annotations

import warnings

import pytest
import torch

from patchtrace.metrics import BaselineWarning, warn_zero_gap
from patchtrace.tasks.base import Example, Task, TaskError, TaskWarning

IOI = ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to")


def test_answer_equal_to_wrong_is_refused_naming_the_example(smol_tokenizer):
    t = Task("t", [Example(*IOI, " Mary", " John"), Example(*IOI, " Mary", " Mary")])
    with pytest.raises(TaskError, match=r"example\(s\) 1 score the same token"):
        t.tokenize(smol_tokenizer)


def test_identical_prompts_are_refused_naming_the_example(smol_tokenizer):
    t = Task("t", [Example(IOI[0], IOI[0], " Mary", " John")])
    with pytest.raises(TaskError, match=r"example\(s\) 0 have identical clean and corrupt"):
        t.tokenize(smol_tokenizer)


def test_degenerate_allowed_only_with_the_flag_and_a_warning(smol_tokenizer):
    t = Task("t", [Example(IOI[0], IOI[0], " Mary", " John")])
    with pytest.warns(TaskWarning, match="identical clean and corrupt"):
        tok = t.tokenize(smol_tokenizer, allow_degenerate=True)
    assert len(tok) == 1


def test_missing_leading_space_warns_with_both_tokens(smol_tokenizer):
    t = Task("t", [Example("The capital of France is", "The capital of Italy is", "Paris", "Rome")])
    with pytest.warns(TaskWarning, match=r"example 0 scores 'Paris'.*continue with '␣Paris'"):
        tok = t.tokenize(smol_tokenizer)
    assert tok.scored_tokens(smol_tokenizer, 0) == (["Paris"], ["Rome"])
    good = Task("t", [Example("The capital of France is", "The capital of Italy is", " Paris", " Rome")])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskWarning)
        good.tokenize(smol_tokenizer)  # no warning when the space is there


def test_zero_gap_warning_names_the_examples():
    with pytest.warns(BaselineWarning, match=r"example\(s\) 1, 3 have a zero baseline gap"):
        bad = warn_zero_gap(torch.tensor([1.0, 2.0, 0.5, 4.0]), torch.tensor([0.0, 2.0, 0.0, 4.0]))
    assert bad == [1, 3]


def test_cli_refuses_degenerate_file_and_prints_the_scored_tokens(tmp_path, smol_tokenizer):
    import json

    from typer.testing import CliRunner

    from conftest import make_tiny
    from patchtrace.cli import build_app

    d = tmp_path / "m"
    model = make_tiny("llama", seed=5, tokenizer=smol_tokenizer)
    model.hf.save_pretrained(d, safe_serialization=True)
    smol_tokenizer.save_pretrained(d)
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"clean": IOI[0], "corrupt": IOI[1], "answer": " Mary", "wrong": " Mary"}) + "\n")
    app = build_app()
    r = CliRunner().invoke(app, ["patch", "--model", str(d), "--task", str(f), "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 2 and "example(s) 0 score the same token" in r.output and "Traceback" not in r.output
    f.write_text(json.dumps({"clean": IOI[0], "corrupt": IOI[1], "answer": "Mary", "wrong": "John"}) + "\n")
    r = CliRunner().invoke(app, ["patch", "--model", str(d), "--task", str(f), "--sites", "resid_pre", "--layers",
                                 "0", "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    assert "scoring (example 0): answer 'Mary' vs wrong 'John'" in r.output
    assert "warning:" in r.output and "leading space" in r.output
