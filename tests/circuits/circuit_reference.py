"""A naive, independent reference for edge patching: hooks on the Hugging Face modules.

Nothing here uses patchtrace's runner, stages or circuits code. Edges are named by strings
(``input``, ``a3.h2``, ``m3`` → ``a4.h1<q>``, ``a4.kv0<k>``, ``a4.kv0<v>``, ``m4``, ``logits``) and
every number comes from ``model.hf(ids)`` with torch hooks (removed in ``finally``):

* sender values: the embedding output (GPT-2: the input of ``transformer.drop``, = wte + wpe); each
  head's term ``z_h · W_O[:, h]`` from the input of the attention output projection (bias left out);
  the MLP module's output;
* a receiver's input ``resid + Δ``: for q/k/v, a forward hook on the projection replaces that head's
  (KV head's) slice of the output by the projection of ``norm(resid + Δ)``, ``resid`` being the
  decoder layer's input; for an MLP, a pre-hook on the norm entering the MLP adds ``Δ`` to its input
  only (the residual branch keeps the plain stream); for the logits, a pre-hook on the final norm.
* ``Δ_v = Σ_{u→v patched} (z_u(source) − z_u(this forward))``, with ``z_u(this forward)`` recorded in
  the same forward (every sender runs before any receiver that reads it).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_PATHS = {
    "llama": dict(layers="model.layers", embed="model.embed_tokens", ln1="input_layernorm", ln2="post_attention_layernorm",
                  attn="self_attn", o="o_proj", mlp="mlp", norm="model.norm"),
    "gpt2": dict(layers="transformer.h", embed="transformer.drop", ln1="ln_1", ln2="ln_2", attn="attn", o="c_proj",
                 mlp="mlp", norm="transformer.ln_f"),
    "gpt_neox": dict(layers="gpt_neox.layers", embed="gpt_neox.embed_in", ln1="input_layernorm",
                     ln2="post_attention_layernorm", attn="attention", o="dense", mlp="mlp",
                     norm="gpt_neox.final_layer_norm"),
}


def _kind(hf: Any) -> str:
    t = hf.config.model_type
    return t if t in ("gpt2", "gpt_neox") else "llama"


def _get(root: Any, path: str) -> Any:
    for p in path.split("."):
        root = getattr(root, p)
    return root


def _dims(hf: Any) -> tuple[int, int, int, int]:
    c = hf.config
    D = c.hidden_size
    H = c.num_attention_heads
    K = getattr(c, "num_key_value_heads", None) or H
    d = getattr(c, "head_dim", None) or D // H
    return D, H, K, d


def _parse_sender(name: str) -> tuple[str, int, int]:
    if name == "input":
        return "input", -1, 0
    m = re.fullmatch(r"a(\d+)\.h(\d+)", name)
    if m:
        return "head", int(m[1]), int(m[2])
    m = re.fullmatch(r"m(\d+)", name)
    assert m, name
    return "mlp", int(m[1]), 0


def _parse_receiver(name: str) -> tuple[str, int, int]:
    if name == "logits":
        return "logits", -1, 0
    m = re.fullmatch(r"a(\d+)\.(?:h|kv)(\d+)<([qkv])>", name)
    if m:
        return m[3], int(m[1]), int(m[2])
    m = re.fullmatch(r"m(\d+)", name)
    assert m, name
    return "mlp", int(m[1]), 0


def _first(args: tuple, kwargs: dict, key: str = "hidden_states") -> Tensor:
    return args[0] if args else kwargs[key]


@contextlib.contextmanager
def _hooks(hf: Any, record: dict[str, Tensor], patches: dict[str, list[tuple[str, Tensor]]],
           fixed: dict[str, Tensor] | None = None, sender_add: dict[str, Tensor] | None = None) -> Iterator[None]:
    """``patches``: replace-style edges; ``fixed``: extra ``Δ`` per receiver; ``sender_add``: added to
    a sender's output (``input``, ``m<l>``; ``a<l>.h<h>`` is added to the attention module's output)."""
    fixed = fixed or {}
    sender_add = sender_add or {}
    kind = _kind(hf)
    P = _PATHS[kind]
    D, H, K, d = _dims(hf)
    handles = []
    layer_in: dict[int, Tensor] = {}

    def delta(recv: str) -> Tensor | None:
        items = patches.get(recv) or []
        out = fixed.get(recv)
        for u, src in items:
            out = src - record[u] if out is None else out + (src - record[u])
        return out

    emb = _get(hf, P["embed"])
    if kind == "gpt2":

        def pre_drop(m: Any, a: tuple) -> tuple:
            x = a[0] + sender_add["input"] if "input" in sender_add else a[0]
            record["input"] = x
            return (x, *a[1:])

        handles.append(emb.register_forward_pre_hook(pre_drop))
    else:

        def post_emb(m: Any, a: tuple, o: Tensor) -> Tensor:
            x = o + sender_add["input"] if "input" in sender_add else o
            record["input"] = x
            return x

        handles.append(emb.register_forward_hook(post_emb))
    for li, layer in enumerate(_get(hf, P["layers"])):
        attn = getattr(layer, P["attn"])
        o = getattr(attn, P["o"])
        ln1, ln2 = getattr(layer, P["ln1"]), getattr(layer, P["ln2"])

        def pre_layer(m: Any, args: tuple, kwargs: dict, li: int = li) -> None:
            layer_in[li] = _first(args, kwargs)

        handles.append(layer.register_forward_pre_hook(pre_layer, with_kwargs=True))

        def pre_o(m: Any, args: tuple, li: int = li) -> None:
            z = args[0]
            w = m.weight
            for h in range(H):
                zh = z[..., h * d:(h + 1) * d]
                record[f"a{li}.h{h}"] = zh @ w[h * d:(h + 1) * d] if kind == "gpt2" else zh @ w[:, h * d:(h + 1) * d].T

        handles.append(o.register_forward_pre_hook(pre_o))

        def post_mlp(m: Any, a: tuple, out: Any, li: int = li) -> Any:
            o = out[0] if isinstance(out, tuple) else out
            if f"m{li}" in sender_add:
                o = o + sender_add[f"m{li}"]
            record[f"m{li}"] = o
            return (o, *out[1:]) if isinstance(out, tuple) else o

        handles.append(getattr(layer, P["mlp"]).register_forward_hook(post_mlp))

        def post_attn(m: Any, a: tuple, out: Any, li: int = li) -> Any:
            extra = [t for k, t in sender_add.items() if k.startswith(f"a{li}.h")]
            if not extra:
                return None
            o = out[0] if isinstance(out, tuple) else out
            o = o + sum(extra)
            return (o, *out[1:]) if isinstance(out, tuple) else o

        handles.append(attn.register_forward_hook(post_attn))

        def pre_ln2(m: Any, args: tuple, li: int = li) -> tuple | None:
            dl = delta(f"m{li}")
            return None if dl is None else (args[0] + dl, *args[1:])

        handles.append(ln2.register_forward_pre_hook(pre_ln2))

        # q / k / v: (module, [(receiver name, column slice of the module output)])
        proj: dict[Any, list[tuple[str, slice]]] = {}
        if kind == "llama":
            for h in range(H):
                proj.setdefault(attn.q_proj, []).append((f"a{li}.h{h}<q>", slice(h * d, (h + 1) * d)))
            for g in range(K):
                proj.setdefault(attn.k_proj, []).append((f"a{li}.kv{g}<k>", slice(g * d, (g + 1) * d)))
                proj.setdefault(attn.v_proj, []).append((f"a{li}.kv{g}<v>", slice(g * d, (g + 1) * d)))
        elif kind == "gpt2":
            for h in range(H):
                proj.setdefault(attn.c_attn, []).extend([
                    (f"a{li}.h{h}<q>", slice(h * d, (h + 1) * d)),
                    (f"a{li}.kv{h}<k>", slice(D + h * d, D + (h + 1) * d)),
                    (f"a{li}.kv{h}<v>", slice(2 * D + h * d, 2 * D + (h + 1) * d)),
                ])
        else:
            for h in range(H):
                b = h * 3 * d
                proj.setdefault(attn.query_key_value, []).extend([
                    (f"a{li}.h{h}<q>", slice(b, b + d)),
                    (f"a{li}.kv{h}<k>", slice(b + d, b + 2 * d)),
                    (f"a{li}.kv{h}<v>", slice(b + 2 * d, b + 3 * d)),
                ])
        for mod, items in proj.items():

            def post_proj(m: Any, a: tuple, out: Tensor, li: int = li, items: list = items, ln1: Any = ln1) -> Tensor:
                out = out.clone()
                for recv, cols in items:
                    dl = delta(recv)
                    if dl is not None:
                        out[..., cols] = m.forward(ln1.forward(layer_in[li] + dl))[..., cols]
                return out

            handles.append(mod.register_forward_hook(post_proj))

    def pre_norm(m: Any, args: tuple) -> tuple | None:
        dl = delta("logits")
        return None if dl is None else (args[0] + dl, *args[1:])

    handles.append(_get(hf, P["norm"]).register_forward_pre_hook(pre_norm))
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


@torch.no_grad()
def senders(hf: Any, ids: Tensor) -> dict[str, Tensor]:
    """Every sender's value in a plain forward of ``ids``."""
    rec: dict[str, Tensor] = {}
    with _hooks(hf, rec, {}):
        hf(ids)
    return dict(rec)


@torch.no_grad()
def patched_logits(hf: Any, base_ids: Tensor, src: dict[str, Tensor], edges: list[tuple[str, str]],
                   fixed: dict[str, Tensor] | None = None, sender_add: dict[str, Tensor] | None = None) -> Tensor:
    """Last-position logits of the base run with ``edges`` (sender name, receiver name) patched
    so that each receiver sees its patched senders' values from ``src`` (plus ``fixed`` deltas and
    ``sender_add`` additions, see :func:`_hooks`)."""
    patches: dict[str, list[tuple[str, Tensor]]] = {}
    for u, v in edges:
        _parse_sender(u)
        _parse_receiver(v)
        patches.setdefault(v, []).append((u, src[u]))
    rec: dict[str, Tensor] = {}
    with _hooks(hf, rec, patches, fixed, sender_add):
        return hf(base_ids).logits[:, -1]


def logit_diff(logits: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:
    return logits.gather(1, answer).mean(1) - logits.gather(1, wrong).mean(1)
