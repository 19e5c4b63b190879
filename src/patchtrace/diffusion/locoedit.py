"""LocoEdit: a closed-form edit of the localized layers' key/value projections (Basu et al., ICML 2024).

After LocoGen finds the layers that read an attribute, LocoEdit changes only their ``W_k`` and
``W_v`` so that the text states of *concept* prompts (which state the attribute) produce the keys
and values that an *anchor* (without it) produces — the image then no longer shows the attribute,
while every other prompt, whose states are far from the concept's, keeps its keys and values.

For each edited matrix ``W_old`` (``out × d_text``), with rows ``x_i`` of ``X`` the concept prompts'
states and rows ``y_i`` of ``Y`` the anchor's, at the token just before the end-of-text token::

    W* = argmin_W  Σ_i ‖W x_i − W_old y_i‖²  +  λ ‖W − W_old‖²_F
    W*ᵀ = (XᵀX + λI)⁻¹ (XᵀY W_oldᵀ + λ W_oldᵀ)

λ = 0.01 as in the paper's code (``reg_key``). One anchor for all concept prompts (the paper) or one
per concept prompt (the same prompt without the attribute; a closer target for templated prompts).
The result is a :class:`~patchtrace.weights.patch.WeightPatch` on the UNet (checksummed file, base
model hash, all-or-nothing apply, bit-exact removal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter

LAMBDA = 0.01


def last_token_states(adapter: T2IAdapter, prompts: Sequence[str]) -> Any:
    """Per prompt, the text state at the last token before end-of-text: ``(n, d_text)``."""
    import torch

    cond = adapter.encode(list(prompts))
    tok = adapter.tokenizers()[0]
    idx = [len(tok(p).input_ids) - 2 for p in prompts]  # ids = [bos, ..., last, eos]
    return cond.pos[torch.arange(len(prompts)), torch.tensor(idx)]


def solve(w_old: Any, x: Any, y: Any, lam: float = LAMBDA) -> Any:
    """The closed form above, in float64; ``x``: ``(n, d)``, ``y``: ``(n, d)`` or ``(1, d)``."""
    import torch

    W, X = w_old.double(), x.double()
    Y = y.double().expand_as(X)
    eye = torch.eye(X.shape[1], dtype=torch.float64)
    wt = torch.linalg.solve(X.T @ X + lam * eye, X.T @ Y @ W.T + lam * W.T)
    return wt.T.to(w_old.dtype)


def locoedit(
    adapter: T2IAdapter,
    layers: Sequence[int],
    concept_prompts: Sequence[str],
    anchor_prompts: Sequence[str],
    lam: float = LAMBDA,
) -> Any:
    """The edit of ``to_k``/``to_v`` of cross-attention ``layers`` (forward indices) as a ``WeightPatch``.

    Raises:
        DiffusionError: a layer that does not exist, no concept prompts, or anchors that neither
            number one nor match the concept prompts one to one.
    """

    if not concept_prompts:
        raise DiffusionError("LocoEdit needs at least one concept prompt")
    if len(anchor_prompts) not in (1, len(concept_prompts)):
        raise DiffusionError(f"{len(anchor_prompts)} anchors for {len(concept_prompts)} concept prompts: give 1 or one each")
    for j in layers:
        if not 0 <= j < adapter.n_layers:
            raise DiffusionError(f"cross-attention layer {j} does not exist (the UNet has {adapter.n_layers})")
    x = last_token_states(adapter, concept_prompts)
    y = last_token_states(adapter, anchor_prompts)
    targets = [(f"{adapter.layers[j].name}.{proj}.weight", x, y) for j in layers for proj in ("to_k", "to_v")]
    return solve_patch(adapter.pipe.unet, targets, lam,
                       {"method": "locoedit", "layers": list(layers), "lambda": lam,
                        "concept_prompts": list(concept_prompts), "anchor_prompts": list(anchor_prompts)})  # fmt: skip


def solve_patch(module: Any, targets: Sequence[tuple[str, Any, Any]], lam: float, meta: dict[str, Any]) -> Any:
    """Solve :func:`solve` for each ``(weight name, x, y)`` of ``module`` and return the edit as a
    ``WeightPatch`` of exactly those weights (``meta`` recorded); ``module`` is left unchanged."""
    from patchtrace.weights.patch import WeightPatch

    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tuned = dict(base)
    for name, x, y in targets:
        tuned[name] = solve(base[name], x, y, lam)
    chosen = {name for name, _, _ in targets}
    return WeightPatch.extract(base, tuned, select=lambda n: n in chosen, meta=meta)
