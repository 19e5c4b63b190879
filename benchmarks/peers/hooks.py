"""Reference (a): plain Hugging Face forward with torch forward pre-hooks, one forward per patch.

About 40 lines that anyone could write: record the clean run's inputs of the patched modules with
pre-hooks, then for each cell run the corrupt batch with a pre-hook that overwrites that slice.
Heads: input of ``self_attn.o_proj`` (columns ``64h … 64h+63``); resid_pre: input of the decoder
layer; neurons: input of ``mlp.down_proj``.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import Bench, Cell, scatter, timed


def module_for(hf: Any, config: str, layer: int) -> Any:
    lay = hf.model.layers[layer]
    if config.startswith("heads"):
        return lay.self_attn.o_proj
    if config == "resid_all":
        return lay
    return lay.mlp.down_proj


def _first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def setter(config: str, d_head: int, c: Cell, clean: torch.Tensor) -> Any:
    """Pre-hook writing the clean value of cell ``c`` into the module input."""

    def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = _first(args, kwargs).clone()
        if config.startswith("heads"):
            sl = slice(c.unit * d_head, (c.unit + 1) * d_head)
            x[:, c.pos, sl] = clean[:, c.pos, sl]
        elif config == "resid_all":
            x[:, c.pos] = clean[:, c.pos]
        else:
            x[:, c.pos, c.unit] = clean[:, c.pos, c.unit]
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return hook


def record_clean(hf: Any, b: Bench, config: str, layers: set[int]) -> dict[int, torch.Tensor]:
    """One clean forward recording the input of the patched module of every layer."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def rec(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], layer: int = layer) -> None:
            store[layer] = _first(args, kwargs).detach().clone()

        handles.append(module_for(hf, config, layer).register_forward_pre_hook(rec, with_kwargs=True))
    try:
        with torch.no_grad():
            hf(b.clean)
    finally:
        for h in handles:
            h.remove()
    return store


def run(b: Bench, config: str, cs: list[Cell]) -> dict[str, Any]:
    hf = b.model.hf
    d_head = b.model.dims.d_head
    clean = record_clean(hf, b, config, {c.layer for c in cs})
    with torch.no_grad():
        hf(b.corrupt)  # warm-up (the corrupt baseline)

    def loop() -> list[float]:
        vals = []
        with torch.no_grad():
            for c in cs:
                h = module_for(hf, config, c.layer).register_forward_pre_hook(
                    setter(config, d_head, c, clean[c.layer]), with_kwargs=True
                )
                try:
                    vals.append(float(b.metric(hf(b.corrupt).logits)))
                finally:
                    h.remove()
        return vals

    vals, sweep_s = timed(loop)
    return {"matrix": scatter(config, b, cs, vals), "sweep_s": sweep_s, "setup_s": 0.0}
