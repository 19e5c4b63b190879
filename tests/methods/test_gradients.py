"""Gradient-based localization (AtP, AtP*, IG, RelP) against independent references on tiny models.

References here are written from the definitions with plain runner hooks (finite differences,
hand-recorded patched patterns, detach hooks for GradDrop, conservation of relevance), never from the
estimators' own code paths.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from patchtrace import SiteSpec, make_task
from patchtrace.methods import activation_patching as ap
from patchtrace.methods import atp, atp_star, compare, ig, relp
from patchtrace.methods.gradients import AttributionError
from patchtrace.methods.validate import ConfigError
from patchtrace.metrics import Metric
from patchtrace.models.runner import LRPRules
from patchtrace.sites import HookPoint


@pytest.fixture(scope="module")
def llama(smol_tokenizer):
    return make_tiny("llama", seed=1, tokenizer=smol_tokenizer)


@pytest.fixture(scope="module")
def task(smol_tokenizer):
    return make_task("ioi", n=4, seed=0).tokenize(smol_tokenizer)


def _ids(tok):
    idx = list(range(len(tok)))
    return tok.ids("clean", idx), tok.ids("corrupt", idx), tok.answer, tok.wrong


def _record(model, ids, points, hooks=None):
    """Plain no-grad forward recording activations (independent of the estimators' kernel)."""
    acts = {}
    hk = {hp: list(fns) for hp, fns in (hooks or {}).items()}
    for hp in points:
        hk.setdefault(hp, []).append(lambda x, c, hp=hp: acts.__setitem__(hp, x.detach().clone()))
    with torch.no_grad():
        out = model.runner.forward(ids, hooks=hk, explicit_attention=True)
    return acts, out.logits[:, -1]


def _metric(logits, answer, wrong):
    return Metric("logit_diff").score(logits, answer, wrong)


def _site_hook(kind, unit, pos, value):
    def fn(x, c):
        x = x.clone()
        if kind in ("head", "k", "q", "v"):
            x[:, pos, unit] = value[:, pos, unit]
        else:
            x[:, pos] = value[:, pos]
        return x

    return fn


# -- AtP ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind,layer,unit,pos", [("resid_pre", 1, None, -1), ("head", 2, 1, -1), ("mlp_out", 0, None, 9)])
def test_atp_equals_finite_difference_directional_derivative(smol_tokenizer, task, family, kind, layer, unit, pos):
    model = make_tiny(family, seed=2, tokenizer=smol_tokenizer)
    clean, corrupt, ans, wr = _ids(task)
    hp = HookPoint(kind, layer)
    src, _ = _record(model, clean, [hp])
    base, _ = _record(model, corrupt, [hp])
    eps = 1e-2

    def f(e):
        val = base[hp] + e * (src[hp] - base[hp])
        _, lg = _record(model, corrupt, [], {hp: [_site_hook(kind, unit, pos, val)]})
        return _metric(lg, ans, wr).mean()

    ref = float((f(eps) - f(-eps)) / (2 * eps))
    spec = SiteSpec(kind, per_unit=unit is not None, positions=[pos], layers=(layer,), units=None if unit is None else (unit,))
    got = float(atp.run(model, task, spec).values.flatten()[0])
    assert abs(ref) > 1e-3, "non-vacuous: the site must matter"
    assert got == pytest.approx(ref, rel=2e-2, abs=2e-4)


def _linear_head_model(smol_tokenizer, huge_eps):
    model = make_tiny("llama", seed=3, tokenizer=smol_tokenizer)
    if huge_eps:  # the final RMSNorm becomes a constant scale: logits are linear in the last residual
        model.runner.final_norm.variance_epsilon = 1e10
        with torch.no_grad():
            model.runner.final_norm.weight.mul_(1e5)
    return model


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_exact_where_site_feeds_metric_linearly(smol_tokenizer, task, direction):
    spec = SiteSpec("mlp_out", positions="last", layers=(2,))
    model = _linear_head_model(smol_tokenizer, True)
    exact = ap.run(model, task, spec, ap.PatchingConfig(direction=direction))
    est = atp.run(model, task, spec, atp.AtPConfig(direction=direction))
    assert float(exact.values.abs().max()) > 1e-2
    torch.testing.assert_close(est.values, exact.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(est.per_example, exact.per_example, atol=1e-5, rtol=1e-5)
    # ... and the same check fails with the ordinary (nonlinear) final norm: the test can fail
    normal = _linear_head_model(smol_tokenizer, False)
    gap = (atp.run(normal, task, spec).values - ap.run(normal, task, spec).values).abs().max()
    assert float(gap) > 1e-4


def test_scores_have_the_axes_of_exact_patching(llama, task):
    specs = [
        SiteSpec("head", per_unit=True, positions="last"),
        SiteSpec("resid_pre", positions="all"),
        SiteSpec("neuron", per_unit=True, positions=[-1, 3], layers=(1,), units=(0, 5, 7)),
        SiteSpec("attn_out", positions=None),
        SiteSpec("k", per_unit=True, positions=[-2]),
    ]
    for spec in specs:
        e = ap.run(llama, task, spec)
        for s in (atp.run(llama, task, spec), relp.run(llama, task, spec), ig.run(llama, task, spec)):
            assert s.axes == e.axes and s.values.shape == e.values.shape and s.labels == e.labels
            assert s.per_example is not None and s.per_example.shape == e.per_example.shape
            assert s.baselines["clean"] == pytest.approx(e.baselines["clean"], abs=1e-4)
            assert s.baselines["corrupt"] == pytest.approx(e.baselines["corrupt"], abs=1e-4)


def test_whole_layer_cell_is_the_sum_of_its_positions(llama, task):
    per_pos = atp.run(llama, task, SiteSpec("attn_out", positions="all", layers=(1,)))
    whole = atp.run(llama, task, SiteSpec("attn_out", positions=None, layers=(1,)))
    torch.testing.assert_close(whole.values, per_pos.values.sum(-1), atol=1e-5, rtol=1e-5)


def test_bad_settings_raise_clear_errors(llama, task):
    spec = SiteSpec("attn_out", layers=(0,))
    with pytest.raises(ConfigError, match="direction: 'sideways'"):
        atp.run(llama, task, spec, atp.AtPConfig(direction="sideways"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="steps: 0"):
        ig.run(llama, task, spec, ig.IGConfig(steps=0))
    with pytest.raises(AttributionError, match=r"unknown method.*magic"):
        compare.run(llama, task, [spec], methods=["atp", "magic"])
    with pytest.raises(ConfigError, match=r"'ig'.*'stepz'"):
        compare.CompareConfig(options={"ig": {"stepz": 3}})


# -- AtP*: QK fix and GradDrop ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["q", "k"])
def test_qk_fix_equals_exact_pattern_change_times_pattern_gradient(llama, task, kind):
    clean, corrupt, ans, wr = _ids(task)
    layer, unit = 1, 1
    pos = int((clean[0] != corrupt[0]).nonzero()[0]) + (1 if kind == "k" else 4)
    pat, hp = HookPoint("pattern", layer), HookPoint(kind, layer)
    src, _ = _record(llama, clean, [hp])
    base, _ = _record(llama, corrupt, [pat])
    patched, _ = _record(llama, corrupt, [pat], {hp: [_site_hook(kind, unit, pos, src[hp])]})
    # gradient of the metric at the base pattern, from a pattern hook that swaps in a leaf
    leaf = base[pat].clone().requires_grad_(True)
    out = llama.runner.forward(corrupt, hooks={pat: [lambda x, c: leaf]}, explicit_attention=True)
    (G,) = torch.autograd.grad(_metric(out.logits[:, -1], ans, wr).sum(), [leaf])
    ref = float(((patched[pat] - base[pat]) * G).sum() / len(task))
    spec = SiteSpec(kind, per_unit=True, positions=[pos], layers=(layer,), units=(unit,))
    got = atp_star.run(llama, task, spec, atp_star.AtPStarConfig(grad_drop=False)).values.flatten()[0]
    plain = atp.run(llama, task, spec).values.flatten()[0]
    assert abs(ref) > 1e-4
    assert float(got) == pytest.approx(ref, rel=1e-3, abs=1e-6)
    assert abs(float(plain) - ref) > 1e-5  # the fix changed something


def test_key_fix_for_all_positions_is_joint(llama, task):
    clean, corrupt, ans, wr = _ids(task)
    layer, unit = 2, 0
    pat, hk = HookPoint("pattern", layer), HookPoint("k", layer)
    src, _ = _record(llama, clean, [hk])
    base, _ = _record(llama, corrupt, [pat])

    def all_keys(x, c):
        x = x.clone()
        x[:, :, unit] = src[hk][:, :, unit]
        return x

    patched, _ = _record(llama, corrupt, [pat], {hk: [all_keys]})
    leaf = base[pat].clone().requires_grad_(True)
    out = llama.runner.forward(corrupt, hooks={pat: [lambda x, c: leaf]}, explicit_attention=True)
    (G,) = torch.autograd.grad(_metric(out.logits[:, -1], ans, wr).sum(), [leaf])
    ref = float(((patched[pat] - base[pat]) * G).sum() / len(task))
    spec = SiteSpec("k", per_unit=True, positions=None, layers=(layer,), units=(unit,))
    got = atp_star.run(llama, task, spec, atp_star.AtPStarConfig(grad_drop=False)).values.flatten()[0]
    assert abs(ref) > 1e-5
    assert float(got) == pytest.approx(ref, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("kind,unit,pos", [("resid_pre", None, -1), ("head", 2, -1), ("mlp_out", None, -3)])
def test_graddrop_equals_explicit_stop_gradient_passes(llama, task, kind, unit, pos):
    clean, corrupt, ans, wr = _ids(task)
    L = llama.dims.n_layers
    layer = 0 if kind != "resid_pre" else 1
    hp = HookPoint(kind, layer)
    src, _ = _record(llama, clean, [hp])
    total = torch.zeros(len(task))
    for drop in range(L):
        acts = {}

        def rec(x, c, acts=acts):
            acts["a"] = x
            return None

        det = {HookPoint("attn_out", drop): [lambda x, c: x.detach()], HookPoint("mlp_out", drop): [lambda x, c: x.detach()]}
        hooks = {k: list(v) for k, v in det.items()}
        hooks.setdefault(hp, []).append(rec)
        hooks.setdefault(HookPoint("embed", None), []).insert(0, lambda x, c: x.detach().requires_grad_(True))
        out = llama.runner.forward(corrupt, hooks=hooks)
        val = _metric(out.logits[:, -1], ans, wr).sum()
        a = acts["a"]
        g = torch.autograd.grad(val, [a], allow_unused=True)[0] if a.requires_grad else None
        g = torch.zeros_like(a) if g is None else g
        prod = (src[hp] - acts["a"].detach()) * g
        cell = prod[:, pos, unit].sum(-1) if unit is not None else prod[:, pos].sum(-1)
        total += cell.abs()
    ref = float((total / (L - 1)).mean())
    spec = SiteSpec(kind, per_unit=unit is not None, positions=[pos], layers=(layer,), units=None if unit is None else (unit,))
    s = atp_star.run(llama, task, spec, atp_star.AtPStarConfig(qk_fix=False, grad_drop=True))
    assert s.value_name == "contribution"
    assert ref > 1e-4
    assert float(s.values.flatten()[0]) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    signed = atp.run(llama, task, spec).values.flatten()[0]
    torch.testing.assert_close(s.extras["signed"].flatten()[0], signed, atol=1e-6, rtol=1e-5)


# -- integrated gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        SiteSpec("mlp_out", positions=None, layers=(1,)),
        SiteSpec("resid_pre", positions=[9], layers=(1,)),
        SiteSpec("head", per_unit=False, positions=[-1], layers=(1,)),
    ],
)
def test_ig_site_path_converges_to_exact_effect(llama, task, spec):
    exact = ap.run(llama, task, spec)
    est = ig.run(llama, task, spec, ig.IGConfig(steps=48, path="site", rule="midpoint"))
    one = atp.run(llama, task, spec)
    assert float(exact.values.abs().max()) > 1e-2
    torch.testing.assert_close(est.values, exact.values, atol=2e-3, rtol=5e-3)
    # non-vacuous: the first-order estimate is measurably off on these sites
    assert float((one.values - exact.values).abs().max()) > 5e-3


def test_ig_inputs_path_is_complete_at_the_embedding(llama, task):
    s = ig.run(llama, task, SiteSpec("embed", positions=None), ig.IGConfig(steps=48, rule="midpoint"))
    gap = s.baselines["clean"] - s.baselines["corrupt"]
    assert abs(gap) > 1e-2
    assert float(s.values) == pytest.approx(gap, rel=5e-3, abs=1e-3)


def test_ig_one_left_step_is_atp(llama, task):
    spec = SiteSpec("resid_pre", positions="all")
    torch.testing.assert_close(
        ig.run(llama, task, spec, ig.IGConfig(steps=1)).values, atp.run(llama, task, spec).values, atol=1e-5, rtol=1e-4
    )


# -- RelP ----------------------------------------------------------------------------------------------------


def _relevance_per_layer(model, ids, ans, wr, rules):
    """Σ_{pos, d} resid_pre ⊙ ĝ at every layer, per example, plus the metric (plain runner hooks)."""
    L = model.dims.n_layers
    acts = {}
    hooks = {HookPoint("embed", None): [lambda x, c: x.detach().requires_grad_(True)]}
    for li in range(L):
        hooks[HookPoint("resid_pre", li)] = [lambda x, c, li=li: acts.__setitem__(li, x)]
    out = model.runner.forward(ids, hooks=hooks, lrp=rules)
    m = _metric(out.logits[:, -1], ans, wr)
    gs = torch.autograd.grad(m.sum(), [acts[li] for li in range(L)])
    rel = torch.stack([(acts[li] * g).sum((1, 2)) for li, g in enumerate(gs)])  # [L, B]
    return rel.detach(), m.detach()


def test_relp_rules_conserve_relevance_layer_to_layer(smol_tokenizer, task):
    model = make_tiny("llama", seed=4, tokenizer=smol_tokenizer)  # no biases anywhere: exact conservation
    _, corrupt, ans, wr = _ids(task)
    rel, m = _relevance_per_layer(model, corrupt, ans, wr, LRPRules())
    assert float(m.abs().min()) > 1e-2
    torch.testing.assert_close(rel, m.expand_as(rel), atol=1e-3, rtol=1e-3)
    # plain gradient × input does not conserve (the final RMSNorm alone makes it ~0)
    plain, _ = _relevance_per_layer(model, corrupt, ans, wr, None)
    assert float((plain - m).abs().max()) > 0.1 * float(m.abs().max())
    # and every rule is active: switching any one off breaks conservation
    for off in ("norm", "act", "gate", "attention"):
        kw = {off: False}
        broken, _ = _relevance_per_layer(model, corrupt, ans, wr, LRPRules(**kw))
        assert float((broken - m).abs().max()) > 1e-2, f"rule {off!r} had no effect"


def test_relp_differs_from_atp_and_reduces_to_it_without_rules(llama, task):
    spec = SiteSpec("resid_pre", positions="all")
    a = atp.run(llama, task, spec).values
    r = relp.run(llama, task, spec).values
    assert float((a - r).abs().max()) > 1e-2
    none = relp.run(llama, task, spec, relp.RelPConfig(rules=LRPRules(False, False, False, False))).values
    torch.testing.assert_close(none, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "gemma3"])
def test_relp_leaves_model_and_classes_untouched(smol_tokenizer, task, family):
    model = make_tiny(family, seed=5, tokenizer=smol_tokenizer)
    clean, _, _, _ = _ids(task)
    params = {k: v.detach().clone() for k, v in model.hf.named_parameters()}
    flags = {k: v.requires_grad for k, v in model.hf.named_parameters()}
    forwards = {type(mod): type(mod).forward for mod in model.hf.modules()}
    with torch.no_grad():
        before = model.runner.forward(clean).logits.clone()
        lrp_logits = model.runner.forward(clean, lrp=LRPRules()).logits
        lrp_exact = model.runner.forward(clean, lrp=LRPRules(attention=False)).logits
    relp.run(model, task, SiteSpec("mlp_out", positions="all"))
    with torch.no_grad():
        after = model.runner.forward(clean).logits
        hf_after = model.hf(clean).logits
    assert torch.equal(before, after)
    torch.testing.assert_close(hf_after, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lrp_logits, before, atol=1e-4, rtol=1e-4)  # rules leave the forward values
    assert torch.equal(lrp_exact, before)  # bit-identical when attention runs the same kernel
    for k, v in model.hf.named_parameters():
        assert torch.equal(v, params[k]) and v.requires_grad == flags[k] and v.grad is None
    for cls, fwd in forwards.items():
        assert cls.forward is fwd


# -- compare ---------------------------------------------------------------------------------------------------


def test_correlation_helpers_match_hand_computation():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=torch.float64)
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0], dtype=torch.float64)
    xm, ym = x - x.mean(), y - y.mean()
    assert compare.pearson(x, y) == pytest.approx(float((xm * ym).sum() / (xm.norm() * ym.norm())), rel=1e-9)
    # ranks x: 0..4, y: 1,0,3,2,4 → Spearman = 1 - 6 Σd² / (n(n²-1)) = 1 - 6·4/120 = 0.8
    assert compare.spearman(x, y) == pytest.approx(0.8, rel=1e-9)
    assert compare.spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)
    assert compare.top_k_overlap(x, -y, 2) == pytest.approx(0.5)  # by magnitude: cells {4, 3} vs {4, 2}
    assert compare.top_k_overlap(torch.tensor([3.0, 0, 0, 1]), torch.tensor([0.0, 3, 0, 1]), 1) == 0.0


