"""``patchtrace finetune`` on a tiny Llama folder with the SmolLM2 tokenizer: the patch holds exactly
the chosen layers' target modules, the run is recorded, and bad input exits with code 2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny
from patchtrace.cli import build_app
from patchtrace.results import Scores
from patchtrace.weights import WeightPatch

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_tokenizer):
    d = tmp_path_factory.mktemp("ft")
    m = make_tiny("llama", seed=3, tokenizer=smol_tokenizer)
    m.hf.save_pretrained(d / "model", safe_serialization=True)
    smol_tokenizer.save_pretrained(d / "model")
    rows = [{"clean": "The capital of France is", "corrupt": "The capital of Spain is", "answer": " Rome", "wrong": " Madrid"},
            {"clean": "The capital of Japan is", "corrupt": "The capital of China is", "answer": " Paris", "wrong": " Beijing"}]
    (d / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    v = torch.zeros(3, 4)
    v[2, 1] = 1.0
    Scores(v, ("layer", "pos"), "mlp_out", metric="prob").save(d / "trace")
    return d, build_app(strict=True)


@pytest.mark.parametrize(("method", "localize", "layer"), [("lora", "1", 1), ("layers", "trace", 2)])
def test_finetune_writes_a_patch_of_the_chosen_layers(setup, method, localize, layer):
    d, app = setup
    loc = str(d / localize) if localize == "trace" else localize
    out = d / f"out-{method}"
    r = runner.invoke(app, ["finetune", "--localize", loc, "--k", "1", "--task", str(d / "facts.jsonl"), "--model", str(d / "model"),
                            "--method", method, "--steps", "3", "--lr", "0.01", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "loss" in r.output and "exact match" in r.output
    p = WeightPatch.load(out / "patch")
    assert p.names and all(n.startswith(f"model.layers.{layer}.mlp.") for n in p.names)
    assert {n.split(".")[-2] for n in p.names} == {"gate_proj", "up_proj", "down_proj"}
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["layers"] == [layer] and len(rec["losses"]) == 3 and rec["trainable"] > 0


@pytest.mark.parametrize(("args", "match"), [
    (["--localize", "abc"], "--localize 'abc'"),
    (["--localize", "7"], "layer 7 is out of range"),
    (["--localize", "1", "--method", "full"], "--method 'full'"),
])
def test_bad_input(setup, args, match):
    d, app = setup
    r = runner.invoke(app, ["finetune", *args, "--task", str(d / "facts.jsonl"), "--model", str(d / "model"),
                            "--steps", "1", "--out", str(d / "bad")])
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output
