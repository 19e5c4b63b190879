"""The closed vocabulary of sites: where in a transformer an activation can be read or replaced.

Every method in patchtrace speaks about the model in the same words. A *site kind* names a tensor
computed once per layer (or once per forward, for ``embed``); a :class:`Site` addresses one component
of it: a layer, optionally one head / KV head / neuron, optionally one position.

Kinds and the shape of the activation a hook sees (``B`` batch, ``T`` positions, ``D`` d_model,
``H`` query heads, ``K`` KV heads, ``d`` d_head, ``M`` d_mlp):

==============  =====================  ==========================================================
kind            shape                  what it is
==============  =====================  ==========================================================
``embed``       ``[B, T, D]``          token (+ learned position) embedding, after any scaling
``resid_pre``   ``[B, T, D]``          residual stream entering layer ``L``
``resid_mid``   ``[B, T, D]``          after the attention sublayer is added (sequential blocks)
``resid_post``  ``[B, T, D]``          residual stream leaving layer ``L``
``attn_out``    ``[B, T, D]``          attention sublayer output (after the output projection)
``mlp_out``     ``[B, T, D]``          MLP sublayer output
``head``        ``[B, T, H, d]``       one head's output before the output projection (TL ``z``)
``q``           ``[B, T, H, d]``       queries, after q-norm and rotary (what enters the scores)
``k``           ``[B, T, K, d]``       keys, per KV head, after k-norm and rotary
``v``           ``[B, T, K, d]``       values, per KV head
``pattern``     ``[B, H, T, T]``       attention probabilities (query position, key position)
``neuron``      ``[B, T, M]``          MLP hidden activation (``act(gate) * up`` when gated)
``router``      ``[B, T, E]``          router logits of a mixture-of-experts MLP (``E`` experts)
``expert``      ``[B, T, E, D]``       each expert's weighted output; they sum to ``mlp_out``
==============  =====================  ==========================================================

String notation (stable; :func:`parse_site` is its inverse)::

    resid_pre[5]          layer 5, all positions
    resid_pre[5]@3        layer 5, position 3
    head[23].h3@-1        layer 23, head 3, last position
    k[2].h0               layer 2, KV head 0
    neuron[4].n1023@7     layer 4, neuron 1023, position 7
    embed@2               the embedding at position 2

Negative positions count from the end (``-1`` is the last token), as in Python indexing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

from patchtrace.errors import PatchtraceError
from patchtrace.kinds import KINDS, kind_info

SiteKind = Literal[
    "embed",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "head",
    "q",
    "k",
    "v",
    "pattern",
    "neuron",
    "router",
    "expert",
]

SITE_KINDS: tuple[str, ...] = get_args(SiteKind)

# Derived views of the kind table (:mod:`patchtrace.kinds`), for readers who think in sets.
#: Kinds whose activation has a per-head axis (query heads or KV heads).
HEADED_KINDS = frozenset(k for k, i in KINDS.items() if i.unit_axis in ("head", "kv_head"))
#: Kinds indexed by KV head rather than query head (they differ under grouped-query attention).
KV_KINDS = frozenset(k for k, i in KINDS.items() if i.unit_axis == "kv_head")
#: Kinds of width ``d_model``.
STREAM_KINDS = frozenset(k for k, i in KINDS.items() if i.reduce == "stream")


class SiteError(PatchtraceError, ValueError):
    """A site string or value that is not in the vocabulary, or does not fit the model."""


class HookPoint(NamedTuple):
    """A tensor location in the forward pass: a site kind at a layer (``layer`` is None for ``embed``)."""

    kind: str
    layer: int | None

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}[{self.layer}]"


@dataclass(frozen=True, order=True, slots=True)
class Site:
    """One addressable component: kind, layer, optional unit (head / KV head / neuron), optional position.

    Args:
        kind: one of :data:`SITE_KINDS`.
        layer: layer index; ``None`` only for ``embed``.
        unit: head index for ``head``/``q``/``pattern``, KV-head index for ``k``/``v``, neuron index
            for ``neuron``; ``None`` means the whole tensor at that layer.
        pos: position (query position for ``pattern``); negative counts from the end; ``None`` = all.

    Example:
        >>> s = Site("head", 23, unit=3, pos=-1)
        >>> str(s)
        'head[23].h3@-1'
        >>> parse_site(str(s)) == s
        True
    """

    kind: SiteKind
    layer: int | None = None
    unit: int | None = None
    pos: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}; the vocabulary is: {', '.join(SITE_KINDS)}")
        info = kind_info(self.kind)
        if not info.has_layer:
            if self.layer is not None:
                raise SiteError(f"site {self.kind!r} takes no layer (got layer {self.layer})")
        elif self.layer is None:
            raise SiteError(f"site {self.kind!r} needs a layer, e.g. '{self.kind}[0]'")
        if self.unit is not None and not info.has_units:
            raise SiteError(f"site {self.kind!r} has no head or neuron axis (got unit {self.unit})")

    @property
    def point(self) -> HookPoint:
        """The tensor location this site lives in."""
        return HookPoint(self.kind, self.layer)

    def __str__(self) -> str:
        s = self.kind if self.layer is None else f"{self.kind}[{self.layer}]"
        if self.unit is not None:
            s += f".{kind_info(self.kind).unit_letter}{self.unit}"
        if self.pos is not None:
            s += f"@{self.pos}"
        return s


_SITE_RE = re.compile(r"^(?P<kind>[a-z_]+)(?:\[(?P<layer>\d+)\])?(?:\.(?P<ut>[hne])(?P<unit>\d+))?(?:@(?P<pos>-?\d+))?$")


def parse_site(text: str) -> Site:
    """Parse the stable string form of a site (see the module docstring).

    Raises:
        SiteError: naming the text and what is wrong with it.
    """
    m = _SITE_RE.match(text.strip())
    if not m:
        raise SiteError(
            f"cannot parse site {text!r}; expected e.g. 'resid_pre[5]@3', 'head[23].h3@-1', 'neuron[4].n1023'"
        )
    kind = m["kind"]
    if kind not in SITE_KINDS:
        raise SiteError(f"unknown site kind {kind!r} in {text!r}; the vocabulary is: {', '.join(SITE_KINDS)}")
    info = kind_info(kind)
    if m["ut"] is not None and info.has_units and m["ut"] != info.unit_letter:
        raise SiteError(f"{kind!r} takes '.{info.unit_letter}<index>', not '.{m['ut']}' in {text!r}")
    return Site(
        kind,  # type: ignore[arg-type]
        None if m["layer"] is None else int(m["layer"]),
        None if m["unit"] is None else int(m["unit"]),
        None if m["pos"] is None else int(m["pos"]),
    )


Positions = Literal["all", "last"] | list[int]


@dataclass(frozen=True)
class SiteSpec:
    """A grid of sites to sweep: one kind, optionally split per unit, at chosen positions and layers.

    Args:
        kind: site kind.
        per_unit: split into heads (``head``/``q``/``k``/``v``/``pattern``) or neurons (``neuron``).
        positions: ``"all"`` (one cell per position), ``"last"``, a list of positions, or ``None``
            to patch all positions at once (one cell per layer/unit).
        layers: layers to include (default: all).
        units: units to include when ``per_unit`` (default: all).

    The axes of the resulting scores are ``layer`` (absent for ``embed``), then ``head`` /
    ``kv_head`` / ``neuron`` when ``per_unit``, then ``pos`` when positions is not None.
    """

    kind: SiteKind
    per_unit: bool = False
    positions: Positions | None = "last"
    layers: tuple[int, ...] | None = None
    units: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}; the vocabulary is: {', '.join(SITE_KINDS)}")
        if self.per_unit and not kind_info(self.kind).has_units:
            raise SiteError(f"site {self.kind!r} cannot be split per unit: it has no head or neuron axis")
        if self.units is not None and not self.per_unit:
            raise SiteError(f"sites {self.kind!r}: units {self.units} given but per_unit is False")
        for what, vals in (("layers", self.layers), ("units", self.units)):
            if vals is not None and len(set(vals)) != len(vals):
                raise SiteError(f"sites {self.kind!r}: repeated {what} in {vals}")

    @staticmethod
    def parse(text: str, positions: Positions | None = "last") -> SiteSpec:
        """Parse a sweep name as used on the command line: a kind, with ``head`` / ``neuron`` per unit.

        ``head``, ``q``, ``k``, ``v``, ``pattern`` and ``neuron`` sweep per unit; ``attn_out``,
        ``mlp_out``, ``resid_*`` and ``embed`` per layer. Append ``:layer`` to a headed kind to sweep
        whole layers instead (``head:layer``).
        """
        kind, _, mode = text.strip().partition(":")
        if kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {kind!r}; the vocabulary is: {', '.join(SITE_KINDS)}")
        if mode not in ("", "layer", "unit"):
            raise SiteError(f"unknown sweep mode {mode!r} in {text!r}; use ':layer' or ':unit'")
        per_unit = kind_info(kind).has_units and mode != "layer"
        return SiteSpec(kind, per_unit=per_unit, positions=positions)  # type: ignore[arg-type]

    def unit_axis(self) -> str | None:
        """Name of the unit axis (``head``, ``kv_head`` or ``neuron``), if split per unit."""
        return kind_info(self.kind).unit_axis if self.per_unit else None
