"""Recorded runs that keep only the positions a sweep reads give the same patched numbers, bit for
bit, as runs that keep every position, and refuse to serve a position they did not keep.

The untrimmed run is the reference here (its exactness against naive HF hooks is what
``test_exactness.py`` checks); the sizes are plain tensor facts.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from patchtrace.engine.apply import ApplyError, select
from patchtrace.engine.sweep import Patch, Scorer, collect, resolve, run_patches
from patchtrace.interventions import Intervention, Replace, SourceRef
from patchtrace.metrics import Metric
from patchtrace.sites import Site
from patchtrace.tasks import make_task


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_trimmed_runs_give_the_same_sweep_bit_for_bit(family, smol_tokenizer):
    model = make_tiny(family, tokenizer=smol_tokenizer)
    tok = make_task("ioi", n=2, seed=1).tokenize(smol_tokenizer)
    ids_c, ids_k = tok.ids("clean", [0, 1]), tok.ids("corrupt", [0, 1])
    T = ids_c.shape[1]
    p = T - 3
    sites = [Site("head", 1, 2, -1), Site("neuron", 0, 5, p), Site("mlp_out", 2, None, -1), Site("resid_pre", 1, None, p),
             Site("k", 2, 1, p + 1), Site("pattern", 1, 0, -1), Site("attn_out", 0, None, -2)]
    patches = [Patch((resolve(s, model, T),)) for s in sites]
    # a cross-layer write reading another position of the source run (still at or after p)
    patches.append(Patch((Intervention(Site("resid_post", 2, None, T - 1), Replace(),
                                       SourceRef("source", Site("resid_post", 0, None, p))),)))
    pts = {s.point for pt in patches for s in pt.sites} | {Site("resid_post", 0).point}
    scorer = Scorer(Metric("logit_diff"), tok.answer, tok.wrong)
    full_c, full_k = collect(model, ids_c, pts), collect(model, ids_k, pts)
    trim_c, trim_k = collect(model, ids_c, pts, from_pos=p), collect(model, ids_k, pts, from_pos=p)
    assert trim_k.pos0 == p and full_k.pos0 == 0
    hp = Site("neuron", 0).point
    assert trim_k.acts[hp].shape[1] == T - p and full_k.acts[hp].shape[1] == T
    assert torch.equal(trim_k.acts[hp], full_k.acts[hp][:, p:])
    pat = Site("pattern", 1).point  # [N, H, Tq, Tk]: query positions trimmed, keys whole
    assert tuple(trim_k.acts[pat].shape[2:]) == (T - p, T)
    for fast in (True, False):
        want = run_patches(model, ids_k, full_k, full_c, patches, scorer, fast=fast, skip_noops=False)
        got = run_patches(model, ids_k, trim_k, trim_c, patches, scorer, fast=fast, skip_noops=False)
        assert torch.equal(got, want), fast
    assert float((want - scorer(full_k.logits, 1, False)[0]).abs().max()) > 1e-4  # the patches do something


def test_a_position_that_was_not_kept_is_refused(smol_tokenizer):
    model = make_tiny("llama", tokenizer=smol_tokenizer)
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    run = collect(model, ids, [Site("head", 1).point], from_pos=5)
    with pytest.raises(ApplyError, match="position 3 was not recorded"):
        select(run.acts[Site("head", 1).point], Site("head", 1, 0, 3), run.pos0)
    with pytest.raises(IndexError, match="keeps positions 5"):
        run.local(4)
    assert run.local(7) == 2
