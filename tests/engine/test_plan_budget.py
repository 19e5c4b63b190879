"""The default working-memory budget is a preference (a patch that needs more still runs, one per
chunk, with the same numbers); a budget the caller gives is a limit (refused before compute)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from patchtrace import PatchingConfig, SiteSpec
from patchtrace.engine import plan
from patchtrace.engine.sweep import (
    EngineError,
    Patch,
    Scorer,
    collect,
    patches_per_chunk,
    resolve,
    row_bytes,
    run_patches,
)
from patchtrace.methods import activation_patching as ap
from patchtrace.metrics import Metric
from patchtrace.sites import Site
from patchtrace.tasks import make_task


def test_default_budget_is_a_preference_and_an_explicit_one_a_limit(smol_tokenizer, monkeypatch):
    model = make_tiny("llama", tokenizer=smol_tokenizer)
    need = row_bytes(model, 14, 14, None) * 4
    assert patches_per_chunk(model, 14, 14, None, 4, need - 1, strict=False) == 1
    with pytest.raises(EngineError, match="cannot hold one patch"):
        patches_per_chunk(model, 14, 14, None, 4, need - 1)
    assert plan.default_budget(model) <= plan.DEFAULT_BUDGET_CAP == 16 << 20

    tok = make_task("ioi", n=2, seed=1).tokenize(smol_tokenizer)
    ids_c, ids_k = tok.ids("clean", [0, 1]), tok.ids("corrupt", [0, 1])
    T = ids_c.shape[1]
    patches = [Patch((resolve(Site("resid_pre", L, None, p), model, T),)) for L in range(3) for p in range(T)]
    scorer = Scorer(Metric("logit_diff"), tok.answer, tok.wrong)
    c, k = collect(model, ids_c, []), collect(model, ids_k, [])
    roomy = run_patches(model, ids_k, k, c, patches, scorer, max_memory=1 << 30, skip_noops=False)
    monkeypatch.setattr(plan, "DEFAULT_BUDGET_CAP", 1)  # a default smaller than one patch
    chunks: list[int] = []
    tight = run_patches(model, ids_k, k, c, patches, scorer, on_chunk=chunks.append, skip_noops=False)
    assert chunks and max(chunks) == 1  # one patch per chunk, not a refusal
    torch.testing.assert_close(tight, roomy, atol=1e-5, rtol=0)  # other batch shapes: rounding only
    with pytest.raises(EngineError, match="cannot hold one patch"):
        run_patches(model, ids_k, k, c, patches, scorer, max_memory=1)


@pytest.mark.parametrize("spec", [
    SiteSpec("head", per_unit=True, positions="last"),
    SiteSpec("neuron", per_unit=True, positions="last", layers=(0, 2)),
    SiteSpec("resid_pre", positions="all"),
    SiteSpec("mlp_out", positions=[-3, -1]),
])
@pytest.mark.parametrize("fast", [True, False])
def test_the_planned_caches_cover_what_a_sweep_records(smol_tokenizer, spec, fast):
    """The plan's cache estimate (``--dry-run``'s "est. peak" minus the working set) is at least what
    activation patching really records for the base and source runs, and, for a last-position sweep,
    within a few times of it (it once counted every position of both runs: ~10× too much)."""
    model = make_tiny("llama", tokenizer=smol_tokenizer)
    tok = make_task("ioi", n=4, seed=1).tokenize(smol_tokenizer)
    job = ap.PatchingJob(model, tok, spec, PatchingConfig(sanity_check=False, fast=fast))
    (g,) = tok.groups()
    st = job._group(0)
    recorded = sum(
        sum(a.nbytes for a in r.acts.values()) + sum(k.nbytes + v.nbytes for k, v in r.kv) for r in st.runs.values()
    )
    pl = job.plans[0]
    T = tok.lengths[g[0]]
    n_max = T - min(p.start_pos for p in job.patches[0]) if fast else T
    ncols = len(job.metric.columns(tok.answer, tok.wrong)) if fast else None
    working = pl.rows_per_chunk * row_bytes(model, n_max, T, ncols)
    planned = pl.peak_bytes - working
    assert recorded <= planned
    if spec.positions == "last":
        assert planned <= 4 * recorded, (planned, recorded)
