"""Activation patching (fast and plain engine paths) against the independent HF-hook reference.

For every tiny family × every site kind the engine's patched logit difference must equal a naive
full forward of the Hugging Face model with the site replaced by hooks (``tests/reference.py``), to
1e-5 in fp32, at three granularities: one unit at one position, a whole layer at one position, a
whole layer at all positions. Both directions, both engine paths. A non-vacuity check makes sure
some patches actually move the metric.
"""

from __future__ import annotations

import pytest
import torch

from patchtrace.engine.sweep import Patch, Scorer, collect, resolve, run_patches
from patchtrace.methods.activation_patching import PatchingConfig, run
from patchtrace.metrics import Metric
from patchtrace.sites import HookPoint, Site, SiteSpec
from patchtrace.tasks import make_task
from reference import reference_metric, reference_patch

TOL = 1e-5
KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "q", "k", "v", "neuron",
         "pattern")
UNIT_KINDS = {"head", "q", "k", "v", "neuron", "pattern"}
PLAIN_FAMILIES = ("llama", "gpt2", "gemma3")  # adapter family names on which fast=False is also checked


def _tok(model):
    tok = make_task("ioi", n=2, seed=1).tokenize(model.tokenizer)
    assert tok.uniform_length() is not None
    return tok


def _diff_pos(tok) -> int:
    c, k = tok.clean[0], tok.corrupt[0]
    return next(i for i in range(len(c)) if c[i] != k[i])


def _units(model, kind: str) -> tuple[int, ...]:
    d = model.dims
    n = d.d_mlp if kind == "neuron" else (d.n_kv_heads if kind in ("k", "v") else d.n_heads)
    return (0, n - 1) if n > 1 else (0,)


def _patched_per_example(scores, direction: str) -> torch.Tensor:
    """``[N, cells]`` patched metric from a Scores object (effect + base)."""
    base = scores.extras["corrupt_per_example" if direction == "denoise" else "clean_per_example"]
    pe = scores.per_example.reshape(scores.per_example.shape[0], -1)
    return pe + base[:, None]


def _cells(spec: SiteSpec, model, T: int) -> list[Site]:
    """The sites of a grid in the row-major order of its axes (independently of build_grid)."""
    layers = [None] if spec.kind == "embed" else list(spec.layers)
    units = list(spec.units) if spec.per_unit else [None]
    if spec.positions is None:
        poss = [None]
    elif spec.positions == "last":
        poss = [-1]
    else:
        poss = list(spec.positions)
    return [Site(spec.kind, L, u, p) for L in layers for u in units for p in poss]


@pytest.mark.parametrize("kind", KINDS)
def test_engine_matches_reference(tiny_model, kind):
    model = tiny_model
    if kind == "resid_mid" and model.dims.parallel_residual:
        pytest.skip("parallel blocks have no resid_mid (EngineError tested in test_errors)")
    tok = _tok(model)
    T = tok.uniform_length()
    ids_c, ids_k = tok.ids("clean", [0, 1]), tok.ids("corrupt", [0, 1])
    ans, wrong = tok.answer, tok.wrong
    p0 = _diff_pos(tok)
    layers = (1,) if kind == "embed" else (0, model.dims.n_layers - 1)
    specs = [SiteSpec(kind, positions=[p0, -1], layers=layers), SiteSpec(kind, positions=None, layers=layers)]
    if kind in UNIT_KINDS:
        specs.append(SiteSpec(kind, per_unit=True, positions=[p0, -1], layers=layers[-1:], units=_units(model, kind)))
    if kind == "embed":
        specs = [SiteSpec(kind, positions=[p0, -1]), SiteSpec(kind, positions=None)]
    base_ref = {"denoise": reference_metric(model, ids_k, ans, wrong), "noise": reference_metric(model, ids_c, ans, wrong)}
    moved = 0.0
    for spec in specs:
        cells = _cells(spec, model, T)
        for direction in ("denoise", "noise"):
            base_ids, src_ids = (ids_k, ids_c) if direction == "denoise" else (ids_c, ids_k)
            ref = torch.stack([reference_patch(model, base_ids, src_ids, [s], ans, wrong) for s in cells], 1)
            moved = max(moved, float((ref - base_ref[direction][:, None]).abs().max()))
            # the plain path is the library's own cross-check: two families suffice for it
            for fast in (True, False) if model.family.name in PLAIN_FAMILIES else (True,):
                sc = run(model, tok, spec, PatchingConfig(direction=direction, fast=fast))
                got = _patched_per_example(sc, direction)
                assert got.shape == ref.shape
                err = float((got - ref).abs().max())
                assert err < TOL, f"{model.name} {spec} {direction} fast={fast}: max |engine − reference| = {err:.3g}"
                assert sc.provenance["sanity_max_abs"] < TOL
                # baselines agree with the unpatched HF forward too
                assert float((sc.extras["clean_per_example"] - base_ref["noise"]).abs().max()) < TOL
                assert float((sc.extras["corrupt_per_example"] - base_ref["denoise"]).abs().max()) < TOL
    assert moved > 1e-3, f"{model.name} {kind}: no patch changed the metric (vacuous comparison)"


