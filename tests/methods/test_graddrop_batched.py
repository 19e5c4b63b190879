"""AtP*'s GradDrop (all dropped-layer gradients carried down together) against a plain-HF reference.

The reference is written from the definition, with nothing from patchtrace's runner or estimators:
for every layer ``l`` one ordinary Hugging Face forward of the corrupt prompts in float64 with torch
hooks on the HF modules that detach what layer ``l``'s attention and MLP add to the residual stream
(the forward is unchanged; only the gradient through the block is dropped), one backward of the
logit difference, and at every site ``Î_l = Σ (a_clean − a_corrupt) · ∂M/∂a``. The score is
``Σ_l |Î_l| / (L − 1)`` per example. Query/key sites (the QK fix) use the exact pattern change of a
really patched forward times the dropped-layer gradient at the pattern. Every tiny family is checked
on whole grids (all layers, every position), so the batched streams of every depth are exercised.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import reference as ref
from conftest import TINY_FAMILIES, make_tiny
from patchtrace import SiteSpec, make_task
from patchtrace.methods import atp_star
from patchtrace.sites import Site

SEQUENTIAL_ONLY = {"resid_mid"}


@pytest.fixture(scope="module")
def task(smol_tokenizer):
    return make_task("ioi", n=3, seed=0).tokenize(smol_tokenizer)


def _model(family: str, tokenizer: Any) -> Any:
    model = make_tiny(family, seed=3, tokenizer=tokenizer)
    model.hf.double()
    return model


def _parallel(model: Any) -> bool:
    c = model.hf.config
    return c.model_type == "gpt_neox" and bool(getattr(c, "use_parallel_residual", True))


def _grads(model: Any, ids: torch.Tensor, ans: torch.Tensor, wr: torch.Tensor, kinds: list[str], drop: int | set[int],
           pattern_layer: int | None = None) -> dict[tuple[str, int | None], torch.Tensor]:
    """d(Σ logit diff)/d(site) in canonical views, the contributions of block ``drop`` (or of every
    block in the set) detached (HF hooks only)."""
    drops = {drop} if isinstance(drop, int) else drop
    rec: dict[tuple[str, int | None], torch.Tensor] = {}
    handles = []

    def out_hook(key: tuple[str, int | None], cut: bool) -> Any:
        def fn(mod: Any, args: Any, out: Any) -> Any:
            x = ref._out_tensor(out)
            if key[0] != "":
                rec[key] = x
            return ref._with_out(out, x.detach()) if cut else None

        return fn

    def in_hook(key: tuple[str, int | None]) -> Any:
        def fn(mod: Any, args: tuple, kwargs: dict) -> None:
            rec[key] = ref._in_tensor(args, kwargs)

        return fn

    L = model.hf.config.num_hidden_layers
    if "embed" in kinds:
        if ref._model_type(model) == "gpt2":
            handles.append(model.hf.transformer.drop.register_forward_pre_hook(
                lambda mod, args: rec.__setitem__(("embed", None), args[0])))
        else:
            handles.append(model.hf.get_input_embeddings().register_forward_hook(out_hook(("embed", None), False)))
    for k in range(L):
        m = ref._modules(model, k)
        handles.append(m["attn"].register_forward_hook(out_hook(("attn_out", k) if "attn_out" in kinds else ("", k), k in drops)))
        handles.append(m["mlp"].register_forward_hook(out_hook(("mlp_out", k) if "mlp_out" in kinds else ("", k), k in drops)))
        if "resid_pre" in kinds:
            handles.append(m["block"].register_forward_pre_hook(in_hook(("resid_pre", k)), with_kwargs=True))
        if "resid_post" in kinds:
            handles.append(m["block"].register_forward_hook(out_hook(("resid_post", k), False)))
        if "head" in kinds:
            handles.append(m["o"].register_forward_pre_hook(in_hook(("head", k)), with_kwargs=True))
        if "resid_mid" in kinds:
            handles.append(m["ln2"].register_forward_pre_hook(in_hook(("resid_mid", k)), with_kwargs=True))
    pat: dict[int, Any] = {}
    if pattern_layer is not None:
        pat[pattern_layer] = lambda p: rec.__setitem__(("pattern", pattern_layer), p)
    try:
        with torch.enable_grad(), (ref._pattern_attention(model, pat) if pat else torch.enable_grad()):
            logits = model.hf(ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    ar = torch.arange(ids.shape[0])
    metric = (logits[ar, ans] - logits[ar, wr]).sum()
    keys = list(rec)
    gs = torch.autograd.grad(metric, [rec[k] for k in keys], allow_unused=True)
    out = {}
    for key, x, g in zip(keys, [rec[k] for k in keys], gs, strict=True):
        g = torch.zeros_like(x) if g is None else g
        out[key] = ref._view(model, key[0], g).detach()
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_graddrop_equals_per_layer_stop_gradient_passes_on_hf(smol_tokenizer, task, family):
    model = _model(family, smol_tokenizer)
    L = model.dims.n_layers
    _check_on_hf(model, task, [{li} for li in range(L)], atp_star.AtPStarConfig(qk_fix=False), family)


@pytest.mark.parametrize("family,layers,n,drops", [
    ("llama", 5, 2, [{0, 1, 2}, {3, 4}]),
    ("llama", 5, 3, [{0, 1}, {2, 3}, {4}]),
    ("gpt_neox", 3, 2, [{0, 1}, {2}]),  # parallel blocks
    ("gemma3", 3, 2, [{0, 1}, {2}]),  # sandwich norms
])
def test_grouped_graddrop_equals_group_stop_gradient_passes_on_hf(smol_tokenizer, task, family, layers, n, drops):
    """``grad_drop_groups=n``: each group of layers detached together, ``Σ_S |Î_S| / (n − 1)``."""
    if layers == 3:
        model = _model(family, smol_tokenizer)
    else:
        from transformers import AutoModelForCausalLM

        from conftest import TINY_VOCAB, tiny_config
        from patchtrace.models.load import wrap_model

        torch.manual_seed(3)
        cfg = tiny_config(family, TINY_VOCAB)
        cfg.num_hidden_layers, cfg.initializer_range = layers, 0.2
        model = wrap_model(AutoModelForCausalLM.from_config(cfg).eval().double(), smol_tokenizer, name=f"tiny-{family}-{layers}")
    assert atp_star.layer_groups(model.dims.n_layers, n) == [(min(d), max(d)) for d in drops]
    _check_on_hf(model, task, drops, atp_star.AtPStarConfig(qk_fix=False, grad_drop_groups=n), family)


def _check_on_hf(model: Any, task: Any, drops: list[set[int]], config: Any, family: str) -> None:
    """Every site kind over whole grids against ``Σ_S |Î_S| / (len(drops) − 1)`` from HF hook passes."""
    L = model.dims.n_layers
    kinds = ["embed", "resid_pre", "resid_post", "attn_out", "mlp_out", "head"]
    if not _parallel(model):
        kinds.append("resid_mid")
    specs = [SiteSpec(k, positions="all") for k in kinds if k != "head"] + [SiteSpec("head", per_unit=True, positions="last")]
    idx = list(range(len(task)))
    clean, corrupt = task.ids("clean", idx), task.ids("corrupt", idx)
    ans, wr = task.answer[:, 0], task.wrong[:, 0]
    points = [("embed", None)] + [(k, li) for k in kinds if k != "embed" for li in range(L)]
    src = ref.hf_run(model, clean, record=points)[1]
    base = ref.hf_run(model, corrupt, record=points)[1]

    def cells(kind: str, g: dict) -> torch.Tensor:
        """Î per example and cell, in the grid's layout, for one set of gradients."""
        if kind == "embed":
            return ((src[("embed", None)] - base[("embed", None)]) * g[("embed", None)]).sum(-1)  # [N, T]
        rows = []
        for li in range(L):
            p = (src[(kind, li)] - base[(kind, li)]) * g[(kind, li)]
            rows.append(p[:, -1].sum(-1) if kind == "head" else p.sum(-1))  # [N, H] or [N, T]
        return torch.stack(rows, 1)

    total = {k: 0.0 for k in kinds}
    whole = {k: 0.0 for k in kinds}
    full = _grads(model, corrupt, ans, wr, kinds, drop=-1)
    for drop in drops:
        g = _grads(model, corrupt, ans, wr, kinds, drop)
        for k in kinds:
            total[k] = total[k] + cells(k, g).abs()
            whole[k] = whole[k] + cells(k, full).abs()
    got = atp_star.run_many(model, task, specs, config)
    order = [k for k in kinds if k != "head"] + ["head"]
    changed = 0.0
    for k, s in zip(order, got, strict=True):
        want = (total[k] / (len(drops) - 1)).float()
        assert s.value_name == "contribution"
        scale = float(want.abs().max())
        assert scale > 1e-3, k
        torch.testing.assert_close(s.per_example, want, rtol=1e-5, atol=1e-5 * scale, msg=f"{family} {k}")
        changed = max(changed, float((want - whole[k] / (len(drops) - 1)).abs().max()) / scale)
    assert changed > 1e-2  # dropping layers changed the scores: the test can tell GradDrop from plain |AtP|


