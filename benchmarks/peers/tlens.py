"""(b) TransformerLens 4.3: ``TransformerBridge`` around the loaded HF model, ``patching`` helpers.

TL 4 has no ``HookedTransformer``; ``TransformerBridge.boot_transformers(name, hf_model=m,
tokenizer=tok)`` reuses the already-loaded model offline. The bridge swaps in its own submodules
and forces eager attention, in place, so this child process gives it a load of its own. The sweep
is TL's ``patching.generic_activation_patch`` with an explicit ``index_df`` (one row per cell):
heads through ``hook_z`` (``get_act_patch_attn_head_out_by_pos``), resid_pre through
``hook_resid_pre`` (``get_act_patch_resid_pre``), neurons through ``mlp.hook_post`` (the
down_proj input) with a neuron setter.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .common import HF_NAME, Bench, Cell, scatter, timed


def _neuron_setter(corrupted: torch.Tensor, index: list[int], clean: torch.Tensor) -> torch.Tensor:
    _, pos, n = index
    corrupted[:, pos, n] = clean[:, pos, n]
    return corrupted


def run(b: Bench, config: str, cs: list[Cell]) -> dict[str, Any]:
    import pandas as pd
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    def setup() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(HF_NAME, hf_model=b.model.hf, tokenizer=b.model.tokenizer)
        bridge.eval()
        return bridge

    bridge, setup_s = timed(setup)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(b.clean)
        bridge(b.corrupt)  # warm-up (the corrupt baseline)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return b.metric(logits)

    if config.startswith("heads"):
        df = pd.DataFrame([(c.layer, c.pos, c.unit) for c in cs], columns=["layer", "pos", "head_index"])

        def sweep() -> torch.Tensor:
            return patching.get_act_patch_attn_head_out_by_pos(bridge, b.corrupt, cache, metric, index_axis_names=None, index_df=df)
    elif config == "resid_all":
        df = pd.DataFrame([(c.layer, c.pos) for c in cs], columns=["layer", "pos"])

        def sweep() -> torch.Tensor:
            return patching.get_act_patch_resid_pre(bridge, b.corrupt, cache, metric, index_axis_names=None, index_df=df)
    else:
        df = pd.DataFrame([(c.layer, c.pos, c.unit) for c in cs], columns=["layer", "pos", "neuron"])

        def sweep() -> torch.Tensor:
            return patching.generic_activation_patch(
                bridge, b.corrupt, cache, metric, _neuron_setter, "post", index_axis_names=None, index_df=df
            )

    def loop() -> torch.Tensor:
        with torch.no_grad():
            return sweep()

    vals, sweep_s = timed(loop)
    return {"matrix": scatter(config, b, cs, vals), "sweep_s": sweep_s, "setup_s": setup_s}
