"""(c) nnsight 0.8.1: ``TransformersModel`` around the loaded model, one ``trace`` per patch.

``LanguageModel`` is deprecated in 0.8; ``TransformersModel(m, task="text-generation",
tokenizer=tok)`` wraps an already-loaded model. The clean values are saved in one trace; each
patch is a trace over the corrupt ids that assigns into the module input (``o_proj.input`` for
heads, the decoder layer's input for resid_pre, ``down_proj.input`` for neurons) and saves the
last-position logits. Lists are built outside the trace body (nnsight re-executes the body
through source capture; comprehensions inside it are not returned).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .common import Bench, Cell, scatter, timed


def _module(lm: Any, config: str, layer: int) -> Any:
    lay = lm.model.layers[layer]
    if config.startswith("heads"):
        return lay.self_attn.o_proj
    if config == "resid_all":
        return lay
    return lay.mlp.down_proj


def run(b: Bench, config: str, cs: list[Cell]) -> dict[str, Any]:
    from nnsight.modeling.transformers import TransformersModel

    def setup() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TransformersModel(b.model.hf, task="text-generation", tokenizer=b.model.tokenizer)

    lm, setup_s = timed(setup)
    d_head = b.model.dims.d_head
    layers = sorted({c.layer for c in cs})
    saved: list[Any] = []
    with torch.no_grad():
        with lm.trace(b.clean):
            for layer in layers:
                saved.append(_module(lm, config, layer).input.save())
        with lm.trace(b.corrupt):  # warm-up (the corrupt baseline)
            base = lm.output.logits[:, -1].save()
    clean = {layer: torch.as_tensor(s).detach().clone() for layer, s in zip(layers, saved, strict=True)}
    del base

    def loop() -> list[float]:
        vals: list[float] = []
        with torch.no_grad():
            for c in cs:
                src = clean[c.layer]
                with lm.trace(b.corrupt):
                    inp = _module(lm, config, c.layer).input
                    if config.startswith("heads"):
                        sl = slice(c.unit * d_head, (c.unit + 1) * d_head)
                        inp[:, c.pos, sl] = src[:, c.pos, sl]
                    elif config == "resid_all":
                        inp[:, c.pos] = src[:, c.pos]
                    else:
                        inp[:, c.pos, c.unit] = src[:, c.pos, c.unit]
                    out = lm.output.logits[:, -1].save()
                vals.append(float(b.metric(torch.as_tensor(out))))
        return vals

    vals, sweep_s = timed(loop)
    return {"matrix": scatter(config, b, cs, vals), "sweep_s": sweep_s, "setup_s": setup_s}
