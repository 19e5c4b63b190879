"""A forward pass in which every receiver of the edge graph has its own input.

The ordinary forward normalises the residual stream once per sublayer and projects it for all heads
at once. Edge patching needs more: receiver ``v`` (one head's query, one KV head's key or value, one
MLP, the logits) must see ``resid + Δ_v``, where ``Δ_v`` changes *only that reader's* copy of the
stream. Here the attention sublayer of a layer that has any ``Δ`` normalises ``H + 2K`` copies of the
stream (``[B, n, H+2K, D]``) and projects each with its own head's weights — the same number of
multiply-adds as the fused projection, since each copy is multiplied only by its own ``d`` rows. A
layer without any ``Δ`` takes the ordinary stages unchanged (:mod:`patchtrace.models.stages`): norm,
rotary, attention arithmetic and the MLP are the runner's own methods, so this cannot drift from the
forward the rest of the library trusts.

Who supplies ``Δ`` is a :class:`Deltas` object, told every sender's output as it is written:

* :class:`patchtrace.circuits.exact` — constant differences for one edge per row (the edge grid) and
  "replace" differences for edge sets (``z_u(source) − z_u(this run)``, so the receiver sees exactly
  the source run's value of the sender);
* :class:`GradLeaves` — zero tensors that require grad, whose gradients are ``∂M/∂(input of v)`` for
  every receiver at once (EAP, EAP-IG).

A run may start at layer ``l`` from a cached residual stream: a receiver at layer ``l`` changes
nothing before it. Only the last position is unembedded, and only the metric's vocabulary columns.

The edge grid (one edge per row) takes two further shortcuts through :class:`OneReceiverPerRow`: in
the receiver's layer only the changed receiver of each row is projected anew (the base rows once),
and in the last layer everything after the attention runs at the last position only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from patchtrace.circuits.graph import EdgeGraph


class Deltas(Protocol):
    """What a patched forward asks at each reader, and tells at each writer."""

    def wrote(self, first_sender: int, out: Tensor) -> None:
        """Senders ``first_sender ..`` wrote ``out`` ``[B, n, s, D]`` in this run."""

    def attn(self, layer: int) -> Tensor | None:
        """``Δ`` for the ``H + 2K`` attention receivers of ``layer``, ``[B, n, H+2K, D]``, or None."""

    def mlp(self, layer: int) -> Tensor | None:
        """``Δ`` for the MLP input of ``layer``, ``[B, n, D]``, or None."""

    def logits(self) -> Tensor | None:
        """``Δ`` for the final norm's input, ``[B, n, D]``, or None."""

    @property
    def needs_heads(self) -> bool:
        """Whether per-head outputs must be reported through :meth:`wrote`."""


class NoDeltas:
    """Nothing patched; optionally records every sender's output and the stream entering each layer."""

    def __init__(self, record: bool = False) -> None:
        self.record = record
        self.outs: dict[int, Tensor] = {}

    def wrote(self, first_sender: int, out: Tensor) -> None:
        if self.record:
            self.outs[first_sender] = out

    def attn(self, layer: int) -> Tensor | None:
        return None

    def mlp(self, layer: int) -> Tensor | None:
        return None

    def logits(self) -> Tensor | None:
        return None

    @property
    def needs_heads(self) -> bool:
        return self.record

    def senders(self) -> Tensor:
        """``[B, n, S, D]``: every sender's output, in graph order."""
        return torch.cat([self.outs[k] for k in sorted(self.outs)], dim=2)


class OneReceiverPerRow(NoDeltas):
    """Deltas where every row changes at most one attention receiver, and row ``r`` starts from the
    same stream as row ``r mod N`` (the edge grid: one edge per row over ``N`` repeated examples).

    :meth:`attn_rows` returns, for a layer, the changed receiver of each row (its index among the
    layer's ``H + 2K`` attention receivers, ``-1`` for none), the rows' ``Δ`` ``[B, n, D]`` and ``N``;
    or None when no row changes an attention receiver of that layer. The forward then projects the
    base rows once and only each changed receiver anew (:meth:`EdgeForward._qkv_one_per_row`).
    """

    #: whether the last layer may run its output projection and MLP at the last position only
    trim_last: bool = True

    def attn_rows(self, layer: int) -> tuple[Tensor, Tensor, int] | None:
        return None


