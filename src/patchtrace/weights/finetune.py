"""Partial-layer fine-tuning: train only the tensors localization chose, ship only those.

Freeze every parameter, unfreeze a selection (layer indices, globs, a regex, a callable: see
:mod:`patchtrace.weights.select`), train with an ordinary loop, and export exactly the trained tensors
as a :class:`~patchtrace.weights.WeightPatch` against the weights the run started from. The frozen
tensors are untouched by construction (they get no gradient and are not given to the optimizer), so
the patch *is* the whole update: applying it to the starting model gives the fine-tuned model.
This is also the delivery story of SwarmUpdate's model patches: update some layers, ship those.

One caveat is checked rather than assumed: buffers updated by forward passes in training mode (batch
norm running statistics) change outside the selection. :func:`finetune` notices any unselected
buffer whose value moved and warns, naming it (select it too, or train in eval mode).
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceWarning
from patchtrace.progress import Progress
from patchtrace.weights.errors import WeightPatchError
from patchtrace.weights.patch import WeightPatch
from patchtrace.weights.select import Selector, select_names
from patchtrace.weights.state import architecture, base_hash, module_of, tensors_of


def freeze_except(model: Any, select: Selector) -> list[str]:
    """Set ``requires_grad`` on exactly the parameters ``select`` picks; returns their names.

    Raises:
        WeightPatchError: the selector matches no floating-point parameter.
    """
    mod = module_of(model)
    params = dict(mod.named_parameters())
    names = select_names(params, select, floating=lambda n: params[n].is_floating_point())
    keep = set(names)
    for n, p in params.items():
        p.requires_grad_(n in keep)
    return names


@dataclass(frozen=True)
class PartialUpdate:
    """A finished partial fine-tune.

    Attributes:
        patch: the trained tensors' deltas against the starting weights (its base).
        losses: the training loss per step.
        trainable: parameters trained; ``total``: parameters of the model.
        seconds: wall time of the training loop.
    """

    patch: WeightPatch
    losses: list[float]
    trainable: int
    total: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int | float]:
        """Patch bytes against a full copy of the model and against the full (all-tensor, float32) delta."""
        return size_report(self.patch)


def size_report(patch: WeightPatch) -> dict[str, int | float]:
    """``patch_bytes``, ``model_bytes`` (a full weight copy), ``full_delta_bytes`` (float32 deltas of
    every floating tensor) and the two ratios."""
    full_delta = sum(4 * _n(s) for _, s, d in patch.arch if d.startswith(("float", "bfloat")))
    return {
        "patch_bytes": patch.nbytes,
        "model_bytes": patch.model_bytes,
        "full_delta_bytes": full_delta,
        "model_over_patch": patch.model_bytes / max(patch.nbytes, 1),
        "full_delta_over_patch": full_delta / max(patch.nbytes, 1),
    }


def _n(shape: Iterable[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def train_steps(
    who: str,
    mod: Any,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: Iterable[Any],
    steps: int,
    losses: list[float],
    on_loss: Callable[[int, float], None] | None,
    on_progress: Progress | None,
) -> None:
    """Run ``steps`` optimiser steps over ``batches`` (cycled), appending each loss to ``losses``.

    Raises :class:`WeightPatchError` (prefixed ``who``) on a NaN or infinite loss; shared by
    ``finetune`` and ``lora.train_lora``.
    """
    for step, batch in zip(range(steps), itertools.cycle(batches)):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(mod, batch)
        value = float(loss.detach())
        if value != value or abs(value) == float("inf"):
            raise WeightPatchError(f"{who}: the loss is {value} at step {step}")
        loss.backward()
        opt.step()
        losses.append(value)
        if on_loss is not None:
            on_loss(step, value)
        if on_progress is not None:
            on_progress(step + 1, steps)


def finetune(
    model: Any,
    select: Selector,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    *,
    on_progress: Progress | None = None,
    on_loss: Callable[[int, float], None] | None = None,
) -> PartialUpdate:
    """Train only the selected parameters of ``model`` (in place) and export them as a patch.

    Args:
        model: any ``torch.nn.Module`` (or a patchtrace ``Model``).
        select: which parameters train (the rest are frozen for the run; flags are restored after).
        batches: an iterable of batches, cycled until ``steps`` steps are done.
        loss_fn: ``loss_fn(module, batch) -> scalar loss``.
        steps: optimizer steps; ``lr``, ``weight_decay``, ``optimizer`` (``adam``, ``adamw``, ``sgd``).
        on_progress: ``(done, total)`` per step; ``on_loss``: ``(step, loss)`` per step.

    Returns:
        the :class:`PartialUpdate`. The model keeps the fine-tuned weights; ``update.patch`` applied
        to a copy of the starting weights reproduces them (up to the float32 rounding of the delta).

    Raises:
        WeightPatchError: an empty selection, ``steps < 1``, an unknown optimizer, a non-finite loss.
    """
    if steps < 1:
        raise WeightPatchError(f"finetune: steps {steps}: need ≥ 1")
    mod = module_of(model)
    arch, h = architecture(mod), base_hash(mod)
    flags = {n: p.requires_grad for n, p in mod.named_parameters()}
    names = freeze_except(mod, select)
    start = {n: t.detach().clone() for n, t in tensors_of(mod).items() if n in set(names)}
    buffers = {n: b.detach().clone() for n, b in mod.named_buffers() if n not in start}
    params = [p for n, p in mod.named_parameters() if n in start]
    opts = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if optimizer not in opts:
        raise WeightPatchError(f"finetune: optimizer {optimizer!r}: use one of {', '.join(opts)}")
    opt = opts[optimizer](params, lr=lr, weight_decay=weight_decay)
    was_training = mod.training
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        mod.train()
        train_steps("finetune", mod, opt, loss_fn, batches, steps, losses, on_loss, on_progress)
    finally:
        mod.train(was_training)
        for n, p in mod.named_parameters():
            p.requires_grad_(flags[n])
    seconds = time.perf_counter() - t0
    live = dict(mod.named_buffers())
    moved = [n for n, b in buffers.items() if n in live and not torch.equal(live[n], b)]
    if moved:
        warnings.warn(f"finetune: {len(moved)} unselected tensor(s) changed during training (e.g. {moved[0]!r}, "
                      "a running statistic?); the patch does not hold them", PatchtraceWarning, stacklevel=2)
    now = tensors_of(mod)
    deltas = {n: (now[n].detach().double() - start[n].double()).float().cpu() for n in start}
    patch = WeightPatch(deltas, arch, h, meta={"op": "finetune", "select": str(select), "steps": steps, "lr": lr})
    total = sum(p.numel() for p in mod.parameters())
    return PartialUpdate(patch, losses, sum(p.numel() for p in params), total, seconds)


__all__ = ["PartialUpdate", "finetune", "freeze_except", "size_report"]
