"""One intervention type: write a new value into a site, computed from the site and a source.

Every way patchtrace changes a forward pass is an :class:`Intervention` — a *target* site, an
*operation*, and (for operations that need one) a *source*: a named run and a site of it, which may
be another layer, position or prompt than the target. A patch is a tuple of interventions applied
together. Activation patching, DBM's mask mixing, causal tracing's embedding noise, ablations and
back-patching are all spelled this way, and the engine (:mod:`patchtrace.engine.apply`) is the one
place that turns them into tensor writes.

==================  =========================================================  ===============
operation           new value of the target                                    needs a source
==================  =========================================================  ===============
:class:`Replace`    the source's value                                         yes
:class:`Mix`        ``(1 − w) · target + w · source`` (``w`` may require grad)  yes
:class:`Add`        ``target + v``                                             no
:class:`Zero`       ``0``                                                      no
:class:`Mean`       a mean over a reference set (precomputed tensor)           no
:class:`Resample`   the source's value from another example (``order[i]``)     yes
:class:`LogitBias`  attention probabilities as if ``bias`` were added to the   no
                    logits (``pattern`` sites only; exact: ``p·eᵇ / Σ p·eᵇ``)
==================  =========================================================  ===============

A negative position counts from the end of the sequence *in the call that runs the hook*, so
``pos=-1`` keeps addressing the newest token while a model generates (attribution-guided steering
biases the last query's attention this way at every generated token).

Shapes: a value for a site with a position is ``[N, *feature]`` (``N`` examples; ``feature`` =
``D``, ``d`` for one head, ``[H, d]`` for all heads ...); a value for all positions is
``[N, T, *feature]``. :class:`Add` and :class:`Mean` tensors may drop the leading ``N`` (the same for
every example).

Example:
    >>> from patchtrace.sites import Site
    >>> back = Intervention(Site("resid_post", 3, pos=-1), Replace(), SourceRef(site=Site("resid_post", 20, pos=-1)))
    >>> str(back)
    'resid_post[3]@-1 ← replace(source:resid_post[20]@-1)'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from patchtrace.errors import PatchtraceError
from patchtrace.sites import Site


class InterventionError(PatchtraceError, ValueError):
    """An intervention that cannot be applied (names the target, source or tensor)."""


@dataclass(frozen=True, slots=True)
class Replace:
    """The source's value replaces the target's."""

    def __str__(self) -> str:
        return "replace"


@dataclass(frozen=True, eq=False)
class Mix:
    """``(1 − weight) · target + weight · source``; ``weight`` a float or a tensor (broadcast over
    the value; it may require grad, as DBM's mask does)."""

    weight: float | Tensor

    def __str__(self) -> str:
        return f"mix({self.weight:g})" if isinstance(self.weight, float) else "mix(tensor)"


@dataclass(frozen=True, eq=False)
class Add:
    """``target + vector`` (steering, causal-tracing noise)."""

    vector: Tensor

    def __str__(self) -> str:
        return f"add({tuple(self.vector.shape)})"


@dataclass(frozen=True)
class Zero:
    """Zero ablation."""

    def __str__(self) -> str:
        return "zero"


@dataclass(frozen=True, eq=False)
class Mean:
    """Mean ablation: the target takes ``reference``, the mean of the site over a reference set
    (see :func:`patchtrace.engine.apply.mean_over` to compute it)."""

    reference: Tensor

    def __str__(self) -> str:
        return "mean"


@dataclass(frozen=True)
class Resample:
    """Resample ablation: example ``i`` takes the source's value of example ``order[i]``."""

    order: tuple[int, ...]

    def __str__(self) -> str:
        return "resample"


@dataclass(frozen=True, eq=False)
class LogitBias:
    """Re-weight a ``pattern`` row as if ``bias`` (``[K]``, over the first ``K`` key positions; later
    keys get 0) were added to the attention logits before the softmax."""

    bias: Tensor

    def __str__(self) -> str:
        return "logit_bias"


Op = Replace | Mix | Add | Zero | Mean | Resample | LogitBias
_NEEDS_SOURCE = (Replace, Mix, Resample)


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a value comes from: a named run (``"source"`` by default: the clean run when denoising)
    and a site of it (None: the target site itself)."""

    run: str = "source"
    site: Site | None = None


@dataclass(frozen=True, eq=False, slots=True)
class Intervention:
    """Write ``op(target, source)`` into ``target``.

    Raises:
        InterventionError: a source given to an operation that takes none, a source site of another
            kind whose value cannot have the target's shape, or a resample order that is not a
            permutation-sized list of indices.
    """

    target: Site
    op: Op = field(default_factory=Replace)
    source: SourceRef | None = None

    def __post_init__(self) -> None:
        needs = isinstance(self.op, _NEEDS_SOURCE)
        if needs and self.source is None:
            object.__setattr__(self, "source", SourceRef())
        if not needs and self.source is not None:
            raise InterventionError(f"{self.target}: operation {self.op} takes no source (got {self.source})")
        s = self.source_site
        if s is not None and (s.unit is None) != (self.target.unit is None):
            raise InterventionError(f"{self.target}: source {s} must address a unit exactly when the target does")
        if s is not None and (s.pos is None) != (self.target.pos is None):
            raise InterventionError(f"{self.target}: source {s} must have a position exactly when the target does")
        if isinstance(self.op, LogitBias) and self.target.kind != "pattern":
            raise InterventionError(f"{self.target}: a logit bias applies to attention patterns only")
        if isinstance(self.op, Resample) and any(i < 0 for i in self.op.order):
            raise InterventionError(f"{self.target}: resample order {self.op.order} has a negative index")

    @property
    def source_site(self) -> Site | None:
        """The site the source value is read from (None: the operation needs no source)."""
        if self.source is None:
            return None
        return self.source.site or self.target

    @property
    def same_site_replace(self) -> bool:
        """A plain patch: replace from the default source run at the target site (the engine's
        vectorized case, and the one whose no-op can be detected by comparing cached values)."""
        return isinstance(self.op, Replace) and self.source is not None and self.source.site in (None, self.target)

    def __str__(self) -> str:
        if self.source is None:
            return f"{self.target} ← {self.op}"
        where = str(self.source_site) if self.source.site is not None else "same site"
        return f"{self.target} ← {self.op}({self.source.run}:{where})"


__all__ = [
    "Add",
    "Intervention",
    "InterventionError",
    "LogitBias",
    "Mean",
    "Mix",
    "Op",
    "Replace",
    "Resample",
    "SourceRef",
    "Zero",
]