class GradLeaves(NoDeltas):
    """Zero ``Δ`` leaves at every receiver: after ``backward`` their ``.grad`` is ``∂M/∂(input of v)``."""

    def __init__(self, graph: EdgeGraph, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                 record: bool = False) -> None:
        super().__init__(record)
        B, n, D = shape
        nr = graph.n_heads + 2 * graph.n_kv_heads

        def leaf(*s: int) -> Tensor:
            return torch.zeros(*s, dtype=dtype, device=device, requires_grad=True)

        self.attn_leaves = [leaf(B, n, nr, D) for _ in range(graph.n_layers)]
        self.mlp_leaves = [leaf(B, n, D) for _ in range(graph.n_layers)]
        self.logit_leaf = leaf(B, n, D)

    def attn(self, layer: int) -> Tensor | None:
        return self.attn_leaves[layer]

    def mlp(self, layer: int) -> Tensor | None:
        return self.mlp_leaves[layer]

    def logits(self) -> Tensor | None:
        return self.logit_leaf

    def leaves(self) -> list[Tensor]:
        return [*self.attn_leaves, *self.mlp_leaves, self.logit_leaf]

    def receiver_grads(self) -> Tensor:
        """``[B, n, R, D]`` gradients in receiver order (zeros where none flowed)."""
        cols = []
        for a, m in zip(self.attn_leaves, self.mlp_leaves, strict=True):
            cols += [_grad(a), _grad(m)[:, :, None]]
        cols.append(_grad(self.logit_leaf)[:, :, None])
        return torch.cat(cols, dim=2)


def _grad(t: Tensor) -> Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


@dataclass
class EdgeOut:
    """Result of :meth:`EdgeForward.run`: last-position logits ``[B, C]``, the streams entering
    each layer (``resid[l]``, ``l = 0..L``; from the start layer on, when kept) and each layer's
    keys/values (when kept)."""

    logits: Tensor
    resid: dict[int, Tensor]
    kv: dict[int, tuple[Tensor, Tensor]]


