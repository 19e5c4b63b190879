"""DBM mask mechanics on tiny models, each checked against an independent reference
(:func:`dbm_common.naive_patched_logits`: a plain Hugging Face forward with hooks on the HF modules)."""

from __future__ import annotations

import pytest
import torch
from dbm_common import naive_patched_logits, pairs

from conftest import make_tiny
from patchtrace.desiderata import Desideratum, Triple, tokenize_desiderata
from patchtrace.methods import dbm
from patchtrace.results import Scores
from patchtrace.sites import Site, SiteSpec


@pytest.fixture(scope="module")
def llama(smol_tokenizer):
    return make_tiny("llama", seed=1, tokenizer=smol_tokenizer)


def _td(model, n=6, seed=0, target=" the"):
    d = Desideratum("v", [Triple(o, a, target) for o, a in pairs(n, seed)])
    (td,) = tokenize_desiderata([d], model.tokenizer)
    return td


def test_mixing_endpoints_match_original_and_patched_runs(llama):
    td = _td(llama)
    ids_o, ids_a = td.ids("original", range(len(td))), td.ids("alternate", range(len(td)))
    layer = 1
    comps = [Site("head", layer, u, -1) for u in range(llama.dims.n_heads)] + [Site("mlp_out", 2, None, -1)]
    (g,) = dbm.prepare(llama, [td], comps)
    m0 = torch.zeros(len(comps))
    m1 = torch.zeros(len(comps))
    m1[: llama.dims.n_heads] = 1.0  # every head of layer 1 = the layer's full head site
    with torch.no_grad():
        at0 = dbm.masked_logits(llama, g, m0)
        at1 = dbm.masked_logits(llama, g, m1)
        half = dbm.masked_logits(llama, g, m1 * 0.5)
        orig = llama.hf(input_ids=ids_o).logits[:, -1].float()
    patched = naive_patched_logits(llama, ids_o, ids_a, comps[: llama.dims.n_heads])
    assert (patched - orig).abs().max() > 1e-2  # non-vacuous: the patch changes the output
    torch.testing.assert_close(at0, orig, atol=1e-5, rtol=0)
    torch.testing.assert_close(at1, patched, atol=1e-5, rtol=0)
    assert (half - orig).abs().max() > 1e-3 and (half - patched).abs().max() > 1e-3


