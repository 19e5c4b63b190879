"""Patches as the engine runs them, and the metric of a batch of patched runs.

A :class:`Patch` is a tuple of :class:`~patchtrace.interventions.Intervention` applied together in
one run (a plain site stands for "replace it from the source run"). Before the engine runs it,
every position is made absolute and checked against the prompts (:func:`resolve`,
:func:`resolve_patch`), so an out-of-range layer, unit or position fails with an error naming the
site, never an ``IndexError`` deep in a hook.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from torch import Tensor

from patchtrace.errors import PatchtraceError
from patchtrace.grid import Grid
from patchtrace.interventions import Intervention, SourceRef
from patchtrace.kinds import available, kind_info
from patchtrace.metrics import Metric
from patchtrace.models.load import Model
from patchtrace.sites import Site


class EngineError(PatchtraceError, ValueError):
    """A patch that does not fit the model or the prompts (names the site)."""


@dataclass(frozen=True, init=False, eq=False, slots=True)
class Patch:
    """Interventions applied together (positions absolute and non-negative, or None for all).

    Args:
        items: interventions, or sites (each meaning ``Intervention(site)``: replace from the source run).
    """

    interventions: tuple[Intervention, ...]

    def __init__(self, items: Iterable[Site | Intervention]) -> None:
        ivs = tuple(x if isinstance(x, Intervention) else Intervention(x) for x in items)
        if not ivs:
            raise EngineError("a patch needs at least one intervention")
        object.__setattr__(self, "interventions", ivs)

    @property
    def sites(self) -> tuple[Site, ...]:
        """The target sites."""
        return tuple(iv.target for iv in self.interventions)

    @property
    def start_layer(self) -> int:
        """First layer the patch touches (-1 for ``embed``)."""
        return min(-1 if s.layer is None else s.layer for s in self.sites)

    @property
    def start_pos(self) -> int:
        return min(0 if s.pos is None else s.pos for s in self.sites)

    @property
    def plain(self) -> bool:
        """Every intervention replaces from the default source run at its own site."""
        return all(iv.same_site_replace and iv.source.run == "source" for iv in self.interventions)  # type: ignore[union-attr]


def resolve(site: Site, model: Model, T: int) -> Site:
    """Check a site against the model and sequence length; make its position absolute.

    Raises:
        EngineError: a layer, unit or position out of range, or a kind the model's blocks lack.
    """
    d = model.dims
    info = kind_info(site.kind)
    if site.layer is not None and not 0 <= site.layer < d.n_layers:
        raise EngineError(f"site {site}: layer {site.layer} out of range (model has {d.n_layers} layers)")
    if info.sequential_only and d.parallel_residual:
        raise EngineError(f"site {site}: {model.family.name} blocks are parallel; there is no {site.kind}")
    if not available(site.kind, d):
        mlp = "a mixture of experts (sites: router, expert)" if info.blocks == "dense" else "one dense MLP"
        raise EngineError(f"site {site}: {model.family.name} MLPs are {mlp}; there is no {site.kind}")
    if site.unit is not None:
        n_units = info.units(d)
        if n_units is not None and not 0 <= site.unit < n_units:
            raise EngineError(f"site {site}: unit {site.unit} out of range ({site.kind} has {n_units})")
    pos = site.pos
    if pos is not None:
        if not -T <= pos < T:
            raise EngineError(f"site {site}: position {pos} out of range for prompts of {T} tokens")
        pos %= T
    return Site(site.kind, site.layer, site.unit, pos)


class CellPatches(Sequence[Patch]):
    """One plain patch per cell of a site grid (row-major), each built when it is read.

    A sweep over every MLP neuron of a small model is 46,080 cells; holding a :class:`Patch` (with
    its intervention, source reference and site) for each costs ~14 MB of Python objects for the
    whole sweep, though a block reads only its own few hundred. This sequence holds the grid and
    builds ``Patch((resolve(site),))`` on each read, so a sweep keeps only one block's patches alive.
    Reading every item once (the memory plan does, before any compute) checks every site.

    Args:
        grid: a grid whose cells are single sites (:attr:`Grid.addresses_sites`).
        model: the model the sites are resolved against.
        T: the prompts' length (negative positions become absolute).
    """

    def __init__(self, grid: Grid, model: Model, T: int) -> None:
        self.grid, self.model, self.T = grid, model, T
        self._n = len(grid)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Patch: ...
    @overload
    def __getitem__(self, i: slice) -> list[Patch]: ...
    def __getitem__(self, i: int | slice) -> Patch | list[Patch]:
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(self._n))]
        j = int(i) + self._n if i < 0 else int(i)
        if not 0 <= j < self._n:
            raise IndexError(f"cell {i} of a grid of {self._n}")
        return self._one(j)

    def _one(self, j: int) -> Patch:
        return Patch((resolve(self.grid.site_at(self.grid.index_at(j)), self.model, self.T),))


def resolve_patch(patch: Patch, model: Model, T: int, runs: Mapping[str, Any] | None = None) -> Patch:
    """:func:`resolve` every target (against ``T``) and every source site (against its own run's
    length, which may differ for a cross-prompt source).

    Raises:
        EngineError: a site out of range, or a source run that is not among ``runs``.
    """
    out = []
    for iv in patch.interventions:
        src = iv.source
        if src is not None and src.site is not None:
            run = (runs or {}).get(src.run)
            if run is None and src.run not in ("source", "base"):
                raise EngineError(f"{iv}: no run named {src.run!r}")
            Ts = run.length if run is not None else T
            src = SourceRef(src.run, resolve(src.site, model, Ts))
        out.append(Intervention(resolve(iv.target, model, T), iv.op, src))
    return Patch(out)


@dataclass
class Scorer:
    """Turns readout-position logits of ``P × N`` rows into the metric ``[P, N]``.

    ``pos`` ``[N]`` are the examples' absolute readout positions (a masked LM's mask position); None
    reads the last position. The engine unembeds only there.
    """

    metric: Metric
    answer: Tensor
    wrong: Tensor
    ref_logprobs: Tensor | None = None
    cols: Tensor | None = field(default=None)
    pos: Tensor | None = None

    def __post_init__(self) -> None:
        self.cols = self.metric.columns(self.answer, self.wrong)

    def __call__(self, logits: Tensor, n_patches: int, cols_used: bool) -> Tensor:
        reps = n_patches
        ref = self.ref_logprobs.repeat(reps, 1) if self.ref_logprobs is not None else None
        vals = self.metric.score(
            logits,
            self.answer.repeat(reps, 1),
            self.wrong.repeat(reps, 1),
            ref,
            self.cols if cols_used else None,
        )
        return vals.view(n_patches, -1)


__all__ = ["CellPatches", "EngineError", "Patch", "Scorer", "resolve", "resolve_patch"]
