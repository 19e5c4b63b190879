"""Every intervention operation, on the fast and plain engine paths, against the independent reference.

The reference (``tests/reference.py``) runs the plain Hugging Face forward with hooks on the HF
modules; here the replacement tensor of each operation is computed by hand from recorded
activations (zeros, the mean over examples, a permutation of examples, a mix, a sum, another layer's
value, another prompt's value) and written in at the site. The engine must give the same metric to
1e-4. A non-vacuity check makes sure each operation moves the metric.
"""

from __future__ import annotations

import pytest
import torch

from patchtrace.engine.sweep import Patch, Scorer, collect, resolve, run_patches
from patchtrace.interventions import Add, Intervention, InterventionError, Mean, Mix, Replace, Resample, SourceRef, Zero
from patchtrace.metrics import Metric
from patchtrace.sites import HookPoint, Site
from patchtrace.tasks import make_task
from reference import hf_run, logit_diff

TOL = 1e-4
# (site builder) — kinds without rotary in between, so the reference's pre-rotary hooks agree for Add
SITES = {
    "head": lambda L, T: Site("head", L, 1, T - 1),
    "mlp_out": lambda L, T: Site("mlp_out", L, None, T - 2),
    "resid_pre": lambda L, T: Site("resid_pre", L, None, None),
    "neuron": lambda L, T: Site("neuron", L, 5, T - 1),
    "v": lambda L, T: Site("v", L, 0, T - 3),
}


FAMILIES = ("llama", "gpt2")  # grouped-query attention with rotary; fused Conv1D with learned positions


@pytest.fixture(scope="module")
def build(smol_tokenizer):
    """``build(family)`` → (model, tokenized task, clean ids, corrupt ids), made once per family."""
    from conftest import make_tiny

    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model = make_tiny(family, seed=11, tokenizer=smol_tokenizer)
            tok = make_task("ioi", n=3, seed=4).tokenize(model.tokenizer)
            cache[family] = (model, tok, tok.ids("clean", [0, 1, 2]), tok.ids("corrupt", [0, 1, 2]))
        return cache[family]

    return get


@pytest.fixture(params=FAMILIES)
def setup(request, build):
    return build(request.param)


def _engine(model, tok, base_ids, src_ids, iv, fast, runs_extra=None):
    T = base_ids.shape[1]
    pts = {iv.target.point} | ({iv.source_site.point} if iv.source_site is not None else set())
    base, src = collect(model, base_ids, pts), collect(model, src_ids, pts)
    runs = {"base": base, "source": src, **(runs_extra or {})}
    scorer = Scorer(Metric("logit_diff"), tok.answer, tok.wrong)
    ivr = Intervention(resolve(iv.target, model, T), iv.op,
                       None if iv.source is None else SourceRef(iv.source.run, None if iv.source.site is None else
                                                                 resolve(iv.source.site, model, T)))
    return run_patches(model, base_ids, base, src, [Patch((ivr,))], scorer, fast=fast, runs=runs)[0]


def _ref(model, tok, base_ids, site, full):
    logits, _ = hf_run(model, base_ids, replace=[(site, full)])
    return logit_diff(logits, tok.answer, tok.wrong)


OPS = ["zero", "mean", "resample", "mix", "add"]
# every kind × op on the fast path of both families; the plain path (which shares the writes) on two
# kinds of llama
CASES = [(f, k, o, True) for f in FAMILIES for k in SITES for o in OPS] + [
    ("llama", k, o, False) for k in ("head", "resid_pre") for o in OPS
]


@pytest.mark.parametrize(("family", "kind", "op", "fast"), CASES)
def test_operation_matches_reference(build, family, kind, op, fast):
    model, tok, ids_c, ids_k = build(family)
    T = ids_k.shape[1]
    L = 1
    site = SITES[kind](L, T)
    _, rec_b = hf_run(model, ids_k, record=[(kind, L)])
    _, rec_s = hf_run(model, ids_c, record=[(kind, L)])
    b, s = rec_b[(kind, L)], rec_s[(kind, L)]
    g = torch.Generator().manual_seed(0)
    if op == "zero":
        iv, full = Intervention(site, Zero()), torch.zeros_like(b)
    elif op == "mean":
        ref_mean = s.mean(0)
        sel = ref_mean[site.pos] if site.pos is not None else ref_mean
        if site.unit is not None:
            sel = sel[site.unit] if site.pos is not None else sel[:, site.unit]
        iv, full = Intervention(site, Mean(sel)), ref_mean.expand_as(b).clone()
    elif op == "resample":
        order = (2, 0, 1)
        iv, full = Intervention(site, Resample(order)), s[list(order)]
    elif op == "mix":
        iv, full = Intervention(site, Mix(0.3)), 0.7 * b + 0.3 * s
    else:
        v = torch.randn(b.shape[-1], generator=g) * 3
        iv, full = Intervention(site, Add(v[site.unit] if kind == "neuron" else v)), b + v
    want = _ref(model, tok, ids_k, site, full)
    got = _engine(model, tok, ids_k, ids_c, iv, fast)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    unpatched = logit_diff(hf_run(model, ids_k)[0], tok.answer, tok.wrong)
    assert (got - unpatched).abs().max() > 1e-4  # non-vacuous


@pytest.mark.parametrize("fast", [True, False])
def test_cross_layer_back_patch(setup, fast):
    """resid_post of a later layer written into an earlier layer at the last position, same prompt."""
    model, tok, _, ids_k = setup
    T = ids_k.shape[1]
    j, i = 2, 0
    _, rec = hf_run(model, ids_k, record=[("resid_post", j), ("resid_post", i)])
    full = rec[("resid_post", i)].clone()
    full[:, T - 1] = rec[("resid_post", j)][:, T - 1]
    want = _ref(model, tok, ids_k, Site("resid_post", i, None, T - 1), full)
    iv = Intervention(Site("resid_post", i, None, -1), Replace(), SourceRef("base", Site("resid_post", j, None, -1)))
    got = _engine(model, tok, ids_k, ids_k, iv, fast)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert (got - logit_diff(hf_run(model, ids_k)[0], tok.answer, tok.wrong)).abs().max() > 1e-4


def test_cross_prompt_other_length(setup):
    """A source prompt of another length: its position 2 written into the target's last position."""
    model, tok, _, ids_k = setup
    T = ids_k.shape[1]
    other = model.tokenizer(["Paris is a city in"] * 3, return_tensors="pt").input_ids
    assert other.shape[1] != T
    _, rec_o = hf_run(model, other, record=[("resid_pre", 1)])
    _, rec_b = hf_run(model, ids_k, record=[("resid_pre", 1)])
    full = rec_b[("resid_pre", 1)].clone()
    full[:, T - 1] = rec_o[("resid_pre", 1)][:, 2]
    want = _ref(model, tok, ids_k, Site("resid_pre", 1, None, T - 1), full)
    other_run = collect(model, other, {HookPoint("resid_pre", 1)})
    iv = Intervention(Site("resid_pre", 1, None, -1), Replace(), SourceRef("other", Site("resid_pre", 1, None, 2)))
    got = _engine(model, tok, ids_k, ids_k, iv, True, runs_extra={"other": other_run})
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_bad_interventions_are_refused():
    with pytest.raises(InterventionError, match="takes no source"):
        Intervention(Site("head", 0, 1, -1), Zero(), SourceRef())
    with pytest.raises(InterventionError, match="position exactly when"):
        Intervention(Site("head", 0, 1, -1), Replace(), SourceRef(site=Site("head", 3, 1, None)))