def test_multi_site_patches(tiny_model):
    """Patches of several sites at different layers/positions, through run_patches, vs all hooks at once."""
    model = tiny_model
    tok = _tok(model)
    T = tok.uniform_length()
    ids_c, ids_k = tok.ids("clean", [0, 1]), tok.ids("corrupt", [0, 1])
    p0 = _diff_pos(tok)
    last = model.dims.n_layers - 1
    mid_or_pre = "resid_pre" if model.dims.parallel_residual else "resid_mid"
    patches_sites = [
        (Site("head", 0, 1, p0), Site("mlp_out", last, None, -1)),
        (Site("attn_out", 0, None, p0 + 1), Site("neuron", 1, 3, -1), Site("v", last, 0, None)),
        (Site("embed", None, None, p0), Site(mid_or_pre, 1, None, -2), Site("pattern", last, 2, -1)),
        (Site("q", 1, 0, -1), Site("k", 1, model.dims.n_kv_heads - 1, p0), Site("resid_post", 0, None, p0)),
        # a single-layer MLP patch and a multi-layer one starting one layer later, in the same batch
        (Site("mlp_out", 0, None, p0),),
        (Site("mlp_out", 1, None, p0), Site("mlp_out", last, None, p0)),
        (Site("attn_out", 1, None, p0), Site("attn_out", last, None, p0)),
    ]
    patches = [Patch(tuple(resolve(s, model, T) for s in ps)) for ps in patches_sites]
    points = {s.point for p in patches for s in p.sites}
    clean, corrupt = collect(model, ids_c, points), collect(model, ids_k, points)
    scorer = Scorer(Metric("logit_diff"), tok.answer, tok.wrong)
    base_metric = reference_metric(model, ids_k, tok.answer, tok.wrong)
    for fast in (True, False):
        got = run_patches(model, ids_k, corrupt, clean, patches, scorer, fast=fast)
        for i, ps in enumerate(patches_sites):
            ref = reference_patch(model, ids_k, ids_c, list(ps), tok.answer, tok.wrong)
            assert float((ref - base_metric).abs().max()) > 1e-3, f"patch {i} changed nothing"
            err = float((got[i] - ref).abs().max())
            assert err < TOL, f"{model.name} patch {[str(s) for s in ps]} fast={fast}: err {err:.3g}"


def test_clean_into_clean_is_identity(tiny_model):
    tok = _tok(tiny_model)
    sc = run(tiny_model, tok, SiteSpec("head", per_unit=True, positions="last"), PatchingConfig(sanity_check=True))
    assert sc.provenance["sanity_max_abs"] < 1e-5


def test_reference_unpatched_matches_runner(tiny_model):
    """The reference's plain forward and patchtrace's runner agree (guards the reference's metric code)."""
    tok = _tok(tiny_model)
    ids = tok.ids("clean", [0, 1])
    ref = reference_metric(tiny_model, ids, tok.answer, tok.wrong)
    with torch.no_grad():
        logits = tiny_model.runner.forward(ids).logits
    last = logits[:, -1]
    mine = last.gather(1, tok.answer).mean(1) - last.gather(1, tok.wrong).mean(1)
    assert float((ref - mine).abs().max()) < TOL
    assert HookPoint("embed", None) == Site("embed").point
