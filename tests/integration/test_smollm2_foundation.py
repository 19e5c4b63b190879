"""SmolLM2-135M-Instruct tier: the real model does the tasks, and the engine matches the reference."""

from __future__ import annotations

import pytest
import torch

from patchtrace.engine.sweep import Patch, Scorer, collect, resolve, run_patches
from patchtrace.methods.causal_tracing import TracingConfig
from patchtrace.methods.causal_tracing import run as causal_trace
from patchtrace.metrics import Metric
from patchtrace.sites import Site
from patchtrace.tasks import make_task
from reference import reference_metric, reference_patch

pytestmark = pytest.mark.smollm2


def test_ioi_behaviour(smollm2):
    tok = make_task("ioi", n=16, seed=0).tokenize(smollm2.tokenizer)
    ids_c, ids_k = tok.ids("clean", range(16)), tok.ids("corrupt", range(16))
    with torch.no_grad():
        lc = smollm2.runner.forward(ids_c, last_only=True).logits[:, -1]
        lk = smollm2.runner.forward(ids_k, last_only=True).logits[:, -1]
    ld_c = lc.gather(1, tok.answer)[:, 0] - lc.gather(1, tok.wrong)[:, 0]
    ld_k = lk.gather(1, tok.answer)[:, 0] - lk.gather(1, tok.wrong)[:, 0]
    assert float((ld_c > 0).float().mean()) >= 0.9, ld_c
    assert float((ld_k < 0).float().mean()) > 0.5, ld_k
    # the runner agrees with the plain HF forward on the real model
    ref = reference_metric(smollm2, ids_c[:4], tok.answer[:4], tok.wrong[:4])
    assert float((ref - ld_c[:4]).abs().max()) < 1e-4


def test_engine_matches_reference_on_smollm2(smollm2):
    tok = make_task("ioi", n=2, seed=0).tokenize(smollm2.tokenizer)
    T = tok.uniform_length()
    ids_c, ids_k = tok.ids("clean", range(2)), tok.ids("corrupt", range(2))
    p0 = next(i for i in range(T) if tok.clean[0][i] != tok.corrupt[0][i])
    cells = [
        (Site("head", 14, 3, -1),), (Site("head", 25, 0, -1),), (Site("neuron", 20, 700, -1),),
        (Site("resid_pre", 10, None, p0),), (Site("attn_out", 22, None, -1),), (Site("mlp_out", 3, None, p0),),
        (Site("q", 18, 4, -1),), (Site("k", 12, 1, p0),), (Site("v", 12, 2, p0),),
        (Site("mlp_out", 13, None, p0), Site("mlp_out", 14, None, p0)),
    ]
    patches = [Patch(tuple(resolve(s, smollm2, T) for s in c)) for c in cells]
    points = {s.point for p in patches for s in p.sites}
    clean, corrupt = collect(smollm2, ids_c, points), collect(smollm2, ids_k, points)
    got = run_patches(smollm2, ids_k, corrupt, clean, patches, Scorer(Metric("logit_diff"), tok.answer, tok.wrong))
    base = reference_metric(smollm2, ids_k, tok.answer, tok.wrong)
    moved = 0.0
    for i, c in enumerate(cells):
        ref = reference_patch(smollm2, ids_k, ids_c, list(c), tok.answer, tok.wrong)
        moved = max(moved, float((ref - base).abs().max()))
        err = float((got[i] - ref).abs().max())
        assert err < 1e-4, f"{[str(s) for s in c]}: max |engine − reference| = {err:.3g}"
    assert moved > 0.05


@pytest.fixture(scope="module")
def factual_task(smollm2):
    return make_task("factual", n=16, seed=0, model=smollm2)


def test_factual_keeps_facts(factual_task, smollm2):
    t = factual_task
    assert 0 < t.params["kept"] == len(t) <= 16
    assert t.params["candidates"] >= t.params["kept"]
    t.tokenize(smollm2.tokenizer)  # kept facts are valid single-token tasks


def test_causal_trace_peaks_at_subject_end_or_last_token(smollm2, factual_task):
    t = factual_task
    tok = t.tokenize(smollm2.tokenizer)
    # one length (the position axis is shared): the most common one
    from collections import Counter

    length = Counter(tok.lengths).most_common(1)[0][0]
    sub = t.subset([i for i, n in enumerate(tok.lengths) if n == length][:2])
    sc = causal_trace(smollm2, sub, config=TracingConfig(kind="resid", samples=3, seed=0))
    assert sc.baselines["clean"] - sc.baselines["corrupt"] > 0.05  # the noise hurts recall
    layer, pos = divmod(int(sc.values.argmax()), sc.values.shape[1])
    last_subject = max(sc.provenance["subject_positions"][0])
    assert pos in (last_subject, length - 1), (layer, pos, sc.labels["pos"])
