"""patchtrace's own forward pass over a Hugging Face model's weights.

Why not hooks on the HF modules? Three reasons. (1) Every site in :mod:`patchtrace.sites` is then a
named tensor in one readable function, the same for every family, instead of a guess about which
module's input or output holds it (``head`` is the input of ``o_proj`` in Llama, a slice of a fused
Conv1D in GPT-2). (2) The fast engine needs to *start* a forward at layer ``L`` and position ``p``,
attending to cached keys/values of earlier positions: that is a parameter here, not a hack.
(3) LRP propagation rules (RelP) are options of this call, scoped to it: nothing is patched on the
HF classes, so the model is left exactly as it was.

The forward is a composition of the block's stages (:mod:`patchtrace.models.stages`), the same
methods the sweep engine calls when it rebuilds a layer's output from cached activations; the test
suite checks the composition against the plain HF forward on every family.

What the sites mean, for every family (post-norm / sandwich blocks such as Gemma 3 included):
``attn_out`` and ``mlp_out`` are what is *added* to the residual stream, i.e. after the post-norm;
``head`` is the per-head output before ``o_proj``; ``neuron`` is the MLP hidden activation
(``act(gate) · up`` when gated); ``q``/``k`` are taken after q/k-norm and rotary.

Eval and no-grad semantics, whatever the caller's module flags: the stages never apply dropout, and
while a forward runs with gradients enabled the model's parameters are taken out of the autograd
graph (their ``requires_grad`` flags are restored before :meth:`Runner.forward` returns), so
gradients flow to activations only and nothing accumulates in a parameter's ``.grad``.

Interventions are plain functions ``fn(activation, ctx) -> activation | None`` registered per
:class:`~patchtrace.sites.HookPoint`; returning ``None`` keeps the activation (use that to record).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patchtrace.models.stages import LRPRules, Rope, RunnerError, Stages
from patchtrace.sites import HookPoint

__all__ = ["HookFn", "Hooks", "LRPRules", "RunCtx", "RunOutput", "Runner", "RunnerError"]


@dataclass(frozen=True)
class RunCtx:
    """What a hook function may need to know about the call it runs in.

    Attributes:
        pos_offset: absolute position of the first position in this call's tensors (non-zero when
            the call resumes after a cached prefix).
        seq_len: total sequence length (prefix + this call's positions).
    """

    pos_offset: int
    seq_len: int


HookFn = Callable[[Tensor, RunCtx], Tensor | None]
Hooks = Mapping[HookPoint, Sequence[HookFn]]
Joins = Mapping[tuple[str, int], Tensor]
KVList = list[tuple[Tensor, Tensor] | None]


@dataclass
class RunOutput:
    """Result of :meth:`Runner.forward`.

    Attributes:
        logits: ``[B, n, V]`` (or ``[B, n, len(cols)]`` with ``unembed_cols``); None when stopped early.
        resid: the residual stream after the last layer run (before the final norm), ``[B, n, D]``.
        kv: per layer, the (key, value) of this call's positions, ``[B, K, n, d]`` each, when asked.
    """

    logits: Tensor | None
    resid: Tensor
    kv: KVList | None


@dataclass(frozen=True)
class _Call:
    """The options of one forward that every layer reads (grouped so helpers take one argument)."""

    hooks: Hooks
    lrp: LRPRules | None
    explicit: bool
    ctx: RunCtx
    past_kv: Sequence[tuple[Tensor, Tensor] | None] | None
    joins: Joins
    rope: Rope | None


class Runner(Stages):
    """Runs a family-described HF causal LM layer by layer with hooks at every site.

    Args:
        model: the HF ``*ForCausalLM`` module (its ``training`` / ``requires_grad`` flags are not
            read or changed; see the module docstring).
        family: its adapter table.
        dims: its dimensions.
    """

    def forward(
        self,
        ids: Tensor | None = None,
        *,
        resid: Tensor | None = None,
        start_layer: int = 0,
        stop_layer: int | None = None,
        pos_offset: int = 0,
        past_kv: Sequence[tuple[Tensor, Tensor] | None] | None = None,
        hooks: Hooks | None = None,
        keep_kv: bool = False,
        unembed_cols: Tensor | None = None,
        last_only: bool = False,
        readout: Tensor | None = None,
        lrp: LRPRules | None = None,
        explicit_attention: bool = False,
        joins: Joins | None = None,
    ) -> RunOutput:
        """Run layers ``start_layer .. stop_layer-1`` (then unembed if ``stop_layer`` is None).

        Args:
            ids: token ids ``[B, n]``; used when ``start_layer == 0`` and ``resid`` is None.
            resid: the residual stream entering ``start_layer`` for this call's positions, ``[B, n, D]``.
            start_layer: first layer to run.
            stop_layer: run up to (excluding) this layer and return the residual without unembedding.
            pos_offset: absolute position of this call's first position.
            past_kv: per layer, cached (key, value) ``[Bp, K, pos_offset, d]`` of the earlier
                positions; ``B`` must be a multiple of ``Bp``: row ``r`` attends to prefix row
                ``r % Bp``. The prefix is shared by grouped matmuls, never copied per row.
            hooks: functions per hook point; see the module docstring.
            keep_kv: return each layer's keys/values of this call's positions.
            unembed_cols: compute only these vocabulary columns of the logits.
            last_only: unembed only the last position, or the ``readout`` position.
            readout: absolute positions ``[N]`` to unembed with ``last_only``, row ``r`` reading
                ``readout[r % N]`` (the mask position of a masked LM); None: the last position.
                Encoders (bidirectional attention) have no "last position" to read: they need it.
            lrp: LRP rules (RelP); gradients of this forward then carry relevance.
            explicit_attention: compute the attention pattern explicitly even if no hook needs it.
            joins: extra rows that join the batch part-way (the sweep engine's staggered batches):
                ``("pre", L)`` rows are residual streams entering layer ``L`` (``L == n_layers``:
                before the final norm); ``("mid", L)`` rows are ``resid_mid`` of layer ``L`` and go
                through its MLP only (sequential blocks). Joined rows are appended after the rows
                already in flight, so row order is join order.

        Returns:
            :class:`RunOutput`.

        Raises:
            RunnerError: no input, a layer range outside the model, or a join the run never reaches.
        """
        n_layers = self.dims.n_layers
        stop = n_layers if stop_layer is None else stop_layer
        if not 0 <= start_layer <= stop <= n_layers:
            raise RunnerError(f"layers {start_layer}..{stop} are outside the model's 0..{n_layers}")
        joins = joins or {}
        self._check_joins(joins, start_layer, stop, unembeds=stop_layer is None)
        if not self.family.causal and (pos_offset or past_kv is not None):
            raise RunnerError(f"{self.family.name} attends in both directions: a forward cannot resume after "
                              "cached keys/values (pos_offset and past_kv must be unset)")
        with self._weights_frozen():
            h = self._entry(ids, resid, start_layer, pos_offset, hooks or {})
            ctx = RunCtx(pos_offset, pos_offset + h.shape[1])
            call = _Call(hooks or {}, lrp, explicit_attention, ctx, past_kv, joins, self.rope(h, pos_offset))
            kv_out: KVList | None = [None] * n_layers if keep_kv else None
            for li in range(start_layer, stop):
                h = self._layer(li, h, call, kv_out)
            if stop_layer is not None:
                return RunOutput(None, h, kv_out)
            h = self._join(call, "pre", n_layers, h)
            hu = self.readout_rows(h, readout, pos_offset) if last_only else h
            return RunOutput(self.unembed(hu, unembed_cols, lrp), h, kv_out)

    def readout_rows(self, h: Tensor, readout: Tensor | None, pos_offset: int = 0) -> Tensor:
        """``[B, 1, D]``: each row's stream at its readout position (None: the last position).

        Raises:
            RunnerError: a bidirectional model without readout positions, rows that are not a
                multiple of them, or a position this call does not compute.
        """
        if readout is None:
            if not self.family.causal:
                raise RunnerError(f"{self.family.name} attends in both directions: it is read at the mask token, and "
                                  "this call names no readout position (readout=). The methods that read an "
                                  "encoder's mask position: activation patching (`patchtrace patch`), causal "
                                  "tracing (`trace`), AtP, IG and RelP (Python API and `compare`)")
            return h[:, -1:]
        B, N = h.shape[0], readout.shape[0]
        if B % N:
            raise RunnerError(f"readout has {N} positions for {B} rows (rows must be a multiple)")
        idx = readout.to(h.device).repeat(B // N) - pos_offset
        if int(idx.min()) < 0 or int(idx.max()) >= h.shape[1]:
            raise RunnerError(f"readout positions {readout.tolist()} are outside this call's positions "
                              f"{pos_offset}..{pos_offset + h.shape[1] - 1}")
        return h[torch.arange(B, device=h.device), idx][:, None]

    # -- the composition --------------------------------------------------------------------------

    def _entry(self, ids: Tensor | None, resid: Tensor | None, start_layer: int, pos_offset: int, hooks: Hooks) -> Tensor:
        """The residual stream entering ``start_layer``: the given ``resid``, or the hooked embedding."""
        if resid is not None:
            return resid
        if ids is None:
            raise RunnerError("forward needs ids or resid")
        if start_layer != 0:
            raise RunnerError(f"starting at layer {start_layer} needs the residual stream entering it (resid=...)")
        h = self.embed(ids, pos_offset)
        return self._hook(hooks, "embed", None, h, RunCtx(pos_offset, pos_offset + ids.shape[1]))

    def _layer(self, li: int, h: Tensor, call: _Call, kv_out: KVList | None) -> Tensor:
        """One layer: the attention sublayer, its residual add, the MLP sublayer, its residual add."""
        ctx, hooks = call.ctx, call.hooks
        h = self._join(call, "pre", li, h)
        h = self._hook(hooks, "resid_pre", li, h, ctx)
        attn_out = self._attention_sublayer(li, h, call, kv_out)
        if self.dims.parallel_residual:
            mlp_out = self._mlp_sublayer(li, h, call)
            h = self.resid_post(h, mlp_out, attn_out)
        else:
            mid = self._join(call, "mid", li, self.add_attn(h, attn_out, li, call.lrp))
            mid = self._hook(hooks, "resid_mid", li, mid, ctx)
            h = self.resid_post(mid, self._mlp_sublayer(li, mid, call), li=li, lrp=call.lrp)
        return self._hook(hooks, "resid_post", li, h, ctx)

    def _attention_sublayer(self, li: int, h: Tensor, call: _Call, kv_out: KVList | None) -> Tensor:
        """``attn_out`` of layer ``li`` (hooked at q, k, v, pattern, head and attn_out)."""
        ctx, hooks, lrp = call.ctx, call.hooks, call.lrp
        q, k, v = self.qkv(li, self.attn_in(li, h, lrp), call.rope, lrp)
        q = self._hook(hooks, "q", li, q, ctx)
        k = self._hook(hooks, "k", li, k, ctx)
        v = self._hook(hooks, "v", li, v, ctx)
        if kv_out is not None:
            kv_out[li] = (k.transpose(1, 2), v.transpose(1, 2))  # [B, K, n, d]
        prefix = call.past_kv[li] if call.past_kv is not None and ctx.pos_offset > 0 else None
        on_pattern = None
        if hooks.get(HookPoint("pattern", li)):

            def on_pattern(pat: Tensor) -> Tensor:
                return self._hook(hooks, "pattern", li, pat, ctx)

        z = self.attend(li, q, k, v, prefix, lrp=lrp, need_pattern=call.explicit, on_pattern=on_pattern)
        z = self._hook(hooks, "head", li, z, ctx)
        return self._hook(hooks, "attn_out", li, self.attn_out(li, z, lrp), ctx)

    def _mlp_sublayer(self, li: int, h: Tensor, call: _Call) -> Tensor:
        """``mlp_out`` of layer ``li`` from the stream entering its MLP (hooked at neuron and mlp_out;
        mixture-of-experts MLPs at router, expert and mlp_out)."""
        if self.family.moe:
            x = self.mlp_in(li, h, call.lrp)
            logits = self._hook(call.hooks, "router", li, self.router(li, x), call.ctx)
            per = self._hook(call.hooks, "expert", li, self.experts(li, x, logits, call.lrp), call.ctx)
            return self._hook(call.hooks, "mlp_out", li, per.sum(-2), call.ctx)
        act = self.mlp_hidden(li, self.mlp_in(li, h, call.lrp), call.lrp)
        act = self._hook(call.hooks, "neuron", li, act, call.ctx)
        return self._hook(call.hooks, "mlp_out", li, self.mlp_out(li, act, call.lrp), call.ctx)

    # -- joins, hooks, weights ----------------------------------------------------------------------

    def _check_joins(self, joins: Joins, start: int, stop: int, *, unembeds: bool) -> None:
        """Refuse joins the run would silently drop (never reached, or a resid_mid that does not exist)."""
        for stage, layer in joins:
            reached = start <= layer < stop or (unembeds and stage == "pre" and layer == self.dims.n_layers)
            if stage not in ("pre", "mid") or not reached or (stage == "mid" and layer == self.dims.n_layers):
                raise RunnerError(f"join ({stage!r}, {layer}) is never reached by layers {start}..{stop}")
            if stage == "mid" and self.dims.parallel_residual:
                raise RunnerError(f"join ('mid', {layer}): {self.family.name} blocks are parallel (no resid_mid)")

    @staticmethod
    def _join(call: _Call, stage: str, layer: int, h: Tensor) -> Tensor:
        rows = call.joins.get((stage, layer))
        return h if rows is None else torch.cat((h, rows), dim=0)

    @contextlib.contextmanager
    def _weights_frozen(self) -> Iterator[None]:
        """Keep the parameters out of this forward's autograd graph, restoring their flags after.

        Under ``torch.no_grad`` (every non-gradient caller) this does nothing.
        """
        if not torch.is_grad_enabled():
            yield
            return
        live = [p for p in self.model.parameters() if p.requires_grad]
        for p in live:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in live:
                p.requires_grad_(True)

    @staticmethod
    def _hook(hooks: Hooks, kind: str, layer: int | None, x: Tensor, ctx: RunCtx | None) -> Tensor:
        if not hooks:
            return x
        fns = hooks.get(HookPoint(kind, layer))
        if not fns:
            return x
        c = ctx if ctx is not None else RunCtx(0, x.shape[1])
        for fn in fns:
            y = fn(x, c)
            if y is not None:
                x = y
        return x

