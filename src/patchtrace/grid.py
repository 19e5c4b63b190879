"""Grids of sites and the axes that label them.

A sweep scores a *grid*: the cartesian product of a few axes (``layer × head``, ``layer × pos``,
``source_layer × target_layer`` ...). A :class:`Grid` knows its axes, the model index at each offset
of each axis (a sweep over ``layers=(10, 20)`` has offsets 0, 1 but layers 10, 20), and the
coordinates that are fixed rather than swept (``pos = -1`` for a last-position sweep). From that it
enumerates its cells in row-major order, turns an index into a site and a site back into an index,
and writes the labels a result carries — so every method, table, report and dataframe names cells
the same way, from one place.

Axes form an open vocabulary: each is declared once in :data:`AXES` (name, tick prefix, which field
of a :class:`~patchtrace.sites.Site` it sets, if any) and then works in results, reports and tables.
A new axis (a diffusion timestep, an edge's sender) is one :func:`declare_axis` call.

Example:
    >>> g = Grid("head", ("layer", "head"), ((10, 20), (3,)), {"pos": -1})
    >>> [str(s) for s in g.sites()]
    ['head[10].h3@-1', 'head[20].h3@-1']
    >>> g.index_of(g.site_at((1, 0)))
    (1, 0)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Literal

from patchtrace.errors import PatchtraceError
from patchtrace.kinds import kind_info
from patchtrace.sites import Site

SiteField = Literal["layer", "unit", "pos"]


class GridError(PatchtraceError, ValueError):
    """An axis that is not declared, labels that do not fit, or a cell outside the grid."""


@dataclass(frozen=True)
class Axis:
    """One declared axis.

    Attributes:
        name: the axis name used in results (``layer``, ``timestep`` ...).
        prefix: tick-label prefix in reports (``L`` → ``L3``).
        site_field: the :class:`Site` field this axis sets (``layer``, ``unit``, ``pos``), or None
            for axes that do not address a single site (``source_layer``, ``timestep`` ...).
        doc: what the axis indexes.
    """

    name: str
    prefix: str
    site_field: SiteField | None
    doc: str


def _builtin_axes() -> dict[str, Axis]:
    rows = [
        ("layer", "L", "layer", "transformer layer"),
        ("head", "H", "unit", "query head"),
        ("kv_head", "KV", "unit", "key/value head (differs from query heads under GQA)"),
        ("neuron", "N", "unit", "MLP hidden unit"),
        ("expert", "E", "unit", "expert of a mixture-of-experts MLP"),
        ("pos", "", "pos", "token position (negative: from the end)"),
        ("source_layer", "src L", None, "layer a value is read from (cross-layer patching)"),
        ("target_layer", "tgt L", None, "layer a value is written into (cross-layer patching)"),
        ("sender", "S", None, "an edge's sending component"),
        ("receiver", "R", None, "an edge's receiving component"),
        ("window", "W", None, "a window of consecutive layers (causal tracing)"),
        ("timestep", "t", None, "a diffusion timestep"),
        ("token", "tok", None, "a prompt token (text encoders)"),
        ("example", "ex", None, "an example of the task"),
    ]
    return {n: Axis(n, p, f, d) for n, p, f, d in rows}  # type: ignore[arg-type]


#: The declared axes. Extend with :func:`declare_axis`.
AXES: dict[str, Axis] = _builtin_axes()


def declare_axis(name: str, prefix: str = "", site_field: SiteField | None = None, doc: str = "") -> Axis:
    """Declare a new axis (once); results, reports and tables then accept it.

    Raises:
        GridError: the name is taken by a different declaration.
    """
    ax = Axis(name, prefix, site_field, doc)
    old = AXES.get(name)
    if old is not None and old != ax:
        raise GridError(f"axis {name!r} is already declared as {old}")
    AXES[name] = ax
    return ax


def axis(name: str) -> Axis:
    """The declaration of ``name``.

    Raises:
        GridError: an undeclared axis (the message lists the declared ones).
    """
    a = AXES.get(name)
    if a is None:
        raise GridError(f"unknown axis {name!r}; declared axes are {', '.join(AXES)} (see grid.declare_axis)")
    return a


@dataclass(frozen=True)
class Grid:
    """A cartesian grid of cells over declared axes.

    Args:
        kind: the site kind scored (used to build sites; any string for grids that are not sites).
        axes: axis names, in the order of the result tensor's dimensions.
        coords: per axis, the model index at each offset (``((10, 20), (3,))``).
        fixed: coordinates that are the same for every cell (``{"pos": -1}``).
    """

    kind: str
    axes: tuple[str, ...]
    coords: tuple[tuple[int, ...], ...]
    fixed: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.coords):
            raise GridError(f"grid has {len(self.axes)} axes {self.axes} but {len(self.coords)} coordinate lists")
        if len(set(self.axes)) != len(self.axes):
            raise GridError(f"repeated axis in {self.axes}")
        for a in self.axes:
            axis(a)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.coords)

    def __len__(self) -> int:
        n = 1
        for c in self.coords:
            n *= len(c)
        return n

    def indices(self) -> Iterator[tuple[int, ...]]:
        """Every multi-index, row-major."""
        return iter(product(*[range(len(c)) for c in self.coords]))

    def index_at(self, flat: int) -> tuple[int, ...]:
        """The multi-index of cell number ``flat`` in :meth:`indices`' (row-major) order.

        Raises:
            GridError: ``flat`` is outside ``0 … len − 1``.
        """
        if not 0 <= flat < len(self):
            raise GridError(f"cell {flat} is outside a grid of {len(self)} cells")
        out = []
        for c in reversed(self.coords):
            flat, i = divmod(flat, len(c))
            out.append(i)
        return tuple(reversed(out))

    def coords_at(self, index: Sequence[int]) -> dict[str, int]:
        """``{axis: model index}`` of a cell (fixed coordinates included).

        Raises:
            GridError: the index does not fit the grid.
        """
        if len(index) != len(self.axes):
            raise GridError(f"index {tuple(index)} has {len(index)} entries; the grid has axes {self.axes}")
        out = dict(self.fixed)
        for a, c, i in zip(self.axes, self.coords, index, strict=True):
            if not 0 <= int(i) < len(c):
                raise GridError(f"index {int(i)} is outside axis {a!r} of size {len(c)}")
            out[a] = c[int(i)]
        return out

    @property
    def addresses_sites(self) -> bool:
        """Whether each cell is one :class:`Site` (every axis sets a site field)."""
        return all(axis(a).site_field is not None for a in self.axes)

    def site_at(self, index: Sequence[int]) -> Site:
        """The site a cell patches.

        Raises:
            GridError: a grid whose axes do not address single sites (e.g. ``source_layer``).
        """
        if not self.addresses_sites:
            raise GridError(f"cells of a grid over {self.axes} are not single sites; use coords_at()")
        kw: dict[str, int | None] = {"layer": None, "unit": None, "pos": None}
        for a, v in self.coords_at(index).items():
            f = AXES[a].site_field if a in AXES else None
            if f is not None:
                kw[f] = v
        info = kind_info(self.kind)
        layer = kw["layer"] if info.has_layer else None
        if info.has_layer and layer is None:
            layer = 0
        return Site(self.kind, layer, kw["unit"], kw["pos"])  # type: ignore[arg-type]

    def label(self, index: Sequence[int]) -> str:
        """A cell's name: the site string, or ``src L12 · tgt L3`` for grids that are not sites."""
        if self.addresses_sites:
            return str(self.site_at(index))
        c = self.coords_at(index)
        return " · ".join(f"{AXES[a].prefix or a + '='}{c[a]}" for a in self.axes)

    def sites(self) -> list[Site]:
        """The sites of every cell, row-major."""
        return [self.site_at(i) for i in self.indices()]

    def index_of(self, site: Site) -> tuple[int, ...]:
        """The multi-index of the cell that patches ``site`` (the inverse of :meth:`site_at`).

        Raises:
            GridError: the site is not a cell of this grid.
        """
        want = {"layer": site.layer, "unit": site.unit, "pos": site.pos}
        out = []
        for a, c in zip(self.axes, self.coords, strict=True):
            f = axis(a).site_field
            v = want.get(f) if f is not None else None
            if v is None or v not in c:
                raise GridError(f"site {site} is not in this grid (axis {a!r} has {list(c)})")
            out.append(c.index(v))
        if site.kind != self.kind or self.site_at(out) != site:
            raise GridError(f"site {site} is not in this grid of {self.kind!r} sites")
        return tuple(out)

    def ticks(self, a: str) -> list[str]:
        """Tick labels of one axis (``L10``, ``H3``; positions as plain numbers)."""
        return [f"{axis(a).prefix}{v}" for v in self.coords[self.axes.index(a)]]

    @classmethod
    def from_spec(cls, spec: Any, dims: Any, length: int | None = None) -> Grid:
        """The grid of a :class:`~patchtrace.sites.SiteSpec` on a model of dimensions ``dims``.

        Axes: ``layer`` (unless the kind has none), the kind's unit axis when ``per_unit``, then
        ``pos`` for a list of positions or ``"all"`` (which needs ``length``); ``"last"`` is a fixed
        ``pos = -1`` and ``None`` (all positions at once) adds no axis.

        Raises:
            GridError: a layer or unit outside the model, or ``"all"`` without a length.
        """
        info = kind_info(spec.kind)
        axes: list[str] = []
        coords: list[tuple[int, ...]] = []
        fixed: dict[str, int] = {}
        if info.has_layer:
            layers = tuple(spec.layers) if spec.layers is not None else tuple(range(dims.n_layers))
            bad = [x for x in layers if not 0 <= x < dims.n_layers]
            if bad:
                raise GridError(f"site {spec.kind}[{bad[0]}]: layer {bad[0]} out of range (the model has {dims.n_layers} layers)")
            axes.append("layer")
            coords.append(layers)
        if spec.per_unit:
            n = info.units(dims)
            assert n is not None and info.unit_axis is not None
            units = tuple(spec.units) if spec.units is not None else tuple(range(n))
            bad = [u for u in units if not 0 <= u < n]
            if bad:
                raise GridError(
                    f"site {spec.kind}[·].{info.unit_letter}{bad[0]}: {info.unit_axis} {bad[0]} out of range "
                    f"(the model has {n})"
                )
            axes.append(info.unit_axis)
            coords.append(units)
        if spec.positions == "last":
            fixed["pos"] = -1
        elif spec.positions is not None:
            if spec.positions == "all":
                if length is None:
                    raise GridError("positions='all' needs the prompts' length")
                poss = tuple(range(length))
            else:
                poss = tuple(int(x) for x in spec.positions)
            axes.append("pos")
            coords.append(poss)
        return cls(spec.kind, tuple(axes), tuple(coords), fixed)

    # -- the label format results carry ------------------------------------------------------------

    def labels(self) -> dict[str, list[str]]:
        """``{"<axis>_index": [...], "fixed_<name>": [v]}``: what :class:`~patchtrace.results.Scores` stores."""
        out = {f"{a}_index": [str(v) for v in c] for a, c in zip(self.axes, self.coords, strict=True)}
        out.update({f"fixed_{k}": [str(v)] for k, v in self.fixed.items()})
        return out

    @classmethod
    def from_labels(cls, kind: str, axes: Sequence[str], shape: Sequence[int], labels: Mapping[str, Any]) -> Grid:
        """Rebuild the grid of a result from its axes, shape and labels (offsets where no index is stored).

        Raises:
            GridError: a label list whose length does not match its axis.
        """
        coords = []
        for a, n in zip(axes, shape, strict=True):
            lab = labels.get(f"{a}_index")
            if lab is not None and len(lab) != n:
                raise GridError(f"labels['{a}_index'] has {len(lab)} entries but axis {a!r} has size {n}")
            coords.append(tuple(int(x) for x in lab) if lab is not None else tuple(range(n)))
        fixed = {k[6:]: int(v[0]) for k, v in labels.items() if k.startswith("fixed_") and v}
        return cls(kind, tuple(axes), tuple(coords), fixed)


__all__ = ["AXES", "Axis", "Grid", "GridError", "axis", "declare_axis"]
