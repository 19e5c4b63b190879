"""What a DBM mask ranges over, and how a relaxed mask mixes two runs — all of DBM's site-kind logic.

**Components.** A mask has one entry per component: one :class:`~patchtrace.sites.Site` per
(kind, layer, unit, position) of the requested :class:`~patchtrace.sites.SiteSpec` s — a head or a
neuron when the spec is per unit, a whole ``attn_out``/``mlp_out``/residual stream otherwise, at the
last position by default. :func:`components` enumerates them in a fixed order: that order is the
mask's order everywhere (training, the saved :class:`~patchtrace.methods.dbm.result.Mask`, the views).

**Mixing.** With mask ``m ∈ [0, 1]^C`` the original run's activation of component ``c`` becomes
``m_c · alternate + (1 − m_c) · original``: one :class:`~patchtrace.interventions.Intervention` per
component with operation ``Mix(m_c)`` and the alternate run as source, applied by the engine's
intervention hooks (:mod:`patchtrace.engine.apply`) — the same writes every other method uses, with
the mask's gradient flowing through them.

**Speed.** Components live at a few positions (usually only the last). Nothing before the first
masked position changes and nothing below the lowest masked layer, so :func:`masked_logits` runs only
positions ``p..T−1`` from the lowest masked layer up, attending to the original run's cached keys and
values of earlier positions: with the last position only, a training step costs about one token per
tuple (forward and backward) instead of ``T``. :func:`prepare` caches, without gradients, what every
step needs (the original's residual stream entering that layer, its earlier keys/values and the
alternate's activations at the masked points). This is exact: the tests compare it with a full
forward doing the same mixing through Hugging Face module hooks.

What a kind means (maskable or not, its units, its layout, its grid axes) comes from the kind table
(:mod:`patchtrace.kinds`) and :class:`~patchtrace.grid.Grid`; nothing here branches on kind names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patchtrace.desiderata import TokenizedDesideratum
from patchtrace.engine.apply import intervention_hook
from patchtrace.engine.cache import RunCache
from patchtrace.engine.sweep import resolve
from patchtrace.grid import Grid
from patchtrace.interventions import Intervention, Mix, SourceRef
from patchtrace.kinds import KINDS, kind_info
from patchtrace.methods.dbm.cache import RunStore
from patchtrace.methods.dbm.config import DBMError
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn
from patchtrace.sites import HookPoint, Site, SiteSpec

#: Site kinds a mask can gate (from the kind table: ``embed`` and ``pattern`` cannot).
MASKABLE_KINDS = frozenset(k for k, info in KINDS.items() if info.maskable)


def parse_specs(sites: str | SiteSpec | Sequence[SiteSpec | str], positions: Any = "last") -> list[SiteSpec]:
    """``"head,mlp_out"`` (or SiteSpecs) → one SiteSpec per kind (heads/neurons per unit).

    Raises:
        DBMError: no kinds given.
    """
    if isinstance(sites, SiteSpec):
        return [sites]
    items = sites.split(",") if isinstance(sites, str) else list(sites)
    out = [it if isinstance(it, SiteSpec) else SiteSpec.parse(it, positions=positions) for it in items]
    if not out:
        raise DBMError("no site kinds given; e.g. 'head,mlp_out'")
    return out


def n_units(model: Model, kind: str) -> int:
    """Units of one activation of ``kind``: neurons, KV heads, query heads, or 1 for a stream."""
    return kind_info(kind).units(model.dims) or 1


def components(model: Model, specs: Sequence[SiteSpec]) -> list[Site]:
    """Enumerate the mask's components: one :class:`Site` per (kind, layer, unit, position).

    Positions are ``"last"`` (→ -1), a list of (possibly negative) positions, or None (one component
    covering all positions).

    Raises:
        DBMError: an unmaskable kind (``embed``, ``pattern``), ``positions="all"``, or duplicates.
    """
    out: list[Site] = []
    for spec in specs:
        if spec.kind not in MASKABLE_KINDS:
            raise DBMError(f"site kind {spec.kind!r} cannot be masked; use one of {', '.join(sorted(MASKABLE_KINDS))}")
        if spec.positions == "all":
            raise DBMError("positions='all' is not supported for masks; give a list of positions (e.g. [-3, -2, -1])")
        positions: list[int | None] = (
            [None] if spec.positions is None else [-1] if spec.positions == "last" else list(spec.positions)  # type: ignore[arg-type]
        )
        layers = list(spec.layers) if spec.layers is not None else list(range(model.dims.n_layers))
        units: list[int | None] = [None]
        if spec.per_unit:
            units = list(spec.units) if spec.units is not None else list(range(n_units(model, spec.kind)))
        out += [Site(spec.kind, layer, u, p) for layer in layers for u in units for p in positions]  # type: ignore[arg-type]
    if len(set(out)) != len(out):
        raise DBMError("the site kinds given produce duplicate components")
    return out


@dataclass
class MaskedGroup:
    """One equal-length batch of one desideratum, prepared for masked runs.

    Attributes:
        name, weight: the desideratum's name and loss weight.
        target: ``[B]`` target token ids.
        start_layer: lowest masked layer (the run starts there).
        p: first computed position.
        resid: ``[B, T-p, D]`` original residual stream entering ``start_layer``.
        past: per layer, the original's keys/values of positions ``< p`` (None when ``p == 0``).
        alternate: the alternate run (its activations at the masked points are the mix's source).
        sites: the components with absolute positions, in mask order.
    """

    name: str
    weight: float
    target: Tensor
    start_layer: int
    p: int
    resid: Tensor
    past: list[tuple[Tensor, Tensor] | None] | None
    alternate: RunCache
    sites: list[Site]


def prepare(
    model: Model, tds: Sequence[TokenizedDesideratum], comps: Sequence[Site], runs: RunStore | None = None
) -> list[MaskedGroup]:
    """Cache, once and without gradients, what every training step needs (see the module docstring).

    Args:
        model: the model.
        tds: tokenized desiderata.
        comps: the components (:func:`components`).
        runs: the run cache to read the original and alternate runs from (a fresh one when None).

    Returns:
        One :class:`MaskedGroup` per equal-length batch of each desideratum.
    """
    points = sorted({c.point for c in comps}, key=lambda h: (h.layer or 0, h.kind))
    start_layer = min(c.layer for c in comps if c.layer is not None)
    store = runs if runs is not None else RunStore(points)
    groups = []
    for td in tds:
        for idx in td.groups():
            T = len(td.original[idx[0]])
            res = [resolve(c, model, T) for c in comps]
            p = min(0 if s.pos is None else s.pos for s in res)
            orig = store.get(model, td, "original", idx)
            alt = store.get(model, td, "alternate", idx, points)
            past: list[tuple[Tensor, Tensor] | None] | None = None
            if p > 0:
                past = [None] * model.dims.n_layers
                for li in range(start_layer, model.dims.n_layers):
                    k, v = orig.kv[li]
                    past[li] = (k[:, :, :p], v[:, :, :p])
            groups.append(MaskedGroup(
                td.name, td.desideratum.weight, td.target[idx].to(model.device), start_layer, p,
                orig.acts[HookPoint("resid_pre", start_layer)][:, p:], past, alt, res,
            ))
    return groups


def masked_logits(model: Model, group: MaskedGroup, m: Tensor) -> Tensor:
    """Last-position logits ``[B, V]`` of the original run with mask ``m`` ``[C]`` mixing in the alternate."""
    by_point: dict[HookPoint, list[tuple[int, Intervention]]] = defaultdict(list)
    for ci, site in enumerate(group.sites):
        by_point[site.point].append((0, Intervention(site, Mix(m[ci]), SourceRef("alternate"))))
    runs = {"alternate": group.alternate}
    B = group.resid.shape[0]
    hooks: dict[HookPoint, list[HookFn]] = {
        hp: [intervention_hook(hp, ents, runs, B, n_patches=1)] for hp, ents in by_point.items()
    }
    out = model.runner.forward(
        resid=group.resid, start_layer=group.start_layer, pos_offset=group.p, past_kv=group.past,
        hooks=hooks, last_only=True,
    )
    assert out.logits is not None
    return out.logits[:, -1].float()


def kind_grid(kind: str, comps: Sequence[Site], values: Tensor) -> tuple[Tensor, tuple[str, ...], dict[str, list[str]]]:
    """Lay the entries of ``values`` ``[C]`` that belong to ``kind`` out on a grid.

    Returns:
        ``(grid values, axes, labels)``: the :class:`~patchtrace.grid.Grid` spanned by the kind's
        components — axes ``layer`` (+ the unit axis when per unit, + ``pos`` when several positions),
        with a single position fixed — and its labels (model indices along each axis).
    """
    sel = [i for i, s in enumerate(comps) if s.kind == kind]
    layers = tuple(sorted({int(comps[i].layer) for i in sel if comps[i].layer is not None}))  # type: ignore[arg-type]
    units = tuple(sorted({int(comps[i].unit) for i in sel if comps[i].unit is not None}))  # type: ignore[arg-type]
    poss = tuple(sorted({int(comps[i].pos) for i in sel if comps[i].pos is not None}))  # type: ignore[arg-type]
    axes: list[str] = ["layer"]
    coords: list[tuple[int, ...]] = [layers]
    info = kind_info(kind)
    if units and info.unit_axis is not None:
        axes.append(info.unit_axis)
        coords.append(units)
    if len(poss) > 1:
        axes.append("pos")
        coords.append(poss)
    grid = Grid(kind, tuple(axes), tuple(coords), {"pos": poss[0]} if len(poss) == 1 else {})
    out = torch.zeros(grid.shape)
    for i in sel:
        out[grid.index_of(comps[i])] = values[i]
    return out, grid.axes, grid.labels()
