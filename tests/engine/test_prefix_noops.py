"""Positions before the first token where clean and corrupt differ are no-ops by causality: the fast
path skips their plain patches without reading the caches, and activation patching records its runs
from that token on (the memory debt of issue 15: heads × all positions).

The reference for every number is the same sweep over untrimmed runs with ``skip_noops=False``
(every patch computed, nothing skipped); its exactness against naive HF hooks is
``test_exactness.py``'s job.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from patchtrace import PatchingConfig, SiteSpec
from patchtrace.engine.patch import EngineError
from patchtrace.engine.sweep import Patch, Scorer, before_difference, collect, first_difference, resolve, run_patches
from patchtrace.interventions import Intervention, Replace, SourceRef, Zero
from patchtrace.methods import activation_patching as ap
from patchtrace.metrics import Metric
from patchtrace.sites import Site
from patchtrace.tasks import make_task


def test_first_difference_is_the_first_column_any_example_changes():
    a = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    b = torch.tensor([[5, 6, 7, 0, 9], [1, 2, 3, 4, 0]])
    assert first_difference(a, b) == 3  # example 0 differs at 3, example 1 only at 4
    assert first_difference(a, a.clone()) == 5
    with pytest.raises(EngineError, match=r"differ in shape: \(2, 5\) vs \(2, 4\)"):
        first_difference(a, b[:, :4])


def test_only_plain_patches_wholly_before_the_difference_count():
    plain = Patch((Site("head", 1, 0, 2), Site("head", 1, 1, 3)))
    assert before_difference(plain, 4) and not before_difference(plain, 3)
    assert not before_difference(Patch((Site("resid_pre", 0, None, None),)), 99)  # all positions
    zero = Patch((Intervention(Site("head", 1, 0, 0), Zero()),))
    assert not before_difference(zero, 4)
    moved = Patch((Intervention(Site("resid_pre", 1, None, 0), Replace(), SourceRef("source", Site("resid_pre", 1, None, 5))),))
    assert not before_difference(moved, 4)  # reads a position after the difference


def test_skipped_prefix_patches_equal_computed_ones_and_others_still_run(smol_tokenizer):
    model = make_tiny("llama", tokenizer=smol_tokenizer)
    tok = make_task("ioi", n=3, seed=2).tokenize(smol_tokenizer)
    idx = [0, 1, 2]
    ids_c, ids_k = tok.ids("clean", idx), tok.ids("corrupt", idx)
    T, d = ids_c.shape[1], first_difference(ids_c, ids_k)
    assert 2 <= d < T - 1  # IOI: the names differ at the second mention
    sites = [Site("head", layer, h, p) for layer in (0, 2) for h in (0, 3) for p in range(T)]
    sites += [Site("resid_pre", 1, None, p) for p in range(T)]
    patches = [Patch((resolve(s, model, T),)) for s in sites]
    # not plain: an ablation before the difference, and a write there from a later position
    patches.append(Patch((Intervention(Site("resid_pre", 1, None, 0), Zero()),)))
    patches.append(Patch((Intervention(Site("resid_pre", 1, None, d - 1), Replace(),
                                       SourceRef("source", Site("resid_pre", 1, None, d))),)))
    pts = {s.point for pt in patches for s in pt.sites}
    scorer = Scorer(Metric("logit_diff"), tok.answer[idx], tok.wrong[idx])
    full_c, full_k = collect(model, ids_c, pts), collect(model, ids_k, pts)
    want = run_patches(model, ids_c, full_c, full_k, patches, scorer, skip_noops=False)
    got = run_patches(model, ids_c, full_c, full_k, patches, scorer, source_ids=ids_k)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    base = scorer(full_c.logits, 1, False)[0]
    for i, s in enumerate(sites):
        if s.pos < d:
            assert torch.equal(got[i], base)  # skipped: the base metric itself
    assert float((got[-2] - base).abs().max()) > 1e-3  # the ablation was computed, not skipped
    assert float((got[-1] - base).abs().max()) > 1e-4  # so was the write from position d
    assert float((got[: len(sites)] - base).abs().max()) > 1e-3  # and the patches after d do something


def test_base_hooks_turn_the_shortcut_off(smol_tokenizer):
    """Causal tracing's base run is the clean prompt plus noise hooks: equal ids, different runs."""
    model = make_tiny("llama", tokenizer=smol_tokenizer)
    tok = make_task("ioi", n=2, seed=0).tokenize(smol_tokenizer)
    ids = tok.ids("clean", [0, 1])
    T = ids.shape[1]
    noise = torch.randn(2, 1, model.hf.config.hidden_size) * 3

    def add_noise(x, ctx):
        return torch.cat((x[:, :1] + noise, x[:, 1:]), 1) if ctx.pos_offset == 0 else x

    hp = Site("resid_pre", 0).point
    pts = {Site("resid_pre", 1).point}
    noisy, clean = collect(model, ids, pts, hooks={hp: [add_noise]}), collect(model, ids, pts)
    patches = [Patch((resolve(Site("resid_pre", 1, None, 0), model, T),))]
    scorer = Scorer(Metric("logit_diff"), tok.answer[[0, 1]], tok.wrong[[0, 1]])
    got = run_patches(model, ids, noisy, clean, patches, scorer, base_hooks={hp: [add_noise]}, source_ids=ids)
    base = scorer(noisy.logits, 1, False)[0]
    assert float((got[0] - base).abs().max()) > 1e-4  # restoring position 0 undoes the noise: computed


def test_activation_patching_records_from_the_first_difference(smol_tokenizer):
    model = make_tiny("llama", tokenizer=smol_tokenizer)
    task = make_task("ioi", n=3, seed=2)
    tok = task.tokenize(smol_tokenizer)
    spec = SiteSpec("head", per_unit=True, positions="all")
    job = ap.PatchingJob(model, tok, spec, PatchingConfig())
    ids_c, ids_k = tok.ids("clean", job.groups[0]), tok.ids("corrupt", job.groups[0])
    d = first_difference(ids_c, ids_k)
    st = job._group(0)
    assert st.runs["base"].pos0 == d and st.runs["source"].pos0 == d
    plain = ap.PatchingJob(model, tok, spec, PatchingConfig(fast=False))._group(0)
    assert plain.runs["base"].pos0 == 0  # the plain path computes every patch: it keeps every position
    fast, slow = ap.run(model, task, spec, PatchingConfig()), ap.run(model, task, spec, PatchingConfig(fast=False))
    assert torch.allclose(fast.values, slow.values, atol=1e-5, rtol=0)
    assert float(fast.values.abs().max()) > 1e-3
