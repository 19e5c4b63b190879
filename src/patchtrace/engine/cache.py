"""Recorded runs: the activations, keys/values and logits the engine patches from and resumes into.

A :class:`RunCache` holds one forward over an equal-length group of examples: every layer's
``resid_pre`` (where a resumed run starts), the hook points a sweep asked for (the values it patches
in or rebuilds joining rows from), every layer's keys and values (the prefix a suffix-only run
attends to) and the last-position logits (the unpatched metric).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from patchtrace.kinds import needs_explicit_attention
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn, RunCtx
from patchtrace.sites import HookPoint


@dataclass
class RunCache:
    """Activations of one run over an equal-length group of examples.

    Attributes:
        acts: full-length activations per hook point, ``[N, T, ...]`` (``pattern``: ``[N, H, T, T]``).
        kv: per layer, keys and values ``[N, K, T, d]``.
        logits: last-position logits ``[N, V]``.
    """

    acts: dict[HookPoint, Tensor]
    kv: list[tuple[Tensor, Tensor]]
    logits: Tensor

    @property
    def length(self) -> int:
        """The prompts' token length ``T``."""
        return int(self.kv[0][0].shape[2]) if self.kv else int(next(iter(self.acts.values())).shape[1])


def collect(
    model: Model,
    ids: Tensor,
    points: Iterable[HookPoint] = (),
    *,
    hooks: dict[HookPoint, list[HookFn]] | None = None,
) -> RunCache:
    """One forward over ``ids`` ``[N, T]``, recording ``resid_pre`` of every layer, the given points,
    all keys/values, and the last-position logits."""
    n_layers = model.dims.n_layers
    want = set(points) | {HookPoint("resid_pre", i) for i in range(n_layers)}
    acts: dict[HookPoint, Tensor] = {}
    all_hooks: dict[HookPoint, list[HookFn]] = defaultdict(list)
    for hp, fns in (hooks or {}).items():
        all_hooks[hp].extend(fns)

    def rec(hp: HookPoint) -> HookFn:
        def fn(x: Tensor, ctx: RunCtx) -> None:
            acts[hp] = x.detach().clone()

        return fn

    for hp in want:
        all_hooks[hp].append(rec(hp))
    explicit = needs_explicit_attention(hp.kind for hp in want)
    with torch.no_grad():
        out = model.runner.forward(ids, hooks=all_hooks, keep_kv=True, last_only=True, explicit_attention=explicit)
    assert out.logits is not None and out.kv is not None
    kv = [(k.clone(), v.clone()) for k, v in out.kv if k is not None]  # type: ignore[misc]
    return RunCache(acts, kv, out.logits[:, -1].float())


__all__ = ["RunCache", "collect"]
