"""What each site kind means, in one table.

A *site kind* (``head``, ``resid_pre``, ``neuron`` ...) is a tensor the forward pass computes once per
layer. Everything the library needs to know about a kind lives in its :class:`KindInfo` row below:
where the tensor sits in the activation's dimensions, which unit axis it has and how many units the
model gives it, where a patch of it joins the engine's fast path, whether a DBM mask can gate it,
and how a gradient estimate (AtP, IG, RelP) reduces ``(source − base) ⊙ grad`` to one number per
unit. Code asks this table (:func:`kind_info`); nothing else branches on kind names, so a new kind
is one new row (plus the runner computing the tensor, and a reference for the tests).

Activation layouts (``B`` batch, ``T`` positions, ``D`` d_model, ``H`` query heads, ``K`` KV heads,
``d`` d_head, ``M`` d_mlp) are listed in :mod:`patchtrace.sites`.

Post-norm encoders (BERT, RoBERTa: the LayerNorm comes *after* each residual add) keep every kind
except ``router``/``expert``, with these meanings: ``embed`` = word + position + token-type
embeddings *after* the embedding LayerNorm; ``resid_pre`` = the stream entering the layer (the
previous layer's ``resid_post``); ``resid_mid`` = ``LN(resid_pre + attn_out)``, the stream after the
attention add *and its norm* (what the MLP reads); ``resid_post`` = ``LN(resid_mid + mlp_out)``;
``attn_out`` / ``mlp_out`` = the sublayer outputs *before* the add and the norm (the attention output
dense, the MLP output dense); ``head``, ``q``/``k``/``v`` (no rotary), ``pattern`` (bidirectional: a
query sees every key) and ``neuron`` (``act(intermediate(resid_mid))``) as in a decoder. Because a
norm follows each add, ``resid_mid`` there is not ``resid_pre + attn_out``, and no single head or
neuron has an additive term in the stream (edge circuits refuse these families). See
:mod:`patchtrace.models.encoder`.

Join rules of the fast path (see :mod:`patchtrace.engine.sweep` for why they are exact):

==============  ==================================================================================
join            meaning
==============  ==================================================================================
``embed``       rows start from the token ids (the patch is below every layer)
``attn``        the engine rebuilds layer ``L``'s attention output from cached base activations and
                the rows join the batch entering the MLP of layer ``L`` (sequential blocks only;
                parallel blocks fall back to ``generic``)
``mlp``         the engine rebuilds layer ``L``'s MLP output; rows join entering layer ``L + 1``
``resid_post``  the patched residual stream itself joins entering layer ``L + 1``
``generic``     rows are the base residual stream entering layer ``L``; the runner's hooks patch
==============  ==================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from patchtrace.errors import PatchtraceError

Join = Literal["embed", "attn", "mlp", "resid_post", "generic"]
Reduce = Literal["stream", "per_unit", "identity", "pattern"]
UnitAxis = Literal["head", "kv_head", "neuron", "expert"]
Blocks = Literal["any", "dense", "moe"]


class KindError(PatchtraceError, ValueError):
    """An unknown site kind, or an operation the kind does not support (names the kind)."""


def _heads(d: Any) -> int:
    return int(d.n_heads)


def _kv_heads(d: Any) -> int:
    return int(d.n_kv_heads)


def _neurons(d: Any) -> int:
    return int(d.d_mlp)


def _experts(d: Any) -> int:
    return int(getattr(d, "n_experts", 0))


@dataclass(frozen=True)
class KindInfo:
    """Everything one site kind means.

    Attributes:
        name: the kind's name (a :data:`patchtrace.sites.SiteKind`).
        has_layer: False only for ``embed`` (one tensor per forward, not per layer).
        unit_axis: the result axis of a per-unit sweep (``head``, ``kv_head``, ``neuron``) or None.
        n_units: the number of units as a function of the model's :class:`~patchtrace.models.adapters.Dims`.
        pos_dim: the dimension of positions in the ``[B, ...]`` activation.
        unit_dim: the dimension of units in the ``[B, ...]`` activation, or None.
        join: where a patch of a single layer joins the fast path (table in the module docstring).
        maskable: whether a DBM mask can gate it (a mix of two runs' values is meaningful).
        reduce: how a gradient estimate reduces ``diff ⊙ grad`` (see :func:`gradient_product`).
        sequential_only: the kind exists only in sequential (not parallel) blocks.
        explicit_attention: reading or writing it needs the attention probabilities computed
            explicitly (not by a fused kernel).
        feeds: the sublayer output (``attn_out`` / ``mlp_out``) that the runner's stage of that name
            computes from this kind's tensor (``head`` → o_proj (+ post-norm) → ``attn_out``;
            ``neuron`` → down projection (+ post-norm) → ``mlp_out``), so the fast path can rebuild
            that output from a patched value; None for other kinds.
        doc: one line on what it is.
        blocks: which MLPs have it: ``any``, ``dense`` (one MLP: ``neuron``) or ``moe`` (a
            mixture of experts: ``router``, ``expert``); see :func:`available`.
    """

    name: str
    has_layer: bool
    unit_axis: UnitAxis | None
    n_units: Callable[[Any], int] | None
    pos_dim: int
    unit_dim: int | None
    join: Join
    maskable: bool
    reduce: Reduce
    sequential_only: bool
    doc: str
    explicit_attention: bool = False
    feeds: str | None = None
    blocks: Blocks = "any"

    @property
    def has_units(self) -> bool:
        return self.unit_axis is not None

    @property
    def unit_letter(self) -> str:
        """The letter of a unit in the site notation: ``n`` neurons, ``e`` experts, ``h`` (KV) heads."""
        return {"neuron": "n", "expert": "e"}.get(self.unit_axis or "", "h")

    def units(self, dims: Any) -> int | None:
        """How many units the model gives this kind (None: no unit axis)."""
        return None if self.n_units is None else self.n_units(dims)


def _row(name: str, unit_axis: UnitAxis | None, join: Join, reduce: Reduce, doc: str, *, layer: bool = True,
         pos_dim: int = 1, maskable: bool = True, sequential_only: bool = False, feeds: str | None = None,
         blocks: Blocks = "any") -> KindInfo:
    n = {"head": _heads, "kv_head": _kv_heads, "neuron": _neurons, "expert": _experts, None: None}[unit_axis]
    unit_dim = None if unit_axis is None else (1 if pos_dim == 2 else 2)
    return KindInfo(name, layer, unit_axis, n, pos_dim, unit_dim, join, maskable, reduce, sequential_only, doc,
                    explicit_attention=pos_dim == 2, feeds=feeds, blocks=blocks)


#: The table: one row per site kind, in the vocabulary's order.
KINDS: dict[str, KindInfo] = {
    k.name: k
    for k in (
        _row("embed", None, "embed", "stream", "token (+ learned position) embedding", layer=False, maskable=False),
        _row("resid_pre", None, "generic", "stream", "residual stream entering the layer"),
        _row("resid_mid", None, "generic", "stream", "after the attention sublayer is added", sequential_only=True),
        _row("resid_post", None, "resid_post", "stream", "residual stream leaving the layer"),
        _row("attn_out", None, "attn", "stream", "attention sublayer output, as added to the stream"),
        _row("mlp_out", None, "mlp", "stream", "MLP sublayer output, as added to the stream"),
        _row("head", "head", "attn", "per_unit", "one head's output before the output projection", feeds="attn_out"),
        _row("q", "head", "generic", "per_unit", "queries after q-norm and rotary"),
        _row("k", "kv_head", "generic", "per_unit", "keys per KV head, after k-norm and rotary"),
        _row("v", "kv_head", "generic", "per_unit", "values per KV head"),
        _row("pattern", "head", "generic", "pattern", "attention probabilities (query, key)", pos_dim=2,
             maskable=False),
        _row("neuron", "neuron", "mlp", "identity", "MLP hidden activation (act(gate) * up when gated)",
             feeds="mlp_out", blocks="dense"),
        _row("router", "expert", "generic", "identity", "router logits, one per expert (mixture-of-experts MLPs)",
             maskable=False, blocks="moe"),
        _row("expert", "expert", "generic", "per_unit",
             "one expert's weighted output (zero where the token is not routed to it); they sum to mlp_out",
             blocks="moe"),
    )
}


def kind_info(kind: str) -> KindInfo:
    """The row of ``kind``.

    Raises:
        KindError: an unknown kind (the message lists the vocabulary).
    """
    info = KINDS.get(kind)
    if info is None:
        raise KindError(f"unknown site kind {kind!r}; the vocabulary is: {', '.join(KINDS)}")
    return info


def available(kind: str, dims: Any) -> bool:
    """Whether a model with these dimensions computes ``kind`` (``neuron`` needs a dense MLP;
    ``router`` and ``expert`` a mixture of experts, ``dims.n_experts > 0``)."""
    blocks = kind_info(kind).blocks
    moe = int(getattr(dims, "n_experts", 0)) > 0
    return blocks == "any" or (blocks == "moe") == moe


def needs_explicit_attention(kinds: Iterable[str]) -> bool:
    """Whether any of these kinds needs the attention probabilities computed explicitly."""
    return any(kind_info(k).explicit_attention for k in kinds)


def gradient_product(kind: str, diff: Tensor, grad: Tensor) -> Tensor:
    """``diff ⊙ grad`` reduced to ``[B, T, U]`` (U = 1 for whole-stream kinds, heads or neurons).

    This is the first-order estimate of patching each unit: the feature axis is summed, and a
    ``pattern`` (``[B, H, Tq, Tk]``) is summed over keys and put query-position first.
    """
    p = diff * grad
    how = kind_info(kind).reduce
    if how == "pattern":
        return p.sum(-1).transpose(1, 2)
    if how == "per_unit":
        return p.sum(-1)
    if how == "identity":
        return p
    return p.sum(-1, keepdim=True)


__all__ = ["KINDS", "Blocks", "Join", "KindError", "KindInfo", "Reduce", "UnitAxis", "available", "gradient_product", "kind_info", "needs_explicit_attention"]
