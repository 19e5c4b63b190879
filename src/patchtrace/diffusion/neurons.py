"""LocoGen's neuron-level variant: a few key/value neurons of the localized layers carry the attribute.

For each ``to_k``/``to_v`` of the chosen layers, compare its output neurons between prompts that
state the attribute and neutral prompts (Welch's z of the per-prompt mean over tokens):
``z = (μ_attr − μ_neutral) / √(s²_attr/n + s²_neutral/n')``. The top-k neurons by ``|z|`` are set, at
inference and in the conditional half of guidance only, to the neutral prompts' mean (per token).
If the attribute disappears, those few neurons carry it. The paper uses the final padded position
for the statistics and k ∈ {10 … 200} (default 50) on SD-v1.4; here the mean over tokens (robust for
short templated prompts) and k scaled to the layer width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.hooks import neuron_values
from patchtrace.diffusion.locogen import ScoreFn


def welch_z(a: Any, b: Any) -> Any:
    """Welch's z per column of ``a`` ``(n, d)`` against ``b`` ``(m, d)``."""
    va, vb = a.var(0, unbiased=True), b.var(0, unbiased=True)
    return (a.mean(0) - b.mean(0)) / (va / a.shape[0] + vb / b.shape[0] + 1e-12).sqrt()


def select_neurons(adapter: T2IAdapter, layers: Sequence[int], attr_prompts: Sequence[str],
                   neutral_prompts: Sequence[str], k: int) -> dict[tuple[int, str], tuple[Any, Any]]:  # fmt: skip
    """``{(layer, 'k'|'v'): (top-k neuron indices, neutral mean per token (tokens, k))}``."""
    import torch

    if len(attr_prompts) < 2 or len(neutral_prompts) < 2:
        raise DiffusionError("Welch's z needs at least 2 attribute prompts and 2 neutral prompts")
    a, n = adapter.encode(list(attr_prompts)).pos, adapter.encode(list(neutral_prompts)).pos
    out = {}
    with torch.no_grad():
        for j in layers:
            if not 0 <= j < adapter.n_layers:
                raise DiffusionError(f"cross-attention layer {j} does not exist (the UNet has {adapter.n_layers})")
            for which in ("k", "v"):
                proj = adapter.layers[j].to_k if which == "k" else adapter.layers[j].to_v
                if k > proj.out_features:
                    raise DiffusionError(f"k={k} is more than the {proj.out_features} neurons of layer {j}")
                fa, fn = proj(a), proj(n)  # (n, T, inner)
                z = welch_z(fa.mean(1), fn.mean(1))
                idx = z.abs().topk(k).indices
                out[(j, which)] = (idx, fn.mean(0)[:, idx])
    return out


def neuron_ablation(adapter: T2IAdapter, prompts: Sequence[str], neutral_prompts: Sequence[str], layers: Sequence[int],
                    k: int, score_fn: ScoreFn | None, seeds: Sequence[int] = (0, 1, 2, 3)) -> dict[str, Any]:  # fmt: skip
    """Score with and without the top-k neurons set to the neutral mean; images of both."""
    import torch

    if score_fn is None:
        raise DiffusionError("no scorer given for the attribute: pass score_fn")
    prompts, seeds = list(prompts), list(seeds)
    chosen = select_neurons(adapter, layers, prompts, neutral_prompts, k)
    cond = adapter.encode(prompts)
    P, S = len(prompts), len(seeds)
    rows = cond.rows([p for p in range(P) for _ in range(S)])
    lat = adapter.latents(seeds).repeat(P, 1, 1, 1)
    pidx = torch.arange(P).repeat_interleave(S)
    base = adapter.generate(rows, lat)
    with neuron_values(adapter.layers, chosen, n_cond=P * S):
        ablated = adapter.generate(rows, lat)
    sb, sa = score_fn(base, pidx).float(), score_fn(ablated, pidx).float()
    return {"score": float(sb.mean()), "ablated_score": float(sa.mean()), "drop": float((sb - sa).mean()),
            "images": torch.stack([base, ablated]), "neurons": {f"{j}.{w}": v[0].tolist() for (j, w), v in chosen.items()}}  # fmt: skip
