"""Recorded runs: the activations, keys/values and logits the engine patches from and resumes into.

A :class:`RunCache` holds one forward over an equal-length group of examples: every layer's
``resid_pre`` (where a resumed run starts), the hook points a sweep asked for (the values it patches
in or rebuilds joining rows from), every layer's keys and values (the prefix a suffix-only run
attends to) and the last-position logits (the unpatched metric).

Only the positions a sweep reads are kept. A sweep whose patches all start at position ``p`` or
later (a last-position head or neuron sweep: ``p = T − 1``) never reads an activation before ``p``:
the fast path recomputes positions ``p..T−1`` from the cached residual stream and attends to the
cached *keys and values* of the earlier positions, and every patched value sits at a position
``≥ p``. So :func:`collect` with ``from_pos=p`` keeps activations of positions ``p..T−1`` only
(``pos0 = p``; keys/values stay whole): a 30-layer last-position head sweep's two runs shrink
from ~160 MB to ~15 MB. Readers index absolute positions through :meth:`RunCache.local`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from patchtrace.kinds import kind_info, needs_explicit_attention
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn, RunCtx
from patchtrace.sites import HookPoint


@dataclass
class RunCache:
    """Activations of one run over an equal-length group of examples.

    Attributes:
        acts: activations per hook point of positions ``pos0..T−1``, ``[N, T − pos0, ...]``
            (``pattern``: ``[N, H, T − pos0, T]``, query positions trimmed).
        kv: per layer, keys and values ``[N, K, T, d]`` (all positions: the prefix a resumed run
            attends to).
        logits: last-position logits ``[N, V]``.
        pos0: the first position held in ``acts`` (0: every position).
        T: the prompts' token length (None: read from ``kv``); a run recorded without keys/values
            (``collect(base=False)``) still knows it.
    """

    acts: dict[HookPoint, Tensor]
    kv: list[tuple[Tensor, Tensor]]
    logits: Tensor
    pos0: int = 0
    T: int | None = None

    def local(self, pos: int) -> int:
        """Where absolute position ``pos`` sits in ``acts`` (refuses one that was not kept)."""
        if pos < self.pos0:
            raise IndexError(f"position {pos} was not recorded (this run keeps positions {self.pos0}.. only)")
        return pos - self.pos0

    @property
    def length(self) -> int:
        """The prompts' token length ``T``: given, else from the keys/values, else ``pos0`` plus the
        positions an activation holds (along its kind's position axis)."""
        if self.T is not None:
            return self.T
        if self.kv:
            return int(self.kv[0][0].shape[2])
        hp, a = next(iter(self.acts.items()))
        return self.pos0 + int(a.shape[kind_info(hp.kind).pos_dim])


def collect(
    model: Model,
    ids: Tensor,
    points: Iterable[HookPoint] = (),
    *,
    hooks: dict[HookPoint, list[HookFn]] | None = None,
    from_pos: int = 0,
    readout: Tensor | None = None,
    base: bool = True,
) -> RunCache:
    """One forward over ``ids`` ``[N, T]``, recording ``resid_pre`` of every layer, the given points
    (positions ``from_pos..T−1`` only), all keys/values, and the last-position logits (``readout``
    ``[N]``: the logits at those positions, a masked LM's mask positions).

    ``base=False`` records a run that is only patched *from*: the given points and the logits, no
    ``resid_pre`` and no keys/values (a fast run resumes from, and attends to, the base run only)."""
    n_layers = model.dims.n_layers
    want = set(points) | ({HookPoint("resid_pre", i) for i in range(n_layers)} if base else set())
    acts: dict[HookPoint, Tensor] = {}
    all_hooks: dict[HookPoint, list[HookFn]] = defaultdict(list)
    for hp, fns in (hooks or {}).items():
        all_hooks[hp].extend(fns)

    def rec(hp: HookPoint) -> HookFn:
        dim = kind_info(hp.kind).pos_dim

        def fn(x: Tensor, ctx: RunCtx) -> None:
            acts[hp] = x.detach().narrow(dim, from_pos, x.shape[dim] - from_pos).clone()

        return fn

    for hp in want:
        all_hooks[hp].append(rec(hp))
    explicit = needs_explicit_attention(hp.kind for hp in want)
    with torch.no_grad():
        out = model.runner.forward(ids, hooks=all_hooks, keep_kv=base, last_only=True, explicit_attention=explicit,
                                   readout=readout)
    assert out.logits is not None and (out.kv is not None or not base)
    kv: list[tuple[Tensor, Tensor]] = []
    for i, pair in enumerate(out.kv or []):  # copy each layer's keys/values and drop the forward's at once
        if pair is not None and out.kv is not None:
            kv.append((pair[0].clone(), pair[1].clone()))
            out.kv[i] = None
    return RunCache(acts, kv, out.logits[:, -1].float(), from_pos, int(ids.shape[1]))


__all__ = ["RunCache", "collect"]
