"""DBM mask mechanics on tiny models, each checked against an independent reference written here:
a plain Hugging Face forward with hooks on the HF modules (o_proj input for heads, the MLP output)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_tiny
from patchtrace.desiderata import Desideratum, Triple, tokenize_desiderata
from patchtrace.methods import dbm
from patchtrace.results import Scores
from patchtrace.sites import Site, SiteSpec

WORDS = "the cat sat on a mat while dogs ran far away from big red houses near old green trees".split()


def _pairs(n: int, seed: int, length: int = 7) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a = rng.choices(WORDS, k=length)
        b = list(a)
        for i in rng.sample(range(length), 3):
            b[i] = rng.choice(WORDS)
        if a != b:
            out.append((" ".join(a), " ".join(b)))
    return out


def _naive(model, ids_o: torch.Tensor, ids_a: torch.Tensor, sites: list[Site]) -> torch.Tensor:
    """Last-position logits of the HF forward on ``ids_o`` with ``sites`` (pos -1) replaced by their
    values on ``ids_a``: heads at the o_proj input, mlp_out at the MLP module output."""
    hf = model.hf
    layers = hf.model.layers
    d_head = model.dims.d_head
    rec: dict[tuple[str, int], torch.Tensor] = {}

    def run(ids, mode):
        handles = []
        for s in sites:
            L = s.layer
            if s.kind == "head":
                def pre(mod, args, L=L, u=s.unit):
                    z = args[0]
                    if mode == "rec":
                        rec[("head", L)] = z.detach().clone()
                        return None
                    z = z.clone()
                    sl = slice(u * d_head, (u + 1) * d_head)
                    z[:, -1, sl] = rec[("head", L)][:, -1, sl]
                    return (z,)
                handles.append(layers[L].self_attn.o_proj.register_forward_pre_hook(pre))
            elif s.kind == "mlp_out":
                def post(mod, args, out, L=L):
                    if mode == "rec":
                        rec[("mlp", L)] = out.detach().clone()
                        return None
                    out = out.clone()
                    out[:, -1] = rec[("mlp", L)][:, -1]
                    return out
                handles.append(layers[L].mlp.register_forward_hook(post))
            else:
                raise AssertionError(s.kind)
        try:
            with torch.no_grad():
                return hf(input_ids=ids).logits[:, -1].float()
        finally:
            for h in handles:
                h.remove()

    run(ids_a, "rec")
    return run(ids_o, "patch")


@pytest.fixture(scope="module")
def llama(smol_tokenizer):
    return make_tiny("llama", seed=1, tokenizer=smol_tokenizer)


def _td(model, n=6, seed=0, target=" the"):
    d = Desideratum("v", [Triple(o, a, target) for o, a in _pairs(n, seed)])
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
    patched = _naive(llama, ids_o, ids_a, comps[: llama.dims.n_heads])
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
        logits = _naive(llama, ids_o, ids_a, ss) if ss else llama.hf(input_ids=ids_o).logits[:, -1].float().detach()
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
    for o, a in _pairs(80, seed=7):
        io = torch.tensor([smol_tokenizer(o).input_ids])
        ia = torch.tensor([smol_tokenizer(a).input_ids])
        if io.shape != ia.shape:
            continue
        p = _naive(model, io, ia, [planted])[0]
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
    scores = dbm.run(model, [d], "head,mlp_out", cfg)
    ev = scores.provenance["evaluation"]
    assert scores.provenance["kept"] == [str(planted)]
    assert ev["accuracy"] == 1.0 and ev["unpatched_accuracy"] == 0.0
    assert scores.extras["binary.head"][planted.layer, planted.unit] == 1.0
    assert scores.extras["binary.head"].sum() == 1.0 and scores.extras["binary.mlp_out"].sum() == 0.0
    # the loss went down while the mask stayed sparse
    h = scores.extras["history.task"]
    assert h[-1] < h[0]

    # save / load round trip of the mask and the Scores
    scores.save(tmp_path / "m")
    back = Scores.load(tmp_path / "m")
    torch.testing.assert_close(back.values, scores.values)
    for k, v in scores.extras.items():
        torch.testing.assert_close(back.extras[k], v)
    res = dbm.load_mask(tmp_path / "m")
    assert res.kept == [planted] and res.evaluation == ev
    assert len(res.sites) == len(res.mask) == model.dims.n_layers * (model.dims.n_heads + 1)
    assert res.sites[int(res.binary.argmax())] == planted


@pytest.mark.parametrize(("param", "lam"), [("sigmoid", 0.1), ("hard_concrete", 0.05)])
def test_other_parametrizations_find_the_planted_head(smol_tokenizer, planted_problem, param, lam):
    model, planted, triples = planted_problem
    good = [t for t in triples if len(smol_tokenizer(t.target, add_special_tokens=False).input_ids) == 1]
    cfg = dbm.DBMConfig(lam=lam, steps=80, lr=0.1, parametrization=param, baseline=False)
    scores = dbm.run(model, [Desideratum("carrier", good[:24])], SiteSpec("head", per_unit=True), cfg)
    assert scores.provenance["kept"] == [str(planted)]


def test_bad_requests_raise_clear_errors(llama):
    with pytest.raises(dbm.DBMError, match="cannot be masked"):
        dbm.components(llama, [SiteSpec("pattern", per_unit=True)])
    with pytest.raises(dbm.DBMError, match="positions='all'"):
        dbm.components(llama, [SiteSpec("head", per_unit=True, positions="all")])
    with pytest.raises(dbm.DBMError, match="parametrization"):
        dbm.DBMConfig(parametrization="magic")  # type: ignore[arg-type]
    with pytest.raises(dbm.DBMError, match="not produced by DBM"):
        dbm.mask_from_scores(Scores(torch.zeros(2), ("layer",), "mlp_out"))


def test_exact_ranking_matches_activation_patching(llama):
    """The baseline ranking equals noising activation patching (logit diff target vs contrast)."""
    from patchtrace.methods.activation_patching import PatchingConfig
    from patchtrace.methods.activation_patching import run as ap_run
    from patchtrace.tasks.base import Example, Task

    pairs = _pairs(5, seed=11)
    d = Desideratum("v", [Triple(o, a, " the", contrast=" cat") for o, a in pairs])
    (td,) = tokenize_desiderata([d], llama.tokenizer)
    ranking = dict(dbm.exact_patching_ranking(llama, [td], [SiteSpec("head", per_unit=True)]))
    task = Task("t", [Example(o, a, " the", " cat") for o, a in pairs])
    ap = ap_run(llama, task, SiteSpec("head", per_unit=True), PatchingConfig(direction="noise"))
    for L in range(llama.dims.n_layers):
        for h in range(llama.dims.n_heads):
            assert ranking[Site("head", L, h, -1)] == pytest.approx(float(ap.values[L, h]), abs=1e-5)
    assert max(abs(v) for v in ranking.values()) > 1e-3