@pytest.mark.parametrize("family,layer", [("llama", 1), ("gemma3", 0)])  # gemma3 layer 0: a sliding window
def test_graddrop_with_qk_fix_equals_exact_pattern_change_times_dropped_gradient(smol_tokenizer, task, family, layer):
    model = _model(family, smol_tokenizer)
    L = model.dims.n_layers
    idx = list(range(len(task)))
    clean, corrupt = task.ids("clean", idx), task.ids("corrupt", idx)
    ans, wr = task.answer[:, 0], task.wrong[:, 0]
    T = clean.shape[1]
    first = int((clean[0] != corrupt[0]).nonzero()[0])
    cases = [("k", 0, first + layer), ("k", 1, first), ("q", 2, T - 1 if layer else first), ("k", 1, None)]  # layer 0: one token
    specs = [SiteSpec(kind, per_unit=True, positions=None if pos is None else [pos], layers=(layer,), units=(unit,))
             for kind, unit, pos in cases]
    got = atp_star.run_many(model, task, specs, atp_star.AtPStarConfig(qk_fix=True, grad_drop=True))
    pk = ("pattern", layer)
    base = ref.hf_run(model, corrupt, record=[pk])[1][pk]
    G = [_grads(model, corrupt, ans, wr, [], drop, pattern_layer=layer)[pk] for drop in range(L)]
    for (kind, unit, pos), s in zip(cases, got, strict=True):
        src = ref.hf_run(model, clean, record=[(kind, layer)])[1][(kind, layer)]
        patched = ref.hf_run(model, corrupt, record=[pk], replace=[(Site(kind, layer, unit, pos), src)])[1][pk]
        change = patched - base
        per_l = torch.stack([(change * g).sum((1, 2, 3)) for g in G])  # [L, N]
        want = per_l.abs().sum(0) / (L - 1)
        assert float(want.abs().max()) > 1e-4
        assert float(per_l.std(0).max()) > 1e-5  # the dropped layers give different estimates
        torch.testing.assert_close(s.per_example.flatten(), want.float(), rtol=1e-4, atol=1e-7,
                                   msg=f"{family} {kind} unit {unit} pos {pos}")


