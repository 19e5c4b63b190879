"""The multi-hop commands end to end on a tiny Llama saved to disk: results equal the library's, bad
input is one clean error line naming the item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny
from patchtrace.cli import build_app
from patchtrace.models.load import load_model
from patchtrace.multihop.backpatch import BackpatchConfig, backpatch
from patchtrace.multihop.queries import load_jsonl
from patchtrace.results import Scores

runner = CliRunner()
REC = [
    {"prompt": "The capital of the country where Lyon is located is", "target": "Paris", "aliases": ["Paris"],
     "entity": "Lyon", "bridge": "France", "relation": "capital", "hop1_ok": True, "hop2_ok": True},
    {"prompt": "The country where Osaka is located is on the continent of", "target": "Asia", "aliases": [],
     "entity": "Osaka", "bridge": "Japan", "relation": "continent", "hop1_ok": True, "hop2_ok": False},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama-mh")
    make_tiny("llama", seed=5, tokenizer=smol_tokenizer).hf.save_pretrained(d, safe_serialization=True)
    smol_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def qfile(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("q") / "q.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in REC))
    return p


def invoke(*args):
    return runner.invoke(build_app(strict=True), [str(a) for a in args])


def test_backpatch_command_equals_library(tiny_dir, qfile, tmp_path):
    res = invoke("backpatch", "--model", tiny_dir, "--queries", qfile, "--max-new", "2", "--out", tmp_path / "bp", "-q")
    assert res.exit_code == 0, res.output
    assert "fix rate" in res.output and (tmp_path / "bp" / "success.png").is_file()
    got = Scores.load(tmp_path / "bp")
    ref = backpatch(load_model(str(tiny_dir)), load_jsonl(qfile), BackpatchConfig(generate=False))
    torch.testing.assert_close(got.per_example, ref.per_example, atol=1e-5, rtol=0)


def test_other_commands_run(tiny_dir, qfile, tmp_path):
    res = invoke("ablate", "--model", tiny_dir, "--queries", qfile, "--group", "head[0].h1,mlp_out[2]", "--max-new", "2", "--out",
                 tmp_path / "ab", "-q")
    assert res.exit_code == 0, res.output
    assert Scores.load(tmp_path / "ab").axes == ("group",)
    res = invoke("bridge", "--model", tiny_dir, "--queries", qfile, "--max-new", "2", "--out", tmp_path / "br")
    assert res.exit_code == 0, res.output
    res = invoke("xpatch", "--model", tiny_dir, "--source", "Lyon is in France", "--target", "Syria: Syria; x",
                 "--write", "resid_post[2]@1->resid_post[0]@-1", "--max-new", "2")
    assert res.exit_code == 0 and "generated" in res.output, res.output


def test_bad_input_is_one_clean_line(tiny_dir, qfile, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "target": "b"}) + "\n")
    res = invoke("backpatch", "--model", tiny_dir, "--queries", bad, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "bad.jsonl:1" in res.output and "aliases" in res.output, res.output
    res = invoke("xpatch", "--model", tiny_dir, "--source", "Lyon", "--target", "Syria: Syria; x",
                 "--write", "resid_post[2]@7->resid_post[0]@-1")
    assert res.exit_code == 2 and "position 7" in res.output, res.output
    res = invoke("backpatch", "--model", tiny_dir, "--queries", qfile, "--position", "middle", "--out", tmp_path / "y")
    assert res.exit_code == 2 and "position" in res.output, res.output
