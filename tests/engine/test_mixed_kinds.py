"""One sweep mixing site kinds that join the fast path at the same layer equals the naive reference.

A ``resid_post`` patch of layer ``L`` and an ``mlp_out``/``neuron`` patch of the same layer both join
the batch entering layer ``L + 1`` with rows the engine builds itself. They once shared one block of
rows, built the MLP way, so the ``resid_post`` patch was silently not applied (activation patching
sweeps one kind at a time and never mixed them; a caller passing mixed patches got wrong numbers).
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from patchtrace.engine.sweep import Patch, Scorer, collect, resolve, run_patches
from patchtrace.metrics import Metric
from patchtrace.sites import Site
from reference import reference_metric, reference_patch


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_kinds_at_one_layer_equal_the_reference(family):
    model = make_tiny(family, vocab=97)
    T = 6
    g = torch.Generator().manual_seed(5)
    clean, corrupt = torch.randint(0, 97, (2, T), generator=g), torch.randint(0, 97, (2, T), generator=g)
    ans, wrong = torch.tensor([[1], [2]]), torch.tensor([[3], [4]])
    sites = [Site("resid_post", 1, None, 3), Site("mlp_out", 1, None, 3), Site("neuron", 1, 7, 4),
             Site("resid_post", 1, None, 5), Site("head", 1, 2, 4), Site("resid_pre", 2, None, 3)]
    need = {s.point for s in sites}
    src, base = collect(model, clean, need), collect(model, corrupt, need)
    scorer = Scorer(Metric("logit_diff"), ans, wrong)
    got = run_patches(model, corrupt, base, src, [Patch((resolve(s, model, T),)) for s in sites], scorer,
                      skip_noops=False)
    ref = torch.stack([reference_patch(model, corrupt, clean, [s], ans, wrong) for s in sites])
    assert (got - ref).abs().max() <= 1e-4
    # the patches matter (an unapplied patch would equal the base metric)
    assert ((ref - reference_metric(model, corrupt, ans, wrong)).abs() > 1e-3).all()
