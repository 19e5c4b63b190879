"""(e) One attribution-patching (AtP) pass over all heads at the last position, for scale.

Plain torch hooks on the HF model: a clean forward records every layer's o_proj input; a corrupt
forward with gradients (the embedding output made to require grad; parameters stay frozen)
retains each o_proj input's gradient; one backward of the mean logit difference. The estimate for
head (l, h) is ⟨∂metric/∂z, z_clean − z_corrupt⟩ summed over prompts, at the last position. It is
an approximation (a first-order Taylor estimate of the exact effect), so its "difference" from the
exact sweep is an approximation error, not a bug; the parent reports its Pearson correlation.
If patchtrace grows its own AtP method (``patchtrace.methods.atp``), that is timed as well.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from .common import Bench, Cell, scatter, timed
from .hooks import record_clean


def atp_hooks(b: Bench) -> torch.Tensor:
    """AtP estimates of the effect of every head at the last position, ``[L, H]``."""
    hf = b.model.hf
    L, H, dh, _ = b.dims()
    clean = record_clean(hf, b, "heads_last", set(range(L)))
    acts: dict[int, torch.Tensor] = {}
    handles = []

    def grad_embed(mod: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        return out.detach().requires_grad_(True)

    handles.append(hf.model.embed_tokens.register_forward_hook(grad_embed))
    for layer in range(L):
        def keep(mod: Any, args: tuple[Any, ...], layer: int = layer) -> None:
            args[0].retain_grad()
            acts[layer] = args[0]

        handles.append(hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(keep))
    try:
        with torch.enable_grad():
            m = b.metric(hf(b.corrupt).logits)
            m.backward()
    finally:
        for h in handles:
            h.remove()
    out = torch.empty(L, H)
    for layer in range(L):
        z = acts[layer]
        assert z.grad is not None
        delta = (clean[layer][:, -1] - z.detach()[:, -1]) * z.grad[:, -1]  # [N, H*dh]
        out[layer] = delta.view(-1, H, dh).sum(dim=(0, 2))
    return out


def run(b: Bench, config: str, cs: list[Cell]) -> dict[str, Any]:
    if config != "heads_last":
        raise ValueError("the AtP pass is measured on heads_last only")
    with torch.no_grad():
        base = float(b.metric(b.model.hf(b.corrupt).logits))  # warm-up and the corrupt baseline
    atp_hooks(b)  # warm-up of the backward
    est, sweep_s = timed(lambda: atp_hooks(b))
    res: dict[str, Any] = {"matrix": scatter(config, b, cs, (est + base).flatten()), "sweep_s": sweep_s, "setup_s": 0.0}
    if importlib.util.find_spec("patchtrace.methods.atp") is not None:
        try:
            res["patchtrace_atp_s"], pt_est = _patchtrace_atp(b)
            res["patchtrace_atp_max_abs_diff"] = float((pt_est.reshape(est.shape) - est).abs().max())
        except Exception as e:  # an API we do not know yet: say so, do not fail the benchmark
            res["patchtrace_atp_error"] = f"{type(e).__name__}: {e}"
    return res


def _patchtrace_atp(b: Bench) -> tuple[float, torch.Tensor]:
    """Time ``patchtrace.methods.atp.run`` on all heads at the last position (same call shape as
    activation patching: ``run(model, task, SiteSpec, config)``); return the time and its estimates."""
    from patchtrace import SiteSpec
    from patchtrace.methods import atp

    spec = SiteSpec("head", per_unit=True, positions="last")
    atp.run(b.model, b.task, spec)  # warm-up
    scores, s = timed(lambda: atp.run(b.model, b.task, spec))
    return float(s), scores.values.float()
