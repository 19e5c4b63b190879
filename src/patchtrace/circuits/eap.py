"""Edge attribution patching (EAP) and EAP-IG: every edge's effect from a few backward passes.

Patching edge ``u → v`` adds ``Δ = z_u(source) − z_u(base)`` to receiver ``v``'s input (see
:mod:`patchtrace.circuits.exact`). To first order its effect on the metric is

    S(u → v) = Σ_{example, position, feature} Δ_u · ∂M/∂(input of v)

averaged over examples (Hanna et al. 2024; Syed et al. 2023). One backward pass gives ``∂M/∂in_v``
for every receiver at once (:class:`~patchtrace.circuits.forward.GradLeaves`), and one contraction
with every sender's ``Δ`` scores every edge: the same ``[sender, receiver]`` grid, the same direction
and sign as the exact effects, so :mod:`patchtrace.circuits.compare` correlates them edge by edge.

Variants (``m`` = steps):

* ``eap`` — the gradient at the base run (noising: the clean run). 1 forward + 1 backward.
* ``eap-ig`` (inputs) — the gradient averaged over ``m`` runs whose input embeddings lie on the
  straight line between the corrupt and clean embeddings, ``e~ + (k/m)(e − e~)``, ``k = 0..m−1``
  (the points EAP-IG's code uses: the corrupt end included, the clean end not). m forward+backward.
* ``eap-ig-act`` (activations) — for each sender group (the input; the heads of a layer; an MLP) the
  gradient averaged over ``m`` runs in which only that group's outputs are interpolated,
  ``α z(clean) + (1−α) z(corrupt)``, ``α = k/m``, ``k = 1..m``; the group's edges use that average.
  ``(2L+1)·m`` forward+backward, here batched: several groups ride in one batch, one group per
  block of rows.

All variants use the engine's prefix trick: positions before the first token where the prompts differ
carry no ``Δ``, so the gradient runs start there on the base run's cached keys/values.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from patchtrace.circuits.exact import Group, Prepared
from patchtrace.circuits.forward import GradLeaves
from patchtrace.circuits.graph import CircuitError
from patchtrace.progress import Progress, counter

Variant = Literal["eap", "eap-ig", "eap-ig-act"]
VARIANTS: tuple[str, ...] = ("eap", "eap-ig", "eap-ig-act")


def _grads(p: Prepared, g: Group, adds: list[dict[int, Tensor]]) -> Tensor:
    """Receiver gradients ``[len(adds), N, n, R, D]`` of the summed metric, one block of rows per
    entry of ``adds`` (each a ``{sender: [N, n, D]}`` addition to that sender's output)."""
    k, N = len(adds), len(g.idx)
    ids = g.base_ids[:, g.p0:].repeat(k, 1)
    n, D = ids.shape[1], p.fwd.dims.d_model
    merged: dict[int, Tensor] = {}
    for j, a in enumerate(adds):
        for s, t in a.items():
            if s not in merged:
                merged[s] = g.base_out.new_zeros(k, N, n, D)
            merged[s][j] = t
    flat = {s: t.view(k * N, n, D) for s, t in merged.items()}
    leaves = GradLeaves(p.graph, (k * N, n, D), g.base_out.dtype, g.base_out.device)
    with torch.enable_grad():
        out = p.fwd.run(leaves, ids=ids, cols=g.cols, pos_offset=g.p0, past_kv=g.kv, sender_add=flat)
        m = g.score(p.metric, out.logits, k)
        torch.autograd.backward(m.sum(), inputs=leaves.leaves())
    return leaves.receiver_grads().view(k, N, n, p.graph.n_receivers, D)


def _interp_inputs(p: Prepared, g: Group, steps: int) -> list[dict[int, Tensor]]:
    """Embedding additions putting the input on ``e~ + (k/m)(e − e~)``, ``k = 0..m−1``."""
    d0 = g.src_out[:, :, 0] - g.base_out[:, :, 0]  # source − base embedding
    out = []
    for k in range(steps):
        a = k / steps  # weight of the clean end
        w = (1 - a) if p.direction == "noise" else a  # base = clean (noise) or corrupt (denoise)
        out.append({0: w * d0})
    return out


def _sender_groups(p: Prepared) -> list[list[int]]:
    G = p.graph
    groups = [[0]]
    for li in range(G.n_layers):
        groups.append([G.head_sender(li, h) for h in range(G.n_heads)])
        groups.append([G.mlp_sender(li)])
    return groups


def scores(
    p: Prepared, variant: Variant = "eap", *, steps: int = 5, max_rows: int = 64, on_progress: Progress | None = None,
) -> Tensor:
    """EAP / EAP-IG scores ``[S, R]`` (NaN where no edge), mean over examples, in ``p``'s direction.

    Args:
        p: a :func:`~patchtrace.circuits.exact.prepare` result.
        variant: ``eap``, ``eap-ig`` (inputs) or ``eap-ig-act`` (activations).
        steps: ``m`` (ignored by ``eap``).
        max_rows: rows per gradient batch (EAP-IG activations batches sender groups).
        on_progress: ``(done, total)`` in backward passes.

    Raises:
        CircuitError: an unknown variant or ``steps < 1``.
    """
    if variant not in VARIANTS:
        raise CircuitError(f"EAP variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if steps < 1:
        raise CircuitError(f"steps {steps}: need at least 1")
    G = p.graph
    acc = torch.zeros(G.n_senders, G.n_receivers, dtype=torch.float64)
    sgroups = _sender_groups(p)
    n_pass = {"eap": 1, "eap-ig": steps, "eap-ig-act": steps * len(sgroups)}[variant]
    tick = counter(on_progress, n_pass * len(p.groups))
    for g in p.groups:
        diff = (g.src_out - g.base_out).float()
        N = len(g.idx)
        per = max(1, max_rows // N)
        if variant == "eap":
            gr = _grads(p, g, [{}])[0]
            acc += torch.einsum("itsd,itrd->sr", diff, gr.float()).double()
            tick(1)
        elif variant == "eap-ig":
            adds = _interp_inputs(p, g, steps)
            for c in range(0, steps, per):
                gr = _grads(p, g, adds[c:c + per]).sum(0)
                acc += torch.einsum("itsd,itrd->sr", diff, gr.float()).double() / steps
                tick(len(adds[c:c + per]))
        else:
            jobs = [(grp, k) for grp in sgroups for k in range(1, steps + 1)]
            for c in range(0, len(jobs), per):
                chunk = jobs[c:c + per]
                adds = []
                for grp, k in chunk:
                    a = k / steps
                    w = (1 - a) if p.direction == "noise" else a
                    adds.append({s: w * (g.src_out[:, :, s] - g.base_out[:, :, s]) for s in grp})
                gr = _grads(p, g, adds)
                for j, (grp, _) in enumerate(chunk):
                    acc[grp] += torch.einsum("itsd,itrd->sr", diff[:, :, grp], gr[j].float()).double() / steps
                tick(len(chunk))
    out = (acc / p.n).float()
    out[~G.mask] = float("nan")
    return out


__all__ = ["VARIANTS", "Variant", "scores"]
