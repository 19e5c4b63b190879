"""The run cache: each (desideratum batch, original or alternate) runs through the model once per DBM run.

Mask training, the exact-patching ranking and the exact evaluation all start from the same two
unpatched runs of every equal-length batch: the *original* prompts (the base of every patch) and
the *alternate* prompts (the source). :class:`RunStore` collects each of them once
(:func:`~patchtrace.engine.sweep.collect`: residual stream, keys/values, last-position logits and the
activations at the masked hook points) and hands the same run to every later request.

One store belongs to one :func:`~patchtrace.methods.dbm.run` call (it holds activations, so it is
not kept beyond it); a λ sweep that trains several masks on the same tuples can pass its own store
to :func:`~patchtrace.methods.dbm.components.prepare`, the ranking and the evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from patchtrace.desiderata import TokenizedDesideratum
from patchtrace.engine.sweep import RunCache, collect
from patchtrace.models.load import Model
from patchtrace.sites import HookPoint

Which = Literal["original", "alternate"]


class RunStore:
    """Caches unpatched runs of desiderata batches.

    Args:
        points: hook points to record in every run (besides what
            :func:`~patchtrace.engine.sweep.collect` always keeps). Give the masked components' points
            up front and every run is collected exactly once.

    A request for a point a cached run lacks re-collects that run with the union of the points (so
    the cache only ever grows). Entries hold their :class:`TokenizedDesideratum`, so the identity
    used as the key cannot be reused by another object while the store lives.

    Attributes:
        n_collected: how many forwards the store has run (for tests and cost accounting).
    """

    def __init__(self, points: Iterable[HookPoint] = ()) -> None:
        self.points: frozenset[HookPoint] = frozenset(points)
        self._d: dict[tuple[int, str, tuple[int, ...]], tuple[TokenizedDesideratum, frozenset[HookPoint], RunCache]] = {}
        self.n_collected = 0

    def get(
        self, model: Model, td: TokenizedDesideratum, which: Which, idx: Sequence[int], points: Iterable[HookPoint] = ()
    ) -> RunCache:
        """The unpatched run of tuples ``idx`` (one equal-length group) of ``td``'s ``which`` prompts.

        Args:
            model: the model.
            td: the tokenized desideratum.
            which: ``"original"`` or ``"alternate"``.
            idx: tuple indices of one equal-length group (:meth:`TokenizedDesideratum.groups`).
            points: hook points this caller needs (added to the store's own).
        """
        key = (id(td), which, tuple(idx))
        want = self.points | frozenset(points)
        hit = self._d.get(key)
        if hit is not None and want <= hit[1]:
            return hit[2]
        if hit is not None:
            want = want | hit[1]
        run = collect(model, td.ids(which, idx).to(model.device), want)
        self.n_collected += 1
        self._d[key] = (td, want, run)
        return run
