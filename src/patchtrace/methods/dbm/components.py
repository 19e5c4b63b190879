"""What a DBM mask ranges over, and how a relaxed mask mixes two runs — all of DBM's site-kind logic.

**Components.** A mask has one entry per component: one :class:`~patchtrace.sites.Site` per
(kind, layer, unit, position) of the requested :class:`~patchtrace.sites.SiteSpec` s — a head or a
neuron when the spec is per unit, a whole ``attn_out``/``mlp_out``/residual stream otherwise, at the
last position by default. :func:`components` enumerates them in a fixed order: that order is the
mask's order everywhere (training, the saved :class:`~patchtrace.methods.dbm.result.Mask`, the views).

**Mixing.** With mask ``m ∈ [0, 1]^C`` the original run's activation of component ``c`` becomes
``m_c · alternate + (1 − m_c) · original``. Every activation is viewed as ``[B, n, U, r]`` (``U``
units of ``r`` values: one unit for a stream, heads for ``head``/``q``/``k``/``v``, single values
for ``neuron``) so one hook (:func:`mix_hook`) serves every kind.

**Speed.** Components live at a few positions (usually only the last). Nothing before the first
masked position changes and nothing below the lowest masked layer, so :func:`masked_logits` runs only
positions ``p..T−1`` from the lowest masked layer up, attending to the original run's cached keys and
values of earlier positions: with the last position only, a training step costs about one token per
tuple (forward and backward) instead of ``T``. :func:`prepare` caches, without gradients, what every
step needs (the original's residual stream entering that layer, its earlier keys/values and the
alternate's activations at the masked points). This is exact: the tests compare it with a full
forward doing the same mixing through Hugging Face module hooks.

This module is the only place in DBM that knows how site kinds differ (which are maskable, how many
units a kind has, how its activation is laid out, how a kind's grid is named).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patchtrace.desiderata import TokenizedDesideratum
from patchtrace.engine.sweep import resolve
from patchtrace.methods.dbm.cache import RunStore
from patchtrace.methods.dbm.config import DBMError
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn, RunCtx
from patchtrace.sites import HEADED_KINDS, KV_KINDS, STREAM_KINDS, HookPoint, Site, SiteSpec

#: Site kinds a mask can gate (``embed`` and ``pattern`` cannot).
MASKABLE_KINDS = frozenset({"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "q", "k", "v", "neuron"})


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
    d = model.dims
    if kind == "neuron":
        return d.d_mlp
    if kind in KV_KINDS:
        return d.n_kv_heads
    if kind in HEADED_KINDS:
        return d.n_heads
    return 1


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


def as_units(x: Tensor, kind: str) -> Tensor:
    """View an activation as ``[B, n, U, r]`` (U units of r values each)."""
    if kind in STREAM_KINDS:
        return x.unsqueeze(2)
    if kind == "neuron":
        return x.unsqueeze(-1)
    return x


def from_units(x: Tensor, kind: str) -> Tensor:
    """Inverse of :func:`as_units`."""
    if kind in STREAM_KINDS:
        return x.squeeze(2)
    if kind == "neuron":
        return x.squeeze(-1)
    return x


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
        alt: per masked hook point, the alternate's activation ``[B, T-p, ...]``.
        index: per hook point, ``(component index, relative position, unit)`` per mixed entry.
        n_units: per hook point, its number of units.
    """

    name: str
    weight: float
    target: Tensor
    start_layer: int
    p: int
    resid: Tensor
    past: list[tuple[Tensor, Tensor] | None] | None
    alt: dict[HookPoint, Tensor]
    index: dict[HookPoint, tuple[Tensor, Tensor, Tensor]]
    n_units: dict[HookPoint, int]


