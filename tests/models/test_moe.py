"""Mixture of experts (Mixtral, tiny random): the runner equals the HF forward, and patching router
logits and per-expert outputs through the engine equals an independent naive reference.

The reference lives in this file and uses only the HF modules: a forward hook on ``mlp.gate`` (the
router; its output is ``(logits, top-k weights, top-k indices)`` over ``B·T`` token rows) replaces
logits and re-routes with a softmax/top-k written here; a forward hook on ``mlp.experts`` (inputs:
token rows, top-k indices and weights; output: the weighted sum) swaps one expert's contribution,
which is computed here from the 3-D expert weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patchtrace import PatchingConfig, SiteSpec, make_task
from patchtrace.engine.patch import EngineError
from patchtrace.engine.sweep import Patch, Scorer, collect, resolve, run_patches
from patchtrace.methods.activation_patching import run as patch_run
from patchtrace.metrics import Metric
from patchtrace.models.adapters import UnsupportedModelError
from patchtrace.models.load import wrap_model
from patchtrace.sites import Site, parse_site

E, K = 4, 2


def _config(vocab: int, window: int | None = None):
    from transformers import MixtralConfig

    return MixtralConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, vocab_size=vocab, num_local_experts=E, num_experts_per_tok=K,
                         sliding_window=window, initializer_range=0.2)


def _tiny(vocab: int, window: int | None = None, tokenizer=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_config(vocab, window)).eval()
    return wrap_model(hf, tokenizer, name="tiny-mixtral")


@pytest.fixture(scope="module")
def moe(smol_tokenizer):
    return _tiny(smol_tokenizer.vocab_size, tokenizer=smol_tokenizer)


# -- the naive reference --------------------------------------------------------------------------


def _reroute(logits: torch.Tensor):
    p = torch.softmax(logits.float(), -1)
    top, idx = torch.topk(p, K, -1)
    return top / top.sum(-1, keepdim=True), idx


def _contrib(experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s weighted output for token rows ``x`` (zero where it is not in the top k)."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, -1)
    y = F.linear(experts.act_fn(gate) * up, experts.down_proj[e])
    we = (w * (idx == e)).sum(-1, keepdim=True).to(y.dtype)
    return y * we


def _ref_run(model, ids, *, record=False, router=(), expert=()):
    """HF forward; ``router``: (layer, unit|None, pos, source logits [B·T, E]) replacements;
    ``expert``: (layer, e, pos, source contribution [B·T, D]). Returns (last logits, records)."""
    B, T = ids.shape
    rec: dict = {}
    handles = []
    for li, layer in enumerate(model.hf.model.layers):
        def on_gate(mod, args, out, li=li):
            logits = out[0]
            if record:
                rec[("router", li)] = logits.detach().clone()
            reps = [r for r in router if r[0] == li]
            if not reps:
                return None
            logits = logits.clone()
            for _, u, pos, src in reps:
                rows = torch.arange(B) * T + pos
                cols = slice(None) if u is None else u
                logits[rows, cols] = src[rows, cols]
            w, idx = _reroute(logits)
            return logits, w.to(out[1].dtype), idx

        def on_experts(mod, args, out, li=li):
            x, idx, w = args
            if record:
                rec[("experts", li)] = [_contrib(mod, x, idx, w, e).detach() for e in range(E)]
            reps = [r for r in expert if r[0] == li]
            if not reps:
                return None
            out = out.clone()
            for _, e, pos, src in reps:
                rows = torch.arange(B) * T + pos
                out[rows] = out[rows] - _contrib(mod, x, idx, w, e)[rows] + src[rows]
            return out

        handles.append(layer.mlp.gate.register_forward_hook(on_gate))
        handles.append(layer.mlp.experts.register_forward_hook(on_experts))
    try:
        with torch.no_grad():
            logits = model.hf(ids).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()
    return logits, rec


def _ld(last, answer, wrong):
    return last.gather(1, answer)[:, 0] - last.gather(1, wrong)[:, 0]


# -- tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 4])
def test_runner_equals_the_hf_forward_and_records_router_and_experts(window):
    model = _tiny(512, window)
    assert model.family.name == "mixtral" and (model.dims.n_experts, model.dims.top_k) == (E, K)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.runner.forward(ids).logits
        ref = model.hf(ids).logits
    assert float((ours - ref).abs().max()) < 1e-5
    run = collect(model, ids, [Site("router", 1).point, Site("expert", 1).point, Site("mlp_out", 1).point])
    _, rec = _ref_run(model, ids, record=True)
    assert torch.allclose(run.acts[Site("router", 1).point].reshape(-1, E), rec[("router", 1)], atol=1e-6)
    per = run.acts[Site("expert", 1).point]  # [B, T, E, D]
    for e in range(E):
        assert torch.allclose(per[:, :, e].reshape(18, -1), rec[("experts", 1)][e], atol=1e-6)
    assert torch.allclose(per.sum(2), run.acts[Site("mlp_out", 1).point], atol=1e-6)
    assert int((per.abs().sum(-1) > 0).sum(-1).max()) == K  # each token uses exactly k experts


def test_engine_patches_of_router_and_experts_equal_the_reference(moe):
    tok = make_task("ioi", n=2, seed=0).tokenize(moe.tokenizer)
    ids_c, ids_k = tok.ids("clean", [0, 1]), tok.ids("corrupt", [0, 1])
    T = ids_c.shape[1]
    p0 = int((ids_c[0] != ids_k[0]).nonzero()[0])
    cells = [
        (Site("router", 0, None, p0),), (Site("router", 1, 2, -1),), (Site("router", 2, None, -1),),
        (Site("expert", 0, 1, p0),), (Site("expert", 2, 3, -1),), (Site("expert", 1, 0, -1),),
        (Site("mlp_out", 1, None, -1),), (Site("router", 0, None, p0), Site("expert", 2, 1, -1)),
    ]
    patches = [Patch(tuple(resolve(s, moe, T) for s in c)) for c in cells]
    pts = {s.point for p in patches for s in p.sites}
    got = {}
    for fast in (True, False):
        clean, corrupt = collect(moe, ids_c, pts), collect(moe, ids_k, pts)
        got[fast] = run_patches(moe, ids_k, corrupt, clean, patches,
                                Scorer(Metric("logit_diff"), tok.answer, tok.wrong), fast=fast, skip_noops=False)
    _, src = _ref_run(moe, ids_c, record=True)
    base = _ld(_ref_run(moe, ids_k)[0], tok.answer, tok.wrong)
    moved = 0.0
    for i, cell in enumerate(cells):
        r = [(s.layer, s.unit, s.pos % T, src[("router", s.layer)]) for s in cell if s.kind == "router"]
        x = [(s.layer, s.unit, s.pos % T, src[("experts", s.layer)][s.unit]) for s in cell if s.kind == "expert"]
        if cell[0].kind == "mlp_out":  # all experts' outputs at once = the whole MLP output
            x = [(1, e, T - 1, src[("experts", 1)][e]) for e in range(E)]
        ref = _ld(_ref_run(moe, ids_k, router=r, expert=x)[0], tok.answer, tok.wrong)
        moved = max(moved, float((ref - base).abs().max()))
        for fast in (True, False):
            err = float((got[fast][i] - ref).abs().max())
            assert err < 1e-4, f"{[str(s) for s in cell]} fast={fast}: |engine − reference| = {err:.3g}"
    assert moved > 1e-3  # the patches do something


def test_expert_sweep_has_an_expert_axis_and_matches_the_reference(moe):
    tok = make_task("ioi", n=2, seed=0).tokenize(moe.tokenizer)
    s = patch_run(moe, tok, SiteSpec("expert", per_unit=True, positions="last", layers=(2,)),
                  PatchingConfig(sanity_check=False))
    assert s.axes == ("layer", "expert") and tuple(s.values.shape) == (1, E)
    ids_c, ids_k = tok.ids("clean", [0, 1]), tok.ids("corrupt", [0, 1])
    _, src = _ref_run(moe, ids_c, record=True)
    base = _ld(_ref_run(moe, ids_k)[0], tok.answer, tok.wrong)
    T = ids_c.shape[1]
    for e in range(E):
        ref = _ld(_ref_run(moe, ids_k, expert=[(2, e, T - 1, src[("experts", 2)][e])])[0], tok.answer, tok.wrong)
        assert abs(float(s.values[0, e]) - float((ref - base).mean())) < 1e-4, e


def test_sites_that_the_mlp_lacks_are_refused_by_name(moe, smol_tokenizer):
    from conftest import make_tiny

    with pytest.raises(EngineError, match=r"neuron\[1\].*mixture of experts.*no neuron"):
        resolve(Site("neuron", 1, 3, -1), moe, 8)
    with pytest.raises(EngineError, match="unit 4 out of range"):
        resolve(Site("expert", 1, 4, -1), moe, 8)
    llama = make_tiny("llama", tokenizer=smol_tokenizer)
    with pytest.raises(EngineError, match=r"router\[0\].*one dense MLP"):
        resolve(Site("router", 0, None, -1), llama, 8)
    assert str(Site("expert", 2, 1, -1)) == "expert[2].e1@-1" and parse_site("expert[2].e1@-1") == Site("expert", 2, 1, -1)


def test_unsupported_moe_options_are_refused_by_name():
    from transformers import AutoModelForCausalLM

    cfg = _config(512)
    cfg.num_experts_per_tok = 5
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=5 with 4 experts"):
        wrap_model(AutoModelForCausalLM.from_config(_config(512)).__class__(cfg))


def test_atp_on_expert_sites_equals_a_first_order_reference(moe):
    """AtP's estimate for expert ``e`` at the last position is ``(clean_e − corrupt_e) · ∂M/∂mlp_out``:
    the expert outputs add up to the MLP output. The gradient comes from HF autograd here (a hook on
    each layer's ``mlp`` output), the expert outputs from the reference hooks above."""
    from patchtrace.methods import atp

    tok = make_task("ioi", n=2, seed=0).tokenize(moe.tokenizer)
    s = atp.run(moe, tok, SiteSpec("expert", per_unit=True, positions="last"))
    ids_c, ids_k = tok.ids("clean", [0, 1]), tok.ids("corrupt", [0, 1])
    _, src = _ref_run(moe, ids_c, record=True)
    _, base = _ref_run(moe, ids_k, record=True)
    outs: dict[int, torch.Tensor] = {}
    hs = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: (o.retain_grad(), outs.__setitem__(i, o))[1])
          for i, layer in enumerate(moe.hf.model.layers)]
    try:
        _ld(moe.hf(ids_k).logits[:, -1].float(), tok.answer, tok.wrong).sum().backward()
    finally:
        for h in hs:
            h.remove()
        moe.hf.zero_grad(set_to_none=True)
    T = ids_c.shape[1]
    for li in range(3):
        g = outs[li].grad[:, -1]  # [B, D]
        for e in range(E):
            diff = (src[("experts", li)][e] - base[("experts", li)][e]).view(2, T, -1)[:, -1]
            want = float((diff * g).sum(-1).mean())
            assert abs(float(s.values[li, e]) - want) < 1e-4, (li, e, float(s.values[li, e]), want)
    assert float(s.values.abs().max()) > 1e-3
