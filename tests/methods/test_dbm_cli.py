"""``patchtrace mask`` end to end on a tiny Llama saved to disk; the saved mask is checked against the
library's exact evaluation of the kept sites on an independently loaded copy of the model, and the
mask folder is shown and reported by ``patchtrace show`` / ``patchtrace report``."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny
from patchtrace import load_model
from patchtrace.cli import build_app
from patchtrace.desiderata import Desideratum, Triple, load_desiderata, save_desiderata, tokenize_desiderata
from patchtrace.methods import dbm

runner = CliRunner()
WORDS = "the cat sat on a mat while dogs ran far away from big red houses near old green trees".split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama-dbm")
    model = make_tiny("llama", seed=5, tokenizer=smol_tokenizer)
    model.hf.save_pretrained(d, safe_serialization=True)
    smol_tokenizer.save_pretrained(d)
    return d


def _desiderata(path: Path) -> Path:
    rng = random.Random(0)
    trip = []
    for _ in range(8):
        a = rng.choices(WORDS, k=6)
        b = list(a)
        b[rng.randrange(6)] = rng.choice(WORDS)
        trip.append(Triple(" ".join(a), " ".join(b), " the"))
    return save_desiderata([Desideratum("move", trip)], path)


def test_mask_command_saves_a_reloadable_exact_result(tiny_dir, tmp_path):
    app = build_app()
    f = _desiderata(tmp_path / "d.jsonl")
    out = tmp_path / "m"
    res = runner.invoke(app, ["mask", "--model", str(tiny_dir), "--desiderata", str(f), "--sites", "head,mlp_out",
                              "--lam", "0.0", "--steps", "15", "--lr", "0.1", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "held-out desiderata accuracy" in res.output
    r = dbm.load_mask(out)
    assert len(r.sites) == 3 * (4 + 1)
    assert r.kept == tuple(s for s, b in zip(r.sites, r.binary.tolist()) if b == 1.0)
    assert load_desiderata(out / "desiderata.jsonl")[0].triples == load_desiderata(f)[0].triples
    # re-evaluate the saved binary mask on a fresh copy of the model: same held-out accuracy
    m = load_model(str(tiny_dir))
    (d,) = load_desiderata(f)
    idx = list(range(len(d)))
    random.Random(0).shuffle(idx)
    test = d.subset(sorted(idx[4:]))
    acc = dbm.evaluate_site_sets(m, tokenize_desiderata([test], m.tokenizer), [r.kept, []])
    assert float(acc[0].mean()) == pytest.approx(r.evaluation["accuracy"])
    assert float(acc[1].mean()) == pytest.approx(r.evaluation["unpatched_accuracy"])
    assert torch.all((r.mask >= 0) & (r.mask <= 1))
    # the mask folder is a results folder: show lists both kinds' mask values, report draws them
    shown = runner.invoke(app, ["show", str(out), "--top", "3"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "head mask, axes ('layer', 'head')" in text and "mlp_out mask, axes ('layer',)" in text and "dbm" in text
    rep = runner.invoke(app, ["report", str(out)])
    assert rep.exit_code == 0, rep.output
    assert (out / "report.html").is_file() and (out / "head" / "heatmap.png").is_file()


def test_mask_command_bad_desiderata_exit_2(tiny_dir, tmp_path):
    app = build_app()
    f = save_desiderata([Desideratum("broken", [Triple("the cat sat", "the cat sat on a mat", " the")] * 2)],
                        tmp_path / "bad.jsonl")
    res = runner.invoke(app, ["mask", "--model", str(tiny_dir), "--desiderata", str(f), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "'broken'" in res.output and "tuple 0" in res.output
    res = runner.invoke(app, ["mask", "--model", str(tiny_dir), "--desiderata", str(f), "--parametrization", "magic"])
    assert res.exit_code == 2 and "parametrization" in res.output