def test_mixing_at_several_positions_matches_full_forward(llama):
    """Masks at earlier positions: the suffix-only run equals a full forward with the same mixing."""
    td = _td(llama, n=4, seed=5)
    comps = [Site("mlp_out", 0, None, -3), Site("head", 1, 2, -2), Site("attn_out", 2, None, -1)]
    (g,) = dbm.prepare(llama, [td], comps)
    m = torch.tensor([0.7, 0.4, 0.9])
    ids_o, ids_a = td.ids("original", range(4)), td.ids("alternate", range(4))
    T = ids_o.shape[1]
    from patchtrace.sites import HookPoint

    alt = {}

    def rec(hp):
        def fn(x, ctx):
            alt[hp] = x.detach().clone()
        return fn

    pts = [c.point for c in comps]
    with torch.no_grad():
        llama.runner.forward(ids_a, hooks={hp: [rec(hp)] for hp in pts})

    def mix(hp, pos, unit, w):
        def fn(x, ctx):
            x = x.clone()
            if unit is None:
                x[:, T + pos] = w * alt[hp][:, T + pos] + (1 - w) * x[:, T + pos]
            else:
                x[:, T + pos, unit] = w * alt[hp][:, T + pos, unit] + (1 - w) * x[:, T + pos, unit]
            return x
        return fn

    hooks = {HookPoint(c.kind, c.layer): [mix(c.point, c.pos, c.unit, float(w))] for c, w in zip(comps, m)}
    with torch.no_grad():
        ref = llama.runner.forward(ids_o, hooks=hooks).logits[:, -1].float()
        got = dbm.masked_logits(llama, g, m)
        plain = llama.runner.forward(ids_o).logits[:, -1].float()
    assert (ref - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_gradients_reach_the_mask(llama):
    td = _td(llama)
    comps = dbm.components(llama, dbm.parse_specs("head,mlp_out"))
    (g,) = dbm.prepare(llama, [td], comps)
    m = torch.full((len(comps),), 0.3, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(dbm.masked_logits(llama, g, m), g.target)
    loss.backward()
    assert m.grad is not None and torch.isfinite(m.grad).all()
    assert (m.grad.abs() > 1e-6).sum() >= len(comps) // 2
    assert all(p.grad is None for p in llama.hf.parameters())


def test_binary_mask_evaluation_matches_naive_hooks(llama):
    td = _td(llama, n=5, seed=2)
    sets = [
        [Site("head", 0, 1, -1), Site("head", 2, 3, -1), Site("mlp_out", 1, None, -1)],
        [Site("head", 1, 0, -1)],
        [],
    ]
    got = dbm.site_set_margins(llama, td, sets)
    ids_o, ids_a = td.ids("original", range(5)), td.ids("alternate", range(5))
    for i, ss in enumerate(sets):
        logits = naive_patched_logits(llama, ids_o, ids_a, ss) if ss else llama.hf(input_ids=ids_o).logits[:, -1].float().detach()
        t = td.target
        ref = logits.gather(1, t[:, None]).squeeze(1) - logits.scatter(1, t[:, None], float("-inf")).max(-1).values
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)
    assert (got[0] - got[2]).abs().max() > 1e-3  # the patch changes the margins


def _planted(smol_tokenizer, layer=2, head=1, scale=25.0):
    """A tiny Llama whose head (layer, head) writes ×scale into the residual: patching that head alone
    decides the output. Tuples keep only pairs where that single-head patch changes the argmax; the
    target is that patched argmax, computed by the naive HF-hook reference."""
    model = make_tiny("llama", seed=3, tokenizer=smol_tokenizer)
    d = model.dims.d_head
    with torch.no_grad():
        model.hf.model.layers[layer].self_attn.o_proj.weight[:, head * d : (head + 1) * d] *= scale
    triples = []
    planted = Site("head", layer, head, -1)
    for o, a in pairs(80, seed=7):
        io = torch.tensor([smol_tokenizer(o).input_ids])
        ia = torch.tensor([smol_tokenizer(a).input_ids])
        if io.shape != ia.shape:
            continue
        p = naive_patched_logits(model, io, ia, [planted])[0]
        base = model.hf(input_ids=io).logits[0, -1].detach()
        if int(p.argmax()) != int(base.argmax()):
            triples.append(Triple(o, a, smol_tokenizer.decode([int(p.argmax())])))
    return model, planted, triples


@pytest.fixture(scope="module")
def planted_problem(smol_tokenizer):
    return _planted(smol_tokenizer)


def test_trained_mask_finds_the_planted_head(smol_tokenizer, planted_problem, tmp_path):
    model, planted, triples = planted_problem
    assert len(triples) >= 12
    # decoded targets must round-trip to single tokens
    good = [t for t in triples if len(smol_tokenizer(t.target, add_special_tokens=False).input_ids) == 1]
    d = Desideratum("carrier", good[:24])
    cfg = dbm.DBMConfig(lam=0.02, steps=60, lr=0.05, baseline=True)
    ranked: list[tuple[int, int]] = []
    mask = dbm.run(model, [d], "head,mlp_out", cfg, on_ranking_progress=lambda done, total: ranked.append((done, total)))
    ev = mask.evaluation
    assert mask.kept == (planted,)
    # the exact-patching baseline reports its sweep (it was silent): it counts up to its total, one patch per
    # component per length group of the desideratum
    n_comps = model.dims.n_layers * (model.dims.n_heads + 1)
    assert ranked and ranked[-1][0] == ranked[-1][1] and ranked[-1][1] % n_comps == 0
    assert [d for d, _ in ranked] == sorted(d for d, _ in ranked)
    assert ev["accuracy"] == 1.0 and ev["unpatched_accuracy"] == 0.0
    views = mask.to_scores()
    assert views["head"].extras["binary"][planted.layer, planted.unit] == 1.0
    assert views["head"].extras["binary"].sum() == 1.0 and views["mlp_out"].extras["binary"].sum() == 0.0
    assert views["head"].top_k(1)[0][0] == planted  # the view's grid names the model's sites
    # the loss went down while the mask stayed sparse
    h = mask.history["task"]
    assert len(h) == 60 and h[-1] < h[0]

    # save / load round trip of the mask, and the per-kind Scores views next to it
    mask.save(tmp_path / "m")
    back = dbm.Mask.load(tmp_path / "m")
    assert back.sites == mask.sites and back.kept == (planted,) and back.evaluation == ev
    assert back.config == mask.config and back.specs == mask.specs
    for a, b in ((back.mask, mask.mask), (back.binary, mask.binary), (back.baseline_score, mask.baseline_score)):
        torch.testing.assert_close(a, b)
    for k, v in mask.history.items():
        torch.testing.assert_close(back.history[k], v)
    assert len(back.sites) == len(back.mask) == model.dims.n_layers * (model.dims.n_heads + 1)
    assert back.sites[int(back.binary.argmax())] == planted
    head_view = Scores.load(tmp_path / "m" / "head")
    torch.testing.assert_close(head_view.values, views["head"].values)
    assert head_view.value_name == "mask" and head_view.provenance["method"] == "dbm"


@pytest.mark.parametrize(("param", "lam"), [("sigmoid", 0.1), ("hard_concrete", 0.05)])
def test_other_parametrizations_find_the_planted_head(smol_tokenizer, planted_problem, param, lam):
    model, planted, triples = planted_problem
    good = [t for t in triples if len(smol_tokenizer(t.target, add_special_tokens=False).input_ids) == 1]
    cfg = dbm.DBMConfig(lam=lam, steps=80, lr=0.1, parametrization=param, baseline=False)
    mask = dbm.run(model, [Desideratum("carrier", good[:24])], SiteSpec("head", per_unit=True), cfg)
    assert mask.kept == (planted,)


def test_bad_requests_raise_clear_errors(llama):
    with pytest.raises(dbm.DBMError, match="cannot be masked"):
        dbm.components(llama, [SiteSpec("pattern", per_unit=True)])
    with pytest.raises(dbm.DBMError, match="positions='all'"):
        dbm.components(llama, [SiteSpec("head", per_unit=True, positions="all")])
    with pytest.raises(dbm.DBMError, match="parametrization"):
        dbm.DBMConfig(parametrization="magic")  # type: ignore[arg-type]
    with pytest.raises(dbm.DBMError, match="not produced by DBM"):
        dbm.mask_from_scores(Scores(torch.zeros(2), ("layer",), "mlp_out"))
    with pytest.raises(dbm.DBMError, match="3 components"):
        dbm.Mask(tuple(Site("mlp_out", i, None, -1) for i in range(3)), torch.zeros(3), torch.zeros(2), (), {}, {}, {}, {})


def test_exact_ranking_matches_activation_patching(llama):
    """The baseline ranking equals noising activation patching (logit diff target vs contrast)."""
    from patchtrace.methods.activation_patching import PatchingConfig
    from patchtrace.methods.activation_patching import run as ap_run
    from patchtrace.tasks.base import Example, Task

    prs = pairs(5, seed=11)
    d = Desideratum("v", [Triple(o, a, " the", contrast=" cat") for o, a in prs])
    (td,) = tokenize_desiderata([d], llama.tokenizer)
    ranking = dict(dbm.exact_patching_ranking(llama, [td], [SiteSpec("head", per_unit=True)]))
    task = Task("t", [Example(o, a, " the", " cat") for o, a in prs])
    ap = ap_run(llama, task, SiteSpec("head", per_unit=True), PatchingConfig(direction="noise"))
    for L in range(llama.dims.n_layers):
        for h in range(llama.dims.n_heads):
            assert ranking[Site("head", L, h, -1)] == pytest.approx(float(ap.values[L, h]), abs=1e-5)
    assert max(abs(v) for v in ranking.values()) > 1e-3
