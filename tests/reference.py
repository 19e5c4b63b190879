"""An independent, naive reference for activation patching and causal tracing.

Nothing here uses patchtrace's runner or engine. Every patched number comes from the plain Hugging
Face forward (``model.hf(ids).logits``) with torch forward hooks / pre-hooks registered on the HF
modules for the duration of one call (removed in ``finally``), one full forward per patch. The
attention pattern is reached through a test-only eager attention function registered with
transformers' ``AttentionInterface`` and switched on only inside :func:`_pattern_attention`.

Where each site lives in the HF modules (per family):

============  ===============================================================================
embed         output of the token embedding (Gemma's embedding module already scales it); GPT-2:
              input of ``transformer.drop`` (= wte + wpe)
resid_pre     decoder layer input
resid_mid     input of the norm entering the MLP (sequential blocks); *patched* by rewriting the
              attention output to ``source_mid − layer_input`` so the residual branch carries it too
resid_post    decoder layer output
attn_out      what the attention adds to the residual stream: attention module output[0]; Gemma 3
              (sandwich norms): output of ``post_attention_layernorm``
mlp_out       what the MLP adds: MLP module output; Gemma 3: output of ``post_feedforward_layernorm``
head          input of the attention output projection, split ``[H, d]``
q / k / v     projection outputs (pre-rotary / pre-qk-norm), per head slice; GPT-2 fused
              ``c_attn`` = ``[q | k | v]`` blocks of d_model; GPT-NeoX fused ``query_key_value``
              = per head ``[q | k | v]`` chunks of d_head. Patching the pre-rotary value at the same
              position equals patching the post-rotary one: rotary and qk-norm act per position
              (and qk-norm per head).
neuron        input of the MLP down projection
pattern       softmax probabilities inside the registered eager attention function (causal, and
              local where the HF attention module passes a ``sliding_window``)
============  ===============================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from patchtrace.sites import Site

_ATTN_NAME = "patchtrace_test_reference_eager"

# per call: {layer: fn(pattern [B,H,T,T]) -> pattern}
_PATTERN_FNS: list[dict[int, Callable[[Tensor], Tensor | None]]] = []


def _attr(root: Any, path: str) -> Any:
    for p in path.split("."):
        root = getattr(root, p)
    return root


def _model_type(model: Any) -> str:
    return model.hf.config.model_type


def _layers(model: Any) -> Any:
    mt = _model_type(model)
    if mt == "gpt2":
        return model.hf.transformer.h
    if mt == "gpt_neox":
        return model.hf.gpt_neox.layers
    return model.hf.model.layers


def _modules(model: Any, layer: int) -> dict[str, Any]:
    """Named HF modules of one block."""
    blk = _layers(model)[layer]
    mt = _model_type(model)
    if mt == "gpt2":
        return {"block": blk, "attn": blk.attn, "ln2": blk.ln_2, "qkv": blk.attn.c_attn, "o": blk.attn.c_proj,
                "mlp": blk.mlp, "down": blk.mlp.c_proj}
    if mt == "gpt_neox":
        return {"block": blk, "attn": blk.attention, "ln2": blk.post_attention_layernorm,
                "qkv": blk.attention.query_key_value, "o": blk.attention.dense, "mlp": blk.mlp,
                "down": blk.mlp.dense_4h_to_h}
    a = blk.self_attn
    if mt == "gemma3_text":  # sandwich norms: the sublayer outputs are the post-norms' outputs
        return {"block": blk, "attn": blk.post_attention_layernorm, "ln2": blk.pre_feedforward_layernorm,
                "q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "mlp": blk.post_feedforward_layernorm,
                "down": blk.mlp.down_proj}
    return {"block": blk, "attn": a, "ln2": blk.post_attention_layernorm, "q": a.q_proj, "k": a.k_proj,
            "v": a.v_proj, "o": a.o_proj, "mlp": blk.mlp, "down": blk.mlp.down_proj}


def _dims(model: Any) -> tuple[int, int, int, int]:
    """(d_model, n_heads, n_kv_heads, d_head) read straight from the HF config."""
    c = model.hf.config
    if _model_type(model) == "gpt2":
        return c.n_embd, c.n_head, c.n_head, c.n_embd // c.n_head
    h = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or h
    dh = getattr(c, "head_dim", None) or c.hidden_size // h
    return c.hidden_size, h, kv, dh


# -- canonical views: [B, T, ...] with positions at axis 1 and units at axis 2 ---------------------


def _qkv_view(model: Any, kind: str, x: Tensor) -> Tensor:
    """The ``[B, T, n, d]`` view of q/k/v inside a projection output ``x``."""
    D, H, K, d = _dims(model)
    mt = _model_type(model)
    j = "qkv".index(kind)
    if mt == "gpt2":
        return x[..., j * D : (j + 1) * D].unflatten(-1, (H, d))
    if mt == "gpt_neox":
        return x.unflatten(-1, (H, 3 * d))[..., j * d : (j + 1) * d]
    return x.unflatten(-1, (H if kind == "q" else K, d))


def _view(model: Any, kind: str, x: Tensor) -> Tensor:
    _, H, _, d = _dims(model)
    if kind == "head":
        return x.unflatten(-1, (H, d))
    if kind in ("q", "k", "v"):
        return _qkv_view(model, kind, x)
    return x


def _assign(dst: Tensor, src: Tensor, kind: str, site: Site, T: int) -> None:
    """Write ``src`` into ``dst`` (both canonical views) at the site's unit/position."""
    if kind == "pattern":  # [B, H, Tq, Tk]: unit at axis 1, (query) position at axis 2
        h = slice(None) if site.unit is None else site.unit
        p = slice(None) if site.pos is None else site.pos % T
        dst[:, h, p] = src[:, h, p]
        return
    p = slice(None) if site.pos is None else site.pos % T
    if site.unit is None:
        dst[:, p] = src[:, p]
    else:
        dst[:, p, site.unit] = src[:, p, site.unit]


