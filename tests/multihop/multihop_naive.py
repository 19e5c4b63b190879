"""A naive back-patching reference for the tests: plain Hugging Face forwards and ``generate`` with torch
hooks on the decoder layers, one full forward per (source layer, target layer) pair.

Nothing here uses patchtrace's runner or engine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def decoder_layers(hf: Any) -> Any:
    """The HF decoder layer list (Llama-style ``model.layers``, GPT-2 ``transformer.h``, NeoX ``gpt_neox.layers``)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = hf
        try:
            for p in path.split("."):
                obj = getattr(obj, p)
        except AttributeError:
            continue
        return obj
    raise AttributeError("no decoder layers found")


def _out(o: Any) -> Tensor:
    return o[0] if isinstance(o, tuple) else o


def _with(o: Any, t: Tensor) -> Any:
    return (t, *o[1:]) if isinstance(o, tuple) else t


def layer_outputs(hf: Any, ids: Tensor) -> list[Tensor]:
    """Every decoder layer's output ``[1, T, D]`` (recorded by forward hooks)."""
    outs: dict[int, Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, _out(o).detach().clone()))
               for i, layer in enumerate(decoder_layers(hf))]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(outs))]


def _writer(val: Tensor, pos: int, prefill_only: bool) -> Any:
    def hook(m: Any, a: Any, o: Any) -> Any:
        x = _out(o)
        if prefill_only and x.shape[1] == 1:
            return None
        x = x.clone()
        x[:, pos] = val
        return _with(o, x)

    return hook


def naive_logprob_grid(hf: Any, ids: Tensor, pos: int, target: int) -> Tensor:
    """``[L, L]`` log p(target) at the last position, entry ``[j, i]`` = block j's output written into block i's."""
    outs = layer_outputs(hf, ids)
    layers = decoder_layers(hf)
    L = len(layers)
    grid = torch.empty(L, L)
    for j in range(L):
        for i in range(L):
            h = layers[i].register_forward_hook(_writer(outs[j][:, pos], pos, False))
            try:
                with torch.no_grad():
                    logits = hf(ids).logits[0, -1]
            finally:
                h.remove()
            grid[j, i] = torch.log_softmax(logits.float(), -1)[target]
    return grid


def naive_generate(hf: Any, ids: Tensor, pos: int, j: int, i: int, max_new: int) -> list[int]:
    """Greedy ``generate`` with block j's output written into block i's on the prefill only."""
    outs = layer_outputs(hf, ids)
    layer = decoder_layers(hf)[i]
    h = layer.register_forward_hook(_writer(outs[j][:, pos], pos, True))
    try:
        with torch.no_grad():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new,
                            do_sample=False, pad_token_id=0)
    finally:
        h.remove()
    return g[0, ids.shape[1]:].tolist()


def naive_cross_generate(hf: Any, src: Tensor, src_pos: int, tgt: Tensor, layer: int, max_new: int) -> list[int]:
    """Decoder layer ``layer``'s output at ``src_pos`` of ``src`` written into the same layer's output at the last
    position of ``tgt`` (prefill only), then greedy ``generate``."""
    val = layer_outputs(hf, src)[layer][:, src_pos]
    h = decoder_layers(hf)[layer].register_forward_hook(_writer(val, tgt.shape[1] - 1, True))
    try:
        with torch.no_grad():
            g = hf.generate(tgt, attention_mask=torch.ones_like(tgt), max_new_tokens=max_new, min_new_tokens=max_new,
                            do_sample=False, pad_token_id=0)
    finally:
        h.remove()
    return g[0, tgt.shape[1]:].tolist()


def ablated_logits(hf: Any, ids: Tensor, module: Any, fn: Any) -> Tensor:
    """Last-position logits with ``module``'s output replaced by ``fn(output)``."""

    def hook(m: Any, a: Any, o: Any) -> Any:
        return _with(o, fn(_out(o)))

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf(ids).logits[:, -1]
    finally:
        h.remove()