def _index(model: Model, res: Sequence[Site], p: int, T: int, points: Sequence[HookPoint]) -> dict[HookPoint, tuple[Tensor, Tensor, Tensor]]:
    """Per hook point, the ``(component, relative position, unit)`` of every mixed entry."""
    per: dict[HookPoint, list[tuple[int, int, int]]] = defaultdict(list)
    nu = {hp: n_units(model, hp.kind) for hp in points}
    for ci, s in enumerate(res):
        ps = range(T - p) if s.pos is None else [s.pos - p]
        us = range(nu[s.point]) if s.unit is None else [s.unit]
        per[s.point] += [(ci, t, u) for t in ps for u in us]
    out: dict[HookPoint, tuple[Tensor, Tensor, Tensor]] = {}
    for hp, ents in per.items():
        cols = [torch.tensor([e[j] for e in ents], device=model.device) for j in range(3)]
        out[hp] = (cols[0], cols[1], cols[2])
    return out


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
                orig.acts[HookPoint("resid_pre", start_layer)][:, p:], past,
                {hp: alt.acts[hp][:, p:] for hp in points}, _index(model, res, p, T, points),
                {hp: n_units(model, hp.kind) for hp in points},
            ))
    return groups


def mix_hook(alt: Tensor, m: Tensor, index: tuple[Tensor, Tensor, Tensor], units: int, kind: str) -> HookFn:
    """A runner hook mixing ``alt`` into the activation with weights ``m[component]`` at ``index``."""
    ci, tt, uu = index

    def fn(x: Tensor, ctx: RunCtx) -> Tensor:
        xu, au = as_units(x, kind), as_units(alt, kind)
        w = torch.zeros(xu.shape[1], units, dtype=m.dtype, device=m.device).index_put((tt, uu), m[ci])
        w = w.to(x.dtype)[None, :, :, None]
        return from_units(xu + w * (au - xu), kind)

    return fn


def masked_logits(model: Model, group: MaskedGroup, m: Tensor) -> Tensor:
    """Last-position logits ``[B, V]`` of the original run with mask ``m`` ``[C]`` mixing in the alternate."""
    hooks: dict[HookPoint, list[HookFn]] = {
        hp: [mix_hook(group.alt[hp], m, group.index[hp], group.n_units[hp], hp.kind)] for hp in group.index
    }
    out = model.runner.forward(
        resid=group.resid, start_layer=group.start_layer, pos_offset=group.p, past_kv=group.past,
        hooks=hooks, last_only=True,
    )
    assert out.logits is not None
    return out.logits[:, -1].float()


def unit_axis(kind: str) -> str:
    """The name of ``kind``'s unit axis in a grid: ``neuron``, ``kv_head`` or ``head``."""
    return "neuron" if kind == "neuron" else "kv_head" if kind in KV_KINDS else "head"


def kind_grid(kind: str, comps: Sequence[Site], values: Tensor) -> tuple[Tensor, tuple[str, ...], dict[str, list[str]]]:
    """Lay the entries of ``values`` ``[C]`` that belong to ``kind`` out on a grid.

    Returns:
        ``(grid, axes, labels)``: axes ``layer`` (+ the unit axis when per unit, + ``pos`` when several
        positions), ``labels['<axis>_index']`` the model indices along each axis, and
        ``labels['fixed_pos']`` the position when there is exactly one.
    """
    sel = [i for i, s in enumerate(comps) if s.kind == kind]
    layers = sorted({int(comps[i].layer) for i in sel if comps[i].layer is not None})  # type: ignore[arg-type]
    units = sorted({int(comps[i].unit) for i in sel if comps[i].unit is not None})  # type: ignore[arg-type]
    poss = sorted({int(comps[i].pos) for i in sel if comps[i].pos is not None})  # type: ignore[arg-type]
    axes, shape = ["layer"], [len(layers)]
    labels: dict[str, list[str]] = {"layer_index": [str(x) for x in layers]}
    if units:
        ax = unit_axis(kind)
        axes.append(ax)
        shape.append(len(units))
        labels[f"{ax}_index"] = [str(u) for u in units]
    if len(poss) > 1:
        axes.append("pos")
        shape.append(len(poss))
        labels["pos_index"] = [str(p) for p in poss]
    elif len(poss) == 1:
        labels["fixed_pos"] = [str(poss[0])]
    grid = torch.zeros(shape)
    for i in sel:
        s = comps[i]
        key = [layers.index(s.layer)]  # type: ignore[arg-type]
        if units:
            key.append(units.index(s.unit))  # type: ignore[arg-type]
        if len(poss) > 1:
            key.append(poss.index(s.pos))  # type: ignore[arg-type]
        grid[tuple(key)] = values[i]
    return grid, tuple(axes), labels
