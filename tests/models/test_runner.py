"""The runner and its stages against the plain Hugging Face forward (never against themselves).

* The public stages, composed by hand in the documented order, reproduce the HF logits on every
  tiny family: the engine relies on exactly this composition for its joining rows.
* Gemma 3's site meaning: ``attn_out``/``mlp_out`` are what is added to the residual stream, i.e. the
  HF post-norms' outputs (recorded here with hooks on the HF modules).
* Sliding-window layers are exact beyond the window (Gemma 3, Mistral, Qwen2), also when a call
  resumes after a cached prefix, and the window matters (removing it changes the logits).
* RelP's LRP rules conserve relevance through Gemma 3's post-norms and logit soft-cap.
* Every refusal is a PatchtraceError that names the item.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY_FAMILIES, make_tiny, tiny_config
from patchtrace import PatchtraceError
from patchtrace.metrics import Metric
from patchtrace.models.adapters import UnsupportedModelError, dims_for, family_for
from patchtrace.models.load import wrap_model
from patchtrace.models.runner import LRPRules, RunnerError
from patchtrace.sites import HookPoint

TOL = 1e-5
VOCAB = 512


def _ids(T: int = 14, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model.hf(ids).logits


def _by_stages(model, ids):
    """The block composed from the public stage methods, in the documented order."""
    r = model.runner
    h = r.embed(ids)
    rope = r.rope(h, 0)
    for li in range(model.dims.n_layers):
        q, k, v = r.qkv(li, r.attn_in(li, h), rope)
        attn_out = r.attn_out(li, r.attend(li, q, k, v))
        if model.dims.parallel_residual:
            h = r.resid_post(h, r.mlp_out(li, r.mlp_hidden(li, r.mlp_in(li, h))), attn_out)
        else:
            mid = r.add_attn(h, attn_out)
            h = r.resid_post(mid, r.mlp_out(li, r.mlp_hidden(li, r.mlp_in(li, mid))))
    return r.unembed(h)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_stages_composed_by_hand_match_the_hf_forward(family):
    model = make_tiny(family, vocab=VOCAB)
    ids = _ids()
    with torch.no_grad():
        got = _by_stages(model, ids)
        fwd = model.runner.forward(ids).logits
    ref = _hf_logits(model, ids)
    assert float(ref.abs().max()) > 0.1
    assert float((got - ref).abs().max()) < TOL
    assert float((fwd - ref).abs().max()) < TOL


def test_gemma3_sublayer_outputs_are_the_post_norm_outputs():
    model = make_tiny("gemma3", vocab=VOCAB)
    ids = _ids()
    rec: dict[HookPoint, torch.Tensor] = {}

    def recorder(hp):
        return lambda x, c: rec.__setitem__(hp, x)

    points = [HookPoint(k, li) for k in ("attn_out", "mlp_out", "head", "neuron") for li in range(3)]
    hooks = {hp: [recorder(hp)] for hp in points}
    hf_rec: dict[str, torch.Tensor] = {}
    handles = []
    for li, blk in enumerate(model.hf.model.layers):
        def out(name):
            return lambda mod, a, o: hf_rec.__setitem__(name, o[0] if isinstance(o, tuple) else o)

        def inp(name):
            return lambda mod, a: hf_rec.__setitem__(name, a[0])

        handles += [blk.post_attention_layernorm.register_forward_hook(out(f"attn_out{li}")),
                    blk.post_feedforward_layernorm.register_forward_hook(out(f"mlp_out{li}")),
                    blk.self_attn.register_forward_hook(out(f"pre_norm_attn{li}")),
                    blk.self_attn.o_proj.register_forward_pre_hook(inp(f"head{li}")),
                    blk.mlp.down_proj.register_forward_pre_hook(inp(f"neuron{li}"))]
    try:
        _hf_logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        model.runner.forward(ids, hooks=hooks)
    for li in range(3):
        for k in ("attn_out", "mlp_out", "head", "neuron"):
            torch.testing.assert_close(rec[HookPoint(k, li)].flatten(2), hf_rec[f"{k}{li}"], atol=TOL, rtol=0)
        # non-vacuous: the post-norm really changes the attention output
        assert float((hf_rec[f"pre_norm_attn{li}"] - hf_rec[f"attn_out{li}"]).abs().max()) > 0.1


def _windowed(kind: str):
    common = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                  vocab_size=VOCAB, num_key_value_heads=2)
    if kind == "gemma3":
        return tiny_config("gemma3", VOCAB)
    from transformers import MistralConfig, Qwen2Config

    if kind == "mistral":
        return MistralConfig(**common, sliding_window=5)
    return Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1)


@pytest.mark.parametrize("kind", ["gemma3", "mistral", "qwen2"])
def test_sliding_window_layers_are_exact_beyond_the_window(kind):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _windowed(kind)
    cfg.initializer_range = 0.2
    model = wrap_model(AutoModelForCausalLM.from_config(cfg).eval())
    ids = _ids(T=14)
    assert any(w is not None and w < 14 for w in model.dims.layer_windows)
    ref = _hf_logits(model, ids)
    p = 9
    with torch.no_grad():
        full = model.runner.forward(ids, keep_kv=True)
        past = [(k[:, :, :p], v[:, :, :p]) for k, v in full.kv]
        suffix = model.runner.forward(ids[:, p:], pos_offset=p, past_kv=past).logits
        explicit = model.runner.forward(ids, explicit_attention=True).logits
        model.runner.dims = dataclasses.replace(model.dims, layer_windows=(None,) * 3)
        unwindowed = model.runner.forward(ids).logits
    assert float((full.logits - ref).abs().max()) < TOL
    assert float((explicit - ref).abs().max()) < TOL
    assert float((suffix - ref[:, p:]).abs().max()) < TOL
    assert float((unwindowed - ref).abs().max()) > 1e-2  # the window matters: the test can fail


def _relevance(model, ids, ans, wr, rules):
    """Σ resid_pre ⊙ ĝ per layer and example, and the metric."""
    acts = {}
    hooks = {HookPoint("embed", None): [lambda x, c: x.detach().requires_grad_(True)]}
    for li in range(model.dims.n_layers):
        hooks[HookPoint("resid_pre", li)] = [lambda x, c, li=li: acts.__setitem__(li, x)]
    out = model.runner.forward(ids, hooks=hooks, lrp=rules)
    m = Metric("logit_diff").score(out.logits[:, -1], ans, wr)
    gs = torch.autograd.grad(m.sum(), [acts[li] for li in range(model.dims.n_layers)])
    return torch.stack([(acts[li] * g).sum((1, 2)) for li, g in enumerate(gs)]).detach(), m.detach()


def test_relp_rules_conserve_relevance_through_post_norms_and_soft_cap():
    model = make_tiny("gemma3", seed=4, vocab=VOCAB)
    assert model.family.post_norms and model.dims.final_softcap is not None
    ids = _ids(B=3, seed=1)
    ans, wr = torch.tensor([[5], [6], [7]]), torch.tensor([[8], [9], [10]])
    rel, m = _relevance(model, ids, ans, wr, LRPRules())
    assert float(m.abs().min()) > 1e-2
    torch.testing.assert_close(rel, m.expand_as(rel), atol=1e-3, rtol=1e-3)
    for off in ("norm", "act", "gate", "attention"):  # each rule is needed: switching one off breaks it
        broken, _ = _relevance(model, ids, ans, wr, LRPRules(**{off: False}))
        assert float((broken - m).abs().max()) > 1e-2, off


@pytest.mark.parametrize(
    "option,value",
    [("attn_logit_softcapping", 50.0), ("use_bidirectional_attention", True)],
)
def test_gemma3_options_not_implemented_are_refused_by_name(option, value):
    cfg = tiny_config("gemma3", VOCAB)
    setattr(cfg, option, value)
    with pytest.raises(UnsupportedModelError, match=option):
        dims_for(cfg, family_for(cfg))


def test_unknown_layer_type_is_refused_by_name():
    cfg = tiny_config("gemma3", VOCAB)
    cfg.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        dims_for(cfg, family_for(cfg))


def test_runner_errors_are_patchtrace_errors_naming_the_item():
    model = make_tiny("gemma3", vocab=VOCAB)
    neox = make_tiny("gpt_neox", vocab=VOCAB)
    ids = _ids()
    h = torch.zeros(2, 14, 64)
    cases = [
        (lambda: model.runner.forward(), "ids or resid"),
        (lambda: model.runner.forward(ids, start_layer=1), "layer 1"),
        (lambda: model.runner.forward(resid=h, start_layer=2, stop_layer=5), "2..5"),
        (lambda: model.runner.forward(resid=h, start_layer=2, joins={("pre", 1): h}), r"\('pre', 1\)"),
        (lambda: neox.runner.forward(ids, joins={("mid", 1): h}), "parallel"),
        (lambda: neox.runner.add_attn(h, h), "parallel"),
        (lambda: neox.runner.resid_post(h, h), "needs attn_out"),
        (lambda: model.runner.resid_post(h, h, h), "sequential"),
    ]
    with torch.no_grad():
        full = model.runner.forward(ids, keep_kv=True)
    past = [(k[:, :, :4], v[:, :, :4]) for k, v in full.kv]  # a prefix of 2 rows ...
    five = ids[:, 4:].repeat(3, 1)[:5]  # ... cannot be shared by 5 rows
    cases.append((lambda: model.runner.forward(five, pos_offset=4, past_kv=past), "not a multiple"))
    with torch.no_grad():
        for fn, msg in cases:
            with pytest.raises(RunnerError, match=msg) as e:
                fn()
            assert isinstance(e.value, PatchtraceError) and isinstance(e.value, ValueError)


def test_the_engines_memory_plan_is_the_runners_estimate(monkeypatch):
    """plan_sweep and the chunking ask the runner what a row and a recorded run allocate."""
    from patchtrace.engine.sweep import EngineError, Patch, patches_per_chunk, plan_sweep
    from patchtrace.sites import Site

    model = make_tiny("gemma3", vocab=VOCAB)
    asked = []
    monkeypatch.setattr(model.runner, "row_bytes", lambda n, T, ncols, dtype: asked.append((n, T)) or 1000)
    cached = []

    def cache_bytes(n_rows, T, dtype, n_pos=None, kv=True):
        cached.append((n_rows, T, n_pos, kv))
        return 7_000_000 * n_rows if kv else 5_000_000 * n_rows

    monkeypatch.setattr(model.runner, "cache_bytes", cache_bytes)
    plan = plan_sweep(model, [Patch((Site("resid_pre", 1, None, 5),))], 4, 14, max_memory=10**9)
    assert (9, 14) in asked  # positions 5..13 of a 14-token prompt
    # the base run from position 5 with keys/values, the source run from 5 without
    assert sorted(cached) == [(4, 14, 9, False), (4, 14, 9, True)]
    assert plan.peak_bytes == 4 * 7_000_000 + 4 * 5_000_000 + 4 * 1000  # base + source caches, 4 rows of 1000
    cached.clear()
    plain = plan_sweep(model, [Patch((Site("resid_pre", 1, None, 5),))], 4, 14, max_memory=10**9, fast=False)
    # the plain path records the same two runs (from the patched position); its rows compute all 14
    assert sorted(cached) == [(4, 14, 9, False), (4, 14, 9, True)] and (14, 14) in asked
    assert plain.peak_bytes == 4 * 7_000_000 + 4 * 5_000_000 + 4 * 1000
    assert patches_per_chunk(model, 9, 14, None, 4, budget=8000) == 2
    with pytest.raises(EngineError, match="memory budget"):
        patches_per_chunk(model, 9, 14, None, 4, budget=3999)