def test_streams_split_by_the_vjp_budget_give_the_same_scores(smol_tokenizer, task, monkeypatch):
    model = _model("llama", smol_tokenizer)
    specs = [SiteSpec("resid_pre", positions="all"), SiteSpec("head", per_unit=True, positions="last")]
    whole = atp_star.run_many(model, task, specs)
    monkeypatch.setattr(atp_star, "VJP_BUDGET", 1)  # one stream per vector–Jacobian call
    split = atp_star.run_many(model, task, specs)
    for a, b in zip(whole, split, strict=True):
        assert float(a.per_example.abs().max()) > 1e-3
        torch.testing.assert_close(b.per_example, a.per_example, rtol=1e-6, atol=1e-9)


def test_layer_groups_are_contiguous_balanced_and_per_layer_when_few():
    assert atp_star.layer_groups(7, 3) == [(0, 2), (3, 4), (5, 6)]
    assert atp_star.layer_groups(30, 5) == [(0, 5), (6, 11), (12, 17), (18, 23), (24, 29)]
    assert atp_star.layer_groups(3, 5) == [(0, 0), (1, 1), (2, 2)]  # the default on a small model: per layer
    assert atp_star.layer_groups(4, None) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert atp_star.AtPStarConfig().grad_drop_groups == 5
