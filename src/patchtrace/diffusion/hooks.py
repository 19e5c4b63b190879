"""Scoped interventions on cross-attention keys/values, in the conditional half of guidance only.

Classifier-free guidance runs the UNet on ``[unconditional rows; conditional rows]`` and mixes the
two predictions; the diffusers pipelines put the unconditional (negative-prompt) half first. LocoGen
changes what the *prompt* says at some layers, so only the conditional half is touched; the
unconditional half is what "no prompt" means and stays as it is.

Two interventions, each a context manager that registers PyTorch hooks and removes them on exit
(also on error), so nothing is left on the pipeline afterwards:

- :func:`layer_states` — per layer, the text states that ``to_k``/``to_v`` read are replaced in the
  conditional rows (a *forward pre-hook*: the projection then runs on the same-shaped batch, so
  replacing states by the very states the pipeline passes reproduces its output bit for bit);
- :func:`neuron_values` — per layer, chosen output neurons of ``to_k``/``to_v`` are set to given
  values (LocoGen's neuron-level variant: the top-k neurons set to the neutral prompts' mean).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from patchtrace.diffusion.adapters import CrossAttnLayer, DiffusionError


def _cond_rows(batch: int, n_cond: int) -> slice:
    if batch == 2 * n_cond:
        return slice(n_cond, batch)
    if batch == n_cond:
        return slice(0, batch)
    raise DiffusionError(f"batch of {batch} rows does not fit {n_cond} conditional rows (with or without guidance)")


@contextmanager
def layer_states(layers: list[CrossAttnLayer], states: Mapping[int, Any]) -> Iterator[None]:
    """Within the block, layer ``j`` (forward index) reads ``states[j]`` in its conditional rows.

    ``states[j]`` has shape ``(n_cond, tokens, d_text)`` — one row per conditional image — with the
    tokens and width of the pipeline's own text states. Layers not in ``states`` are untouched.
    """
    handles = []
    try:
        for j, st in states.items():
            if not 0 <= j < len(layers):
                raise DiffusionError(f"cross-attention layer {j} does not exist (the UNet has {len(layers)})")
            layer = layers[j]
            if st.shape[-1] != layer.text_dim:
                raise DiffusionError(f"states for layer {j} are {st.shape[-1]} wide; it reads {layer.text_dim}")
            attn = layer.attn
            if getattr(attn, "norm_cross", None) is not None:
                st = attn.norm_encoder_hidden_states(st)

            def pre(module: Any, args: tuple, st: Any = st) -> tuple:
                x = args[0]
                rows = _cond_rows(x.shape[0], st.shape[0])
                if x.shape[1:] != st.shape[1:]:
                    raise DiffusionError(f"replacement text states {tuple(st.shape[1:])} != {tuple(x.shape[1:])}")
                x = x.clone()
                x[rows] = st.to(x.dtype)
                return (x, *args[1:])

            handles.append(layer.to_k.register_forward_pre_hook(pre))
            handles.append(layer.to_v.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def neuron_values(
    layers: list[CrossAttnLayer], values: Mapping[tuple[int, str], tuple[Any, Any]], n_cond: int
) -> Iterator[None]:
    """Within the block, output neurons ``idx`` of ``to_k``/``to_v`` read ``val`` in the conditional rows.

    ``values[(layer, "k" | "v")] = (idx, val)`` with ``idx`` a 1-D index tensor of neurons and ``val``
    of shape ``(tokens, len(idx))`` (per token, e.g. a mean over neutral prompts).
    """
    handles = []
    try:
        for (j, which), (idx, val) in values.items():
            if which not in ("k", "v"):
                raise DiffusionError(f"projection {which!r} is not 'k' or 'v'")
            mod = layers[j].to_k if which == "k" else layers[j].to_v

            def post(module: Any, args: tuple, out: Any, idx: Any = idx, val: Any = val) -> Any:
                rows = _cond_rows(out.shape[0], n_cond)
                out = out.clone()
                sub = out[rows]
                sub[..., idx] = val.to(out.dtype)
                out[rows] = sub
                return out

            handles.append(mod.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