def test_compare_runs_all_methods_and_saves(llama, task, tmp_path):
    specs = [SiteSpec("resid_pre", positions="all"), SiteSpec("head", per_unit=True)]
    res = compare.run(llama, task, specs, ["atp", "atp_star", "ig", "relp"], out_dir=tmp_path)
    rep, scores = res.report, res.scores
    assert set(scores) == {"activation_patching", "atp", "atp_star", "ig", "relp"}
    assert set(rep["kinds"]) == {"resid_pre", "head"}
    for _kind, row in rep["kinds"].items():
        for name in ("atp", "atp_star", "ig", "relp"):
            assert -1.0 <= row[name]["pearson"] <= 1.0
    # the reported correlation is the one of the saved Scores
    ex = scores["activation_patching"][0].values
    assert rep["kinds"]["resid_pre"]["atp"]["pearson"] == pytest.approx(compare.pearson(ex, scores["atp"][0].values))
    assert rep["kinds"]["head"]["atp_star"]["compared_with"] == "E|effect|"
    for name in ("atp", "atp_star", "ig", "relp"):
        assert (tmp_path / f"scatter_{name}.png").stat().st_size > 1000
        loaded = compare.Scores.load(tmp_path / name / "head")
        assert loaded.axes == scores["activation_patching"][1].axes
    assert (tmp_path / "report.json").is_file()
    assert rep["time_vs_forward_pair"]["atp"] > 0


def test_cli_site_items_carry_their_own_positions():
    from patchtrace.cli.compare import parse_site_items

    specs = parse_site_items("resid_pre@all,head@last,mlp_out", "none", "0-1")
    assert [(s.kind, s.per_unit, s.positions, s.layers) for s in specs] == [
        ("resid_pre", False, "all", (0, 1)),
        ("head", True, "last", (0, 1)),
        ("mlp_out", False, None, (0, 1)),
    ]
