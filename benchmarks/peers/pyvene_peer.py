"""(d) pyvene 0.1.8: one ``IntervenableModel`` per layer, ``VanillaIntervention`` with
``source_representations`` (the clean values, recorded once), one call per patch.

Heads: ``head_attention_value_output`` (the o_proj input split per head), unit ``h.pos``.
resid_pre: ``block_input``, unit ``pos``. Neurons: pyvene's ``mlp_activation`` is the output of
``act_fn`` (act(gate) only, not act(gate)·up), so the component is given as a module path,
``model.layers[L].mlp.down_proj.input``, unit ``pos``, and the neuron picked with ``subspaces``.
The documented ``sources=[clean]`` call would re-run the clean forward for every patch (2× the
work); passing ``source_representations`` avoids that.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from .common import Bench, Cell, scatter, timed
from .hooks import record_clean


def _component(config: str, layer: int) -> str:
    if config.startswith("heads"):
        return "head_attention_value_output"
    if config == "resid_all":
        return "block_input"
    return f"model.layers[{layer}].mlp.down_proj.input"


def run(b: Bench, config: str, cs: list[Cell]) -> dict[str, Any]:
    import pyvene as pv

    logging.getLogger("pyvene").setLevel(logging.ERROR)
    hf = b.model.hf
    B = b.clean.shape[0]
    d_head = b.model.dims.d_head
    clean = record_clean(hf, b, config, {c.layer for c in cs})
    with torch.no_grad():
        hf(b.corrupt)  # warm-up (the corrupt baseline)
    unit = "h.pos" if config.startswith("heads") else "pos"

    def make(layer: int) -> Any:
        cfg = pv.IntervenableConfig(
            [pv.RepresentationConfig(layer, _component(config, layer), unit, 1)],
            intervention_types=pv.VanillaIntervention,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = pv.IntervenableModel(cfg, hf)
        im.disable_model_gradients()
        return im

    _, setup_s = timed(lambda: make(cs[0].layer))

    def loop() -> list[float]:
        vals: list[float] = []
        im, cur = None, -1
        with torch.no_grad():
            for c in cs:
                if c.layer != cur:
                    im, cur = make(c.layer), c.layer
                src = clean[c.layer]
                subspaces = None
                if config.startswith("heads"):
                    loc: Any = [[[c.unit]] * B, [[c.pos]] * B]
                    rep = src[:, c.pos, c.unit * d_head : (c.unit + 1) * d_head].reshape(B, 1, 1, d_head)
                else:
                    loc = [[c.pos]] * B
                    rep = src[:, c.pos : c.pos + 1]
                    if config == "neurons_last":
                        subspaces = [[[c.unit]] * B]
                _, out = im(  # type: ignore[misc]
                    {"input_ids": b.corrupt},
                    unit_locations={"sources->base": ([loc], [loc])},
                    source_representations=[rep],
                    subspaces=subspaces,
                )
                vals.append(float(b.metric(out.logits)))
        return vals

    vals, sweep_s = timed(loop)
    return {"matrix": scatter(config, b, cs, vals), "sweep_s": sweep_s, "setup_s": setup_s}
