"""Mixture-of-experts MLPs (Mixtral): a router chooses, per token, the top-k of ``E`` expert MLPs.

The MLP sublayer of a mixture-of-experts block is::

    x = norm(resid_mid)
    router = x · W_gate^T                                   [B, n, E]   ← site ``router``
    p = softmax(router);  keep the k largest, renormalise → weights w   (zero off the top k)
    expert[e] = w_e · down_e(act(gate_e x) ⊙ up_e x)        [B, n, E, D] ← site ``expert``
    mlp_out = Σ_e expert[e]                                            ← site ``mlp_out``

Why these sites. The router logits decide *which* experts run: patching them (all of them, or one
expert's logit) re-routes the token, and the top-k choice is recomputed from the patched logits, so
a patch that moves an expert into or out of the top k changes the computation the way it would in
the model. ``expert[e]`` is what expert ``e`` adds to the stream (its routing weight included), so
patching one expert's output at one position is the mixture-of-experts analogue of patching one
head's output; the ``E`` outputs sum exactly to ``mlp_out``. There is no ``neuron`` site: each
expert has its own hidden layer (the kind table marks ``neuron`` dense-only).

The arithmetic is written here once and called by the runner's stages; the experts' weights are the
Hugging Face module's 3-D parameters (``gate_up_proj [E, 2M, D]``, ``down_proj [E, D, M]``). Only the
tokens routed to an expert are run through it (the others' rows stay zero), as in the HF forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def router_logits(router: Any, x: Tensor) -> Tensor:
    """Router logits ``[B, n, E]`` of the normalised stream ``x`` ``[B, n, D]``."""
    return F.linear(x, router.weight)


def routing_weights(logits: Tensor, top_k: int) -> Tensor:
    """Dense routing weights ``[B, n, E]``: softmax (float32), the top ``k`` kept and renormalised to
    sum to one, zero elsewhere."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, top)


def expert_outputs(experts: Any, act: Callable[[Tensor], Tensor], x: Tensor, weights: Tensor) -> Tensor:
    """Each expert's weighted output ``[B, n, E, D]`` (rows of tokens not routed to it are zero).

    Args:
        experts: the HF experts module (``gate_up_proj`` ``[E, 2M, D]``, ``down_proj`` ``[E, D, M]``).
        act: the activation of the gate.
        x: the normalised stream ``[B, n, D]``.
        weights: dense routing weights ``[B, n, E]`` (:func:`routing_weights`).
    """
    B, n, D = x.shape
    E = weights.shape[-1]
    xf, wf = x.reshape(B * n, D), weights.reshape(B * n, E)
    out = x.new_zeros(B * n, E, D)
    for e in range(E):
        tok = (wf[:, e] != 0).nonzero().squeeze(1)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(xf[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, experts.down_proj[e])
        out = out.index_put((tok, torch.full_like(tok, e)), y * wf[tok, e, None].to(y.dtype))
    return out.view(B, n, E, D)


__all__ = ["expert_outputs", "router_logits", "routing_weights"]
