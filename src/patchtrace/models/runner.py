"""patchtrace's own forward pass over a Hugging Face model's weights.

Why not hooks on the HF modules? Three reasons. (1) Every site in :mod:`patchtrace.sites` is then a
named tensor in one readable function, the same for every family, instead of a guess about which
module's input or output holds it (``head`` is the input of ``o_proj`` in Llama, a slice of a fused
Conv1D in GPT-2). (2) The fast engine needs to *start* a forward at layer ``L`` and position ``p``,
attending to cached keys/values of earlier positions: that is a parameter here, not a hack.
(3) LRP propagation rules (RelP) are options of this call, scoped to it: nothing is patched on the
HF classes, so the model is left exactly as it was.

The runner calls the HF modules for every weight-carrying step (embeddings, projections, rotary
tables) and re-implements only the glue (norms, attention arithmetic, residual adds), which the test
suite checks against the plain HF forward to 1e-5 on every family.

Interventions are plain functions ``fn(activation, ctx) -> activation | None`` registered per
:class:`~patchtrace.sites.HookPoint`; returning ``None`` keeps the activation (use that to record).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patchtrace.models.adapters import Dims, Family, get_path
from patchtrace.sites import HookPoint


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


@dataclass(frozen=True)
class LRPRules:
    """LRP propagation rules for relevance patching (RelP), applied inside one forward.

    With these, gradient × input of the forward becomes the LRP relevance (methods.md §3):

    Attributes:
        norm: identity rule through LayerNorm/RMSNorm (the normalising scale is a constant).
        act: ``act(x) = x * (act(x)/x)`` with the ratio constant (identity rule for activations).
        gate: uniform (half) rule for the gated product ``act(gate) * up`` of SwiGLU-style MLPs.
        attention: attention probabilities treated as constants (AH-/CP-LRP).
    """

    norm: bool = True
    act: bool = True
    gate: bool = True
    attention: bool = True


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
    kv: list[tuple[Tensor, Tensor] | None] | None


def _same_forward(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass, ``surrogate``'s gradient in the backward (LRP rules).

    ``surrogate − surrogate.detach()`` is exactly zero, so the forward result is bit-identical to
    ``value``; only the Jacobian changes.
    """
    return value.detach() + (surrogate - surrogate.detach())


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on ``x`` ``[B, n, H, d]``; partial rotary when ``cos`` is narrower than ``d``."""
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)


class Runner:
    """Runs a family-described HF causal LM layer by layer with hooks at every site.

    Args:
        model: the HF ``*ForCausalLM`` module (eval mode).
        family: its adapter table.
        dims: its dimensions.
    """

    def __init__(self, model: Any, family: Family, dims: Dims) -> None:
        from transformers.activations import ACT2FN

        self.model = model
        self.family = family
        self.dims = dims
        self.embed_tokens = get_path(model, family.embed)
        self.pos_embed = get_path(model, family.pos_embed) if family.pos_embed else None
        self.layers = list(get_path(model, family.layers))
        self.final_norm: Any = get_path(model, family.final_norm)
        self.rotary = get_path(model, family.rotary) if family.rotary else None
        self.lm_head: Any = model.get_output_embeddings()
        self.act = ACT2FN[dims.act]

    # -- pieces -------------------------------------------------------------------------------

    def _norm(self, mod: Any, x: Tensor, lrp: LRPRules | None) -> Tensor:
        kind = self.family.norm
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6)))
        detach = lrp is not None and lrp.norm
        if kind == "layer":
            ref = F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, eps)
            if not detach:
                return ref
            xc = x - x.mean(-1, keepdim=True)
            scale = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps).detach()
            y = xc * scale
            y = y * mod.weight if mod.weight is not None else y
            y = y + mod.bias if mod.bias is not None else y
            return _same_forward(ref, y)
        x32 = x.float()
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        if detach:
            scale = scale.detach()
        if kind == "rms_gemma":
            return (x32 * scale * (1.0 + mod.weight.float())).type_as(x)
        return mod.weight * (x32 * scale).to(x.dtype)

    def _act(self, x: Tensor, lrp: LRPRules | None) -> Tensor:
        y = self.act(x)
        if lrp is not None and lrp.act:
            # identity rule: backward multiplies by act(x)/x̂ with the authors' stabilizer
            # x̂ = x + (sign(x) + [x = 0])·1e-6, the ratio in float32; forward stays exactly act(x)
            x32 = x.float()
            xs = x32 + (torch.sign(x32) + (x32 == 0).float()) * 1e-6
            ratio = (y.float() / xs).to(x.dtype).detach()
            return _same_forward(y, x * ratio)
        return y

    def embed(self, ids: Tensor, pos_offset: int = 0) -> Tensor:
        """Token (+ position) embeddings ``[B, n, D]`` of ``ids`` starting at absolute ``pos_offset``."""
        h = self.embed_tokens(ids)
        if self.pos_embed is not None:
            pos = torch.arange(pos_offset, pos_offset + ids.shape[1], device=ids.device)
            h = h + self.pos_embed(pos)[None]
        return h

    def unembed(self, resid: Tensor, cols: Tensor | None = None, lrp: LRPRules | None = None) -> Tensor:
        """Final norm and unembedding; ``cols`` computes only those vocabulary columns."""
        h = self._norm(self.final_norm, resid, lrp)
        if cols is None:
            return self.lm_head(h)
        w = self.lm_head.weight[cols]
        b = self.lm_head.bias[cols] if getattr(self.lm_head, "bias", None) is not None else None
        return F.linear(h, w, b)

    def _qkv(self, attn: Any, x: Tensor, lrp: LRPRules | None = None) -> tuple[Tensor, Tensor, Tensor]:
        B, n, _ = x.shape
        d, H, K = self.dims.d_head, self.dims.n_heads, self.dims.n_kv_heads
        fam = self.family
        if fam.qkv == "separate":
            q = getattr(attn, fam.q)(x).view(B, n, H, d)
            k = getattr(attn, fam.k)(x).view(B, n, K, d)
            v = getattr(attn, fam.v)(x).view(B, n, K, d)
        elif fam.qkv == "gpt2_fused":
            q, k, v = getattr(attn, fam.q)(x).split(self.dims.d_model, dim=2)
            q, k, v = q.view(B, n, H, d), k.view(B, n, K, d), v.view(B, n, K, d)
        else:  # neox_fused: per head [q | k | v]
            q, k, v = getattr(attn, fam.q)(x).view(B, n, H, 3 * d).chunk(3, dim=-1)
        if fam.qk_norm is not None:
            q = self._qknorm(getattr(attn, fam.qk_norm[0]), q, lrp)
            k = self._qknorm(getattr(attn, fam.qk_norm[1]), k, lrp)
        return q, k, v

    def _qknorm(self, mod: Any, x: Tensor, lrp: LRPRules | None = None) -> Tensor:
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6)))
        x32 = x.float()
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        if lrp is not None and lrp.norm:  # LN rule on the q/k norms too (matters when attention is not frozen)
            scale = scale.detach()
        return mod.weight * (x32 * scale).to(x.dtype)

    # -- the forward ----------------------------------------------------------------------------

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
        lrp: LRPRules | None = None,
        explicit_attention: bool = False,
        joins: Mapping[tuple[str, int], Tensor] | None = None,
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
            last_only: unembed only the last position.
            lrp: LRP rules (RelP); gradients of this forward then carry relevance.
            explicit_attention: compute the attention pattern explicitly even if no hook needs it.
            joins: extra rows that join the batch part-way (the sweep engine's staggered batches):
                ``("pre", L)`` rows are residual streams entering layer ``L`` (``L == n_layers``:
                before the final norm); ``("mid", L)`` rows are ``resid_mid`` of layer ``L`` and go
                through its MLP only (sequential blocks). Joined rows are appended after the rows
                already in flight, so row order is join order.

        Returns:
            :class:`RunOutput`.
        """
        dims, fam = self.dims, self.family
        hooks = hooks or {}
        joins = joins or {}
        if resid is None:
            if ids is None:
                raise ValueError("forward needs ids or resid")
            if start_layer != 0:
                raise ValueError("starting at a later layer needs the residual stream (resid=...)")
            h = self.embed(ids, pos_offset)
            h = self._hook(hooks, "embed", None, h, RunCtx(pos_offset, pos_offset + ids.shape[1]))
        else:
            h = resid
        n = h.shape[1]
        seq_len = pos_offset + n
        ctx = RunCtx(pos_offset, seq_len)
        if dims.sliding_window is not None and seq_len > dims.sliding_window:
            raise ValueError(
                f"sequence length {seq_len} exceeds the sliding window {dims.sliding_window}; "
                "sliding-window attention is not implemented"
            )
        cos = sin = None
        if self.rotary is not None:
            pos_ids = torch.arange(pos_offset, seq_len, device=h.device)[None]
            cos, sin = self.rotary(h, pos_ids)
        stop = dims.n_layers if stop_layer is None else stop_layer
        kv_out: list[tuple[Tensor, Tensor] | None] | None = [None] * dims.n_layers if keep_kv else None
        for li in range(start_layer, stop):
            layer = self.layers[li]
            if ("pre", li) in joins:
                h = torch.cat((h, joins[("pre", li)]), dim=0)
            B = h.shape[0]
            h = self._hook(hooks, "resid_pre", li, h, ctx)
            attn_mod = get_path(layer, fam.attn)
            x = self._norm(get_path(layer, fam.ln1), h, lrp)
            q, k, v = self._qkv(attn_mod, x, lrp)
            if cos is not None and sin is not None:
                q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
            q = self._hook(hooks, "q", li, q, ctx)
            k = self._hook(hooks, "k", li, k, ctx)
            v = self._hook(hooks, "v", li, v, ctx)
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, K, n, d]
            if kv_out is not None:
                kv_out[li] = (kt, vt)
            prefix = past_kv[li] if past_kv is not None and pos_offset > 0 else None
            z = self._attention(q.transpose(1, 2), kt, vt, prefix, li, hooks, ctx, lrp, explicit_attention)
            z = self._hook(hooks, "head", li, z.transpose(1, 2), ctx)  # [B, n, H, d]
            attn_out = getattr(attn_mod, fam.o)(z.reshape(B, n, dims.n_heads * dims.d_head))
            attn_out = self._hook(hooks, "attn_out", li, attn_out, ctx)
            mlp_mod = get_path(layer, fam.mlp)
            if dims.parallel_residual:
                m_in = self._norm(get_path(layer, fam.ln2), h, lrp)
            else:
                h = h + attn_out
                if ("mid", li) in joins:
                    h = torch.cat((h, joins[("mid", li)]), dim=0)
                h = self._hook(hooks, "resid_mid", li, h, ctx)
                m_in = self._norm(get_path(layer, fam.ln2), h, lrp)
            up = getattr(mlp_mod, fam.mlp_in)(m_in)
            if fam.gated and fam.mlp_gate is not None:
                g = self._act(getattr(mlp_mod, fam.mlp_gate)(m_in), lrp)
                prod = g * up
                if lrp is not None and lrp.gate:
                    prod = 0.5 * prod + 0.5 * prod.detach()
                act = prod
            else:
                act = self._act(up, lrp)
            act = self._hook(hooks, "neuron", li, act, ctx)
            mlp_out = getattr(mlp_mod, fam.mlp_out)(act)
            mlp_out = self._hook(hooks, "mlp_out", li, mlp_out, ctx)
            h = h + attn_out + mlp_out if dims.parallel_residual else h + mlp_out
            h = self._hook(hooks, "resid_post", li, h, ctx)
        if stop_layer is not None:
            return RunOutput(None, h, kv_out)
        if ("pre", dims.n_layers) in joins:
            h = torch.cat((h, joins[("pre", dims.n_layers)]), dim=0)
        hu = h[:, -1:] if last_only else h
        return RunOutput(self.unembed(hu, unembed_cols, lrp), h, kv_out)

    def _attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        prefix: tuple[Tensor, Tensor] | None,
        li: int,
        hooks: Hooks,
        ctx: RunCtx,
        lrp: LRPRules | None,
        explicit: bool,
    ) -> Tensor:
        """Causal attention of ``q`` ``[B, H, n, d]`` over this call's ``k``, ``v`` ``[B, K, n, d]``
        and an optional cached prefix ``(pk, pv)`` ``[Bp, K, P, d]`` shared by rows ``r % Bp``."""
        dims = self.dims
        B, H, n, d = q.shape
        K = dims.n_kv_heads
        rep = H // K
        need_pattern = explicit or (lrp is not None and lrp.attention) or HookPoint("pattern", li) in hooks
        p = 0 if prefix is None else prefix[0].shape[2]
        window = dims.sliding_window
        if p == 0 and not need_pattern:
            kr = k.repeat_interleave(rep, dim=1) if rep > 1 else k
            vr = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            if window is None:
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=n > 1, scale=dims.attn_scale)
            qi = torch.arange(n, device=q.device)[:, None]
            kj = torch.arange(n, device=q.device)[None, :]
            return F.scaled_dot_product_attention(
                q, kr, vr, attn_mask=(kj <= qi) & (kj > qi - window), scale=dims.attn_scale
            )
        # scores against this call's own keys: [B, H, n, n], grouped by KV head (no repeat)
        qg = q.reshape(B, K, rep * n, d)
        s_new = torch.matmul(qg, k.transpose(2, 3)).view(B, H, n, n) * dims.attn_scale
        qi = torch.arange(p, p + n, device=q.device)[:, None]
        kj = torch.arange(p + n, device=q.device)[None, :]
        mask = kj <= qi
        if window is not None:
            mask = mask & (kj > qi - window)
        if p > 0:
            assert prefix is not None
            pk, pv = prefix
            Bp = pk.shape[0]
            if B % Bp:
                raise ValueError(f"batch {B} is not a multiple of the cached prefix batch {Bp}")
            R = B // Bp
            # rows r = i * Bp + j share prefix row j: fold i into the query axis of one matmul
            qp = q.reshape(R, Bp, K, rep, n, d).permute(1, 2, 0, 3, 4, 5).reshape(Bp, K, R * rep * n, d)
            s_pre = torch.matmul(qp, pk.transpose(2, 3)) * dims.attn_scale  # [Bp, K, R*rep*n, p]
            s_pre = s_pre.view(Bp, K, R, rep, n, p).permute(2, 0, 1, 3, 4, 5).reshape(B, H, n, p)
            scores = torch.cat((s_pre, s_new), dim=-1)
        else:
            scores = s_new
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if lrp is not None and lrp.attention:
            pattern = pattern.detach()
        pattern = self._hook(hooks, "pattern", li, pattern, ctx)
        out = torch.matmul(pattern[..., p:].reshape(B, K, rep * n, n), v).view(B, H, n, d)
        if p > 0:
            pp = pattern[..., :p].reshape(R, Bp, K, rep, n, p).permute(1, 2, 0, 3, 4, 5).reshape(Bp, K, R * rep * n, p)
            o_pre = torch.matmul(pp, pv).view(Bp, K, R, rep, n, d).permute(2, 0, 1, 3, 4, 5).reshape(B, H, n, d)
            out = out + o_pre
        return out

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