# -- the test-only attention implementation ------------------------------------------------------------


def _reference_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                         scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                         **kwargs: Any) -> tuple[Tensor, Tensor]:
    """Plain causal softmax attention (a query sees the last ``sliding_window`` positions, itself
    included, when the HF module passes one); calls the active pattern hook of this layer."""
    rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    Tq, Tk = query.shape[2], key.shape[2]
    assert Tq == Tk, "the reference runs full forwards only"
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    causal = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril()
    if sliding_window is not None:
        causal = causal & ~torch.ones_like(causal).tril(-sliding_window)
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    fns = _PATTERN_FNS[-1] if _PATTERN_FNS else {}
    fn = fns.get(module.layer_idx)
    if fn is not None:
        new = fn(probs)
        if new is not None:
            probs = new
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


@contextlib.contextmanager
def _pattern_attention(model: Any, fns: dict[int, Callable[[Tensor], Tensor | None]]) -> Iterator[None]:
    """Route the model's attention through :func:`_reference_attention` for the duration of the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN_NAME, _reference_attention)
    cfg = model.hf.config
    old = cfg._attn_implementation
    cfg._attn_implementation = _ATTN_NAME
    _PATTERN_FNS.append(fns)
    try:
        yield
    finally:
        _PATTERN_FNS.pop()
        cfg._attn_implementation = old


# -- the hooked forward ------------------------------------------------------------------------------


def _out_tensor(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _with_out(out: Any, t: Tensor) -> Any:
    return (t, *out[1:]) if isinstance(out, tuple) else t


def _in_tensor(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_in(args: tuple, kwargs: dict, t: Tensor) -> tuple[tuple, dict]:
    if args:
        return (t, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": t}


def hf_run(
    model: Any,
    ids: Tensor,
    *,
    record: Sequence[tuple[str, int | None]] = (),
    replace: Sequence[tuple[Site, Tensor]] = (),
    embed_add: Tensor | None = None,
) -> tuple[Tensor, dict[tuple[str, int | None], Tensor]]:
    """One plain HF forward over ``ids`` ``[B, T]`` with recording and replacing hooks.

    Args:
        model: a patchtrace ``Model`` (only ``model.hf`` is used).
        ids: token ids.
        record: ``(kind, layer)`` activations to record, returned in canonical views (``[B, T, ...]``;
            ``pattern`` ``[B, H, T, T]``).
        replace: ``(site, source)`` pairs; ``source`` is the canonical recorded activation of the
            same kind and layer from another run; the site's unit/position of it is written in.
        embed_add: ``[B, T, D]`` added to the embedding output (causal-tracing noise).

    Returns:
        (logits ``[B, T, V]``, recorded activations).
    """
    T = ids.shape[1]
    rec: dict[tuple[str, int | None], Tensor] = {}
    handles: list[Any] = []
    pattern_fns: dict[int, Callable[[Tensor], Tensor | None]] = {}
    by_point: dict[tuple[str, int | None], list[tuple[Site, Tensor]]] = {}
    for site, src in replace:
        by_point.setdefault((site.kind, site.layer), []).append((site, src))
    points = set(record) | set(by_point)
    need_pattern = any(k == "pattern" for k, _ in points)
    mt = _model_type(model)

    def out_hook(kind: str, key: tuple[str, int | None], transform: Callable[[Tensor], Tensor] | None = None) -> Any:
        def fn(mod: Any, args: Any, out: Any) -> Any:
            x = _out_tensor(out)
            if transform is not None:
                x = transform(x)
            x = _apply(kind, key, x)
            return _with_out(out, x)

        return fn

    def in_hook(kind: str, key: tuple[str, int | None]) -> Any:
        def fn(mod: Any, args: tuple, kwargs: dict) -> Any:
            x = _apply(kind, key, _in_tensor(args, kwargs))
            return _with_in(args, kwargs, x)

        return fn

    def _apply(kind: str, key: tuple[str, int | None], x: Tensor) -> Tensor:
        reps = by_point.get(key, [])
        if reps:
            x = x.clone()
            v = _view(model, kind, x)
            for site, src in reps:
                _assign(v, src, kind, site, T)
        if key in record:
            rec[key] = _view(model, kind, x).detach().clone()
        return x

    layer_in: dict[int, Tensor] = {}
    try:
        # embedding (+ noise)
        emb_key = ("embed", None)
        if embed_add is not None or emb_key in points:

            def emb_fn(x: Tensor) -> Tensor:
                x = x + embed_add if embed_add is not None else x
                return _apply("embed", emb_key, x)

            if mt == "gpt2":
                def pre(mod: Any, args: tuple) -> Any:
                    return (emb_fn(args[0]), *args[1:])

                handles.append(model.hf.transformer.drop.register_forward_pre_hook(pre))
            else:
                def post(mod: Any, args: Any, out: Tensor) -> Tensor:
                    return emb_fn(out)

                handles.append(model.hf.get_input_embeddings().register_forward_hook(post))
        # resid_mid last: its layer-input grab must see any resid_pre replacement of the same layer
        for kind, layer in sorted(points, key=lambda p: (p[0] == "resid_mid", p[0], -1 if p[1] is None else p[1])):
            if layer is None:
                continue
            m = _modules(model, layer)
            key = (kind, layer)
            if kind == "resid_pre":
                handles.append(m["block"].register_forward_pre_hook(in_hook(kind, key), with_kwargs=True))
            elif kind == "resid_post":
                handles.append(m["block"].register_forward_hook(out_hook(kind, key)))
            elif kind == "attn_out":
                handles.append(m["attn"].register_forward_hook(out_hook(kind, key)))
            elif kind == "mlp_out":
                handles.append(m["mlp"].register_forward_hook(out_hook(kind, key)))
            elif kind in ("head", "neuron"):
                mod = m["o"] if kind == "head" else m["down"]
                handles.append(mod.register_forward_pre_hook(in_hook(kind, key), with_kwargs=True))
            elif kind in ("q", "k", "v"):
                mod = m["qkv"] if "qkv" in m else m[kind]
                handles.append(mod.register_forward_hook(out_hook(kind, key)))
            elif kind == "resid_mid":
                _hook_resid_mid(m, layer, key, by_point.get(key, []), rec if key in record else None, layer_in,
                                handles, T)
            elif kind == "pattern":

                def pat(probs: Tensor, key: tuple[str, int | None] = key) -> Tensor:
                    return _apply("pattern", key, probs)

                pattern_fns[layer] = pat
            else:
                raise KeyError(kind)
        ctx = _pattern_attention(model, pattern_fns) if need_pattern else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            logits = model.hf(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits.float(), rec


def _hook_resid_mid(m: dict[str, Any], layer: int, key: tuple[str, int | None], reps: list[tuple[Site, Tensor]],
                    rec: dict | None, layer_in: dict[int, Tensor], handles: list[Any], T: int) -> None:
    """resid_mid = layer input + attention output. Record it at the second norm's input; patch it by
    rewriting the attention output so that both the norm and the residual branch see the new value."""

    def grab(mod: Any, args: tuple, kwargs: dict) -> None:
        layer_in[layer] = _in_tensor(args, kwargs)

    handles.append(m["block"].register_forward_pre_hook(grab, with_kwargs=True))
    if reps:

        def fix(mod: Any, args: Any, out: Any) -> Any:
            a = _out_tensor(out).clone()
            h = layer_in[layer]
            for site, src in reps:
                want = (h + a).clone()
                _assign(want, src, "resid_mid", site, T)
                p = slice(None) if site.pos is None else site.pos % T
                a[:, p] = want[:, p] - h[:, p]
            return _with_out(out, a)

        handles.append(m["attn"].register_forward_hook(fix))
    if rec is not None:

        def save(mod: Any, args: tuple, kwargs: dict) -> None:
            rec[key] = _in_tensor(args, kwargs).detach().clone()

        handles.append(m["ln2"].register_forward_pre_hook(save, with_kwargs=True))


# -- metrics and patching --------------------------------------------------------------------------------


def logit_diff(logits: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:
    """Last-position mean answer logit minus mean wrong logit, per example. ``logits`` ``[B, T, V]``."""
    last = logits[:, -1].float()
    return last.gather(1, answer).mean(1) - last.gather(1, wrong).mean(1)


def reference_patch(
    model: Any,
    base_ids: Tensor,
    source_ids: Tensor,
    sites: Sequence[Site],
    answer: Tensor,
    wrong: Tensor,
) -> Tensor:
    """Logit difference ``[N]`` of the base run with all ``sites`` replaced by the source run's values."""
    points = sorted({(s.kind, s.layer) for s in sites}, key=lambda p: (p[0], -1 if p[1] is None else p[1]))
    _, src = hf_run(model, source_ids, record=points)
    logits, _ = hf_run(model, base_ids, replace=[(s, src[(s.kind, s.layer)]) for s in sites])
    return logit_diff(logits, answer, wrong)


def reference_metric(model: Any, ids: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:
    """Unpatched logit difference ``[N]``."""
    logits, _ = hf_run(model, ids)
    return logit_diff(logits, answer, wrong)