class EdgeForward:
    """Forward passes with per-receiver inputs over a loaded pre-norm model.

    Args:
        model: a :class:`~patchtrace.models.load.Model` (post-norm families are refused).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.st = model.runner
        self.graph = EdgeGraph.of(model)
        self.dims = model.dims
        self._wcache: dict[int, tuple[Any, ...]] = {}

    # -- per-head weights ------------------------------------------------------------------------

    def _weights(self, li: int) -> tuple[Any, ...]:
        """``(Wq [H,d,D], bq, Wk [K,d,D], bk, Wv, bv, Wo [D,H,d], bo)`` of layer ``li``."""
        if li in self._wcache:
            return self._wcache[li]
        d, H, K, D = self.dims.d_head, self.dims.n_heads, self.dims.n_kv_heads, self.dims.d_model
        fam, blk = self.model.family, self.st._blocks[li]
        attn = blk.attn

        def lin(mod: Any, n: int) -> tuple[Tensor, Tensor | None]:
            b = mod.bias.view(n, d) if getattr(mod, "bias", None) is not None else None
            return mod.weight.view(n, d, D), b

        if fam.qkv == "separate":
            (wq, bq), (wk, bk), (wv, bv) = lin(getattr(attn, fam.q), H), lin(getattr(attn, fam.k), K), lin(getattr(attn, fam.v), K)
        elif fam.qkv == "gpt2_fused":
            c = getattr(attn, fam.q)
            w, b = c.weight.T, c.bias  # Conv1D: [in, out] → [out, in]
            wq, wk, wv = (w[i * D:(i + 1) * D].reshape(H if i == 0 else K, d, D) for i in range(3))
            bq, bk, bv = (b[i * D:(i + 1) * D].reshape(H if i == 0 else K, d) for i in range(3))
        else:  # neox_fused: per head [q | k | v]
            c = getattr(attn, fam.q)
            w = c.weight.view(H, 3 * d, D)
            wq, wk, wv = w[:, :d], w[:, d:2 * d], w[:, 2 * d:]
            bb = c.bias.view(H, 3 * d) if c.bias is not None else None
            bq, bk, bv = (None, None, None) if bb is None else (bb[:, :d], bb[:, d:2 * d], bb[:, 2 * d:])
        o = blk.o
        wo = (o.weight.T if fam.conv1d else o.weight).reshape(D, H, d)
        bo = getattr(o, "bias", None)
        out = (wq, bq, wk, bk, wv, bv, wo, bo)
        self._wcache[li] = out
        return out

    def _qkv_heads(self, li: int, x: Tensor, rope: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Queries/keys/values from per-receiver normalised inputs ``x`` ``[B, n, H+2K, D]``."""
        H, K = self.dims.n_heads, self.dims.n_kv_heads
        wq, bq, wk, bk, wv, bv, _, _ = self._weights(li)

        def proj(xs: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            y = torch.einsum("bnhD,hdD->bnhd", xs, w)
            return y + b if b is not None else y

        q = proj(x[:, :, :H], wq, bq)
        k = proj(x[:, :, H:H + K], wk, bk)
        v = proj(x[:, :, H + K:H + 2 * K], wv, bv)
        q, k = self.st.qk_post(li, q, k, rope)  # the runner's own q/k norms and rotary
        return q, k, v

    # -- the forward -------------------------------------------------------------------------------

    def run(
        self,
        deltas: Deltas,
        *,
        ids: Tensor | None = None,
        resid: Tensor | None = None,
        start_layer: int = 0,
        cols: Tensor | None = None,
        keep_resid: bool = False,
        sender_add: dict[int, Tensor] | None = None,
        pos_offset: int = 0,
        past_kv: dict[int, tuple[Tensor, Tensor]] | None = None,
        keep_kv: bool = False,
    ) -> EdgeOut:
        """Run layers ``start_layer ..`` and unembed the last position.

        Args:
            deltas: who supplies each receiver's ``Δ`` (see :class:`Deltas`).
            ids: ``[B, n]`` token ids (``start_layer == 0``).
            resid: ``[B, n, D]`` stream entering ``start_layer`` (instead of ids).
            cols: vocabulary columns to compute (None: all).
            keep_resid: keep the stream entering every layer run (and the final one, key ``L``).
            sender_add: ``{sender: [B, n, D]}`` added to that sender's output as it is written
                (EAP-IG on activations interpolates one layer's outputs this way).
            pos_offset: absolute position of this call's first position (the earlier ones are the
                cached ``past_kv``: positions where the two prompts agree cannot carry a difference).
            past_kv: per layer, the cached ``(k, v)`` ``[Bp, K, pos_offset, d]`` of the earlier
                positions (row ``r`` uses prefix row ``r % Bp``).
            keep_kv: keep each layer's ``(k, v)`` ``[B, K, n, d]`` (to serve as a later call's prefix).

        Returns:
            :class:`EdgeOut`.
        """
        st = self.st
        add = sender_add or {}
        with st._weights_frozen():
            if resid is None:
                assert ids is not None and start_layer == 0
                h = st.embed(ids, pos_offset)
                if 0 in add:
                    h = h + add[0]
                deltas.wrote(0, h[:, :, None])
            else:
                h = resid
            rope = st.rope(h, pos_offset)
            kept: dict[int, Tensor] = {}
            kv: dict[int, tuple[Tensor, Tensor]] = {}
            for li in range(start_layer, self.dims.n_layers):
                if keep_resid:
                    kept[li] = h
                prefix = past_kv[li] if past_kv is not None and pos_offset > 0 else None
                # the last layer of an edge-grid run: only the last position reaches the logits
                last = (li == self.dims.n_layers - 1 and isinstance(deltas, OneReceiverPerRow) and deltas.trim_last
                        and not keep_resid and not add)
                h = self._layer(li, h, deltas, rope, add, prefix, kv if keep_kv else None, last)
            if keep_resid:
                kept[self.dims.n_layers] = h
            dl = deltas.logits()
            hl = h[:, -1:] if dl is None else h[:, -1:] + dl[:, -1:]
            logits = st.unembed(hl, cols)[:, -1]
        return EdgeOut(logits, kept, kv)

    def _qkv_one_per_row(self, li: int, h: Tensor, rows: tuple[Tensor, Tensor, int], rope: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Queries/keys/values when each row changes at most one attention receiver of this layer.

        Row ``r``'s stream is base row ``r mod N``'s: the ``N`` base rows are normalised and
        projected once, and only the changed receiver of each row is recomputed from its own
        normalised input (one copy of the stream per row, one head's projection), instead of
        normalising ``H + 2K`` copies of every row and projecting them all.
        """
        H, K = self.dims.n_heads, self.dims.n_kv_heads
        wq, bq, wk, bk, wv, bv, _, _ = self._weights(li)
        loc, delta, N = rows
        reps = h.shape[0] // N

        def proj(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            y = torch.einsum("bnD,hdD->bnhd", x, w)
            return y + b if b is not None else y

        xb = self.st.attn_in(li, h[:N])
        q, k, v = (proj(xb, w, b).repeat(reps, 1, 1, 1) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        for j in loc.unique().tolist():
            if j < 0:
                continue
            r = (loc == j).nonzero().flatten()
            x = self.st.attn_in(li, h[r] + delta[r])
            t, w, b, i = (q, wq, bq, j) if j < H else (k, wk, bk, j - H) if j < H + K else (v, wv, bv, j - H - K)
            y = x @ w[i].T
            t[r, :, i] = y + b[i] if b is not None else y
        q, k = self.st.qk_post(li, q, k, rope)
        return q, k, v

    def _layer(self, li: int, h: Tensor, deltas: Deltas, rope: Any, add: dict[int, Tensor],
               prefix: tuple[Tensor, Tensor] | None, kv: dict[int, tuple[Tensor, Tensor]] | None,
               last_only: bool = False) -> Tensor:
        """One block. ``last_only``: keys and values at every position (the last query attends to
        them), everything after the attention (output projection, MLP) at the last position only."""
        st, g = self.st, self.graph
        sp = deltas.attn_rows(li) if isinstance(deltas, OneReceiverPerRow) else None
        if sp is not None:
            q, k, v = self._qkv_one_per_row(li, h, sp, rope)
        elif (da := deltas.attn(li)) is None:
            q, k, v = st.qkv(li, st.attn_in(li, h), rope)
        else:
            q, k, v = self._qkv_heads(li, st.attn_in(li, h[:, :, None, :] + da), rope)
        if kv is not None:
            kv[li] = (k.transpose(1, 2), v.transpose(1, 2))
        z = st.attend(li, q, k, v, prefix)
        if last_only:
            z, h = z[:, -1:], h[:, -1:]
        h0 = g.head_sender(li, 0)
        head_adds = [add[s] for s in range(h0, h0 + g.n_heads) if s in add]
        if deltas.needs_heads:
            _, _, _, _, _, _, wo, bo = self._weights(li)
            heads = torch.einsum("bnhd,Dhd->bnhD", z, wo)
            if head_adds:
                heads = heads + torch.stack([add.get(s, torch.zeros_like(h)) for s in range(h0, h0 + g.n_heads)], 2)
            deltas.wrote(h0, heads)
            attn_out = heads.sum(2)
            if bo is not None:
                attn_out = attn_out + bo
        else:
            attn_out = st.attn_out(li, z)
            for a in head_adds:
                attn_out = attn_out + a
        dm = deltas.mlp(li)
        if last_only and dm is not None:
            dm = dm[:, -1:]
        ms = g.mlp_sender(li)
        if self.dims.parallel_residual:
            x = h if dm is None else h + dm
            mlp_out = st.mlp_out(li, st.mlp_hidden(li, st.mlp_in(li, x)))
            if ms in add:
                mlp_out = mlp_out + add[ms]
            deltas.wrote(ms, mlp_out[:, :, None])
            return h + attn_out + mlp_out
        mid = h + attn_out
        x = mid if dm is None else mid + dm
        mlp_out = st.mlp_out(li, st.mlp_hidden(li, st.mlp_in(li, x)))
        if ms in add:
            mlp_out = mlp_out + add[ms]
        deltas.wrote(ms, mlp_out[:, :, None])
        return mid + mlp_out


__all__ = ["Deltas", "EdgeForward", "EdgeOut", "GradLeaves", "NoDeltas", "OneReceiverPerRow"]
