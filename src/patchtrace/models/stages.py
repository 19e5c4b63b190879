"""The stages of one transformer block, written once per family, composed by every caller.

A layer is a fixed composition of named stages (sequential blocks; the names are methods here)::

    resid_pre ─ attn_in ─ qkv ─ attend ─ attn_out ─┐          attn_in   = the input norm
        └────────────────────────────── add_attn ──┴─ resid_mid        qkv = projections, q/k-norm, rotary
    resid_mid ─ mlp_in ─ mlp_hidden ─ mlp_out ─────┐          attn_out  = o_proj (+ post-norm)
        └────────────────────────────── resid_post ┴─ resid_post       mlp_out   = down_proj (+ post-norm)

Parallel blocks (GPT-NeoX) feed ``resid_pre`` to both sublayers and add both outputs at once.
Around the layers: :meth:`Stages.embed` before, :meth:`Stages.unembed` (final norm, unembedding,
optional logit soft-cap) after.

Why stages rather than one forward function: :class:`~patchtrace.models.runner.Runner` composes them
into the forward, and the sweep engine composes the *same* methods when it rebuilds a layer's output
from cached activations (a ``head`` patch re-runs ``attn_out``, i.e. ``o_proj`` **and** the post-norm
where the family has one, then ``add_attn``). With one copy of the block's arithmetic the fast path
cannot drift from the forward when a family adds a norm or a residual rule.

What a site means, for every family including post-norm (sandwich) blocks: ``attn_out`` and
``mlp_out`` are what is *added to the residual stream* (after the post-norm), ``head`` is one head's
output before ``o_proj``, ``neuron`` is the MLP hidden activation (``act(gate) · up`` when gated).

The weight-carrying steps call the Hugging Face modules (embeddings, projections, rotary tables); only
the glue (norms, attention arithmetic, residual adds) is re-implemented, and the tests compare it
with the plain HF forward. Nothing here uses dropout: the stages compute the eval-mode function
whatever the module's ``training`` flag says. LRP propagation rules (:class:`LRPRules`) are options
of the calls: they change gradients only, never forward values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patchtrace.errors import PatchtraceError
from patchtrace.models.adapters import Dims, Family, get_path
from patchtrace.models.attention import apply_rotary, explicit_attention, fused_attention
from patchtrace.models.footprint import Footprint

Rope = dict[str, tuple[Tensor, Tensor]]


class RunnerError(PatchtraceError, ValueError):
    """A forward or stage call that does not fit the model (names the argument, layer or join)."""


@dataclass(frozen=True)
class LRPRules:
    """LRP propagation rules for relevance patching (RelP), applied inside one forward.

    With these, gradient × input of the forward becomes the LRP relevance.

    Attributes:
        norm: identity rule through LayerNorm/RMSNorm, post-norms included (the normalising scale is
            a constant).
        act: ``act(x) = x * (act(x)/x)`` with the ratio constant (identity rule for activations and
            for the final logit soft-cap).
        gate: uniform (half) rule for the gated product ``act(gate) * up`` of SwiGLU-style MLPs.
        attention: attention probabilities treated as constants (AH-/CP-LRP).
    """

    norm: bool = True
    act: bool = True
    gate: bool = True
    attention: bool = True


def _same_forward(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass, ``surrogate``'s gradient in the backward (LRP rules).

    ``surrogate − surrogate.detach()`` is exactly zero, so the forward result is bit-identical to
    ``value``; only the Jacobian changes.
    """
    return value.detach() + (surrogate - surrogate.detach())


@dataclass(frozen=True)
class _Block:
    """The HF modules of one layer, looked up once."""

    ln1: Any
    ln2: Any
    attn: Any
    o: Any
    mlp: Any
    post_attn: Any
    post_mlp: Any
    post_add: tuple[Any, Any] | None = None  # post-norm encoders: the norms after the attention / MLP adds


class Stages(Footprint):
    """The block's stages over a family-described HF causal LM (see the module docstring).

    Args:
        model: the HF ``*ForCausalLM`` module.
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
        self.head_dense = get_path(model, family.head_dense) if family.head_dense else None
        self.head_act = ACT2FN[family.head_act or dims.act]
        f = family
        self._blocks = [
            _Block(
                get_path(layer, f.ln1), get_path(layer, f.ln2), get_path(layer, f.attn),
                get_path(get_path(layer, f.attn), f.o), get_path(layer, f.mlp),
                get_path(layer, f.post_attn_norm) if f.post_attn_norm else None,
                get_path(layer, f.post_mlp_norm) if f.post_mlp_norm else None,
                (get_path(layer, f.post_ln[0]), get_path(layer, f.post_ln[1])) if f.post_ln else None,
            )
            for layer in self.layers
        ]

    # -- elementwise pieces ---------------------------------------------------------------------

    def _norm(self, mod: Any, x: Tensor, lrp: LRPRules | None) -> Tensor:
        """The family's norm (LayerNorm, RMSNorm, or Gemma's ``(1 + w)`` RMSNorm) with module ``mod``."""
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

    @staticmethod
    def _identity_rule(x: Tensor, y: Tensor, lrp: LRPRules | None) -> Tensor:
        """``y = f(x)``; under LRP's identity rule the backward multiplies by ``f(x)/x̂`` with the
        authors' stabilizer ``x̂ = x + (sign(x) + [x = 0])·1e-6`` (ratio in float32)."""
        if lrp is None or not lrp.act:
            return y
        x32 = x.float()
        xs = x32 + (torch.sign(x32) + (x32 == 0).float()) * 1e-6
        ratio = (y.float() / xs).to(x.dtype).detach()
        return _same_forward(y, x * ratio)

    # -- before and after the layers ------------------------------------------------------------

    def embed(self, ids: Tensor, pos_offset: int = 0) -> Tensor:
        """Token (+ position) embeddings ``[B, n, D]`` of ``ids`` starting at absolute ``pos_offset``
        (encoders: + token type 0, then the embedding LayerNorm; :mod:`patchtrace.models.encoder`)."""
        if self.family.embed_norm is not None:
            from patchtrace.models.encoder import embed

            return embed(self.model, self.family, self.embed_tokens, self.pos_embed, ids, pos_offset)
        h = self.embed_tokens(ids)
        if self.pos_embed is not None:
            pos = torch.arange(pos_offset, pos_offset + ids.shape[1], device=ids.device)
            h = h + self.pos_embed(pos)[None]
        return h

    def unembed(self, resid: Tensor, cols: Tensor | None = None, lrp: LRPRules | None = None) -> Tensor:
        """Final norm, unembedding (only vocabulary columns ``cols`` when given) and soft-cap.

        Encoders: the MLM head's transform ``LN(act(dense(h)))`` is the final norm (``act`` under the
        LRP identity rule when ``lrp`` asks for it)."""
        if self.head_dense is not None:
            x = self.head_dense(resid)
            resid = self._identity_rule(x, self.head_act(x), lrp)
        h = self._norm(self.final_norm, resid, lrp)
        if cols is None:
            logits = self.lm_head(h)
        else:
            w = self.lm_head.weight[cols]
            b = self.lm_head.bias[cols] if getattr(self.lm_head, "bias", None) is not None else None
            logits = F.linear(h, w, b)
        cap = self.dims.final_softcap
        if cap is None:
            return logits
        return self._identity_rule(logits, torch.tanh(logits / cap) * cap, lrp)

    def rope(self, h: Tensor, pos_offset: int) -> Rope | None:
        """Rotary ``(cos, sin)`` tables for positions ``pos_offset..`` of ``h``, per layer type."""
        if self.rotary is None:
            return None
        pos_ids = torch.arange(pos_offset, pos_offset + h.shape[1], device=h.device)[None]
        if not self.family.rope_by_layer_type:
            return {"": self.rotary(h, pos_ids)}
        return {t: self.rotary(h, pos_ids, t) for t in sorted(set(self.dims.layer_types))}

    # -- the attention sublayer -----------------------------------------------------------------

    def attn_in(self, li: int, h: Tensor, lrp: LRPRules | None = None) -> Tensor:
        """The norm entering layer ``li``'s attention (none in post-norm blocks)."""
        if self.family.post_ln:
            return h
        return self._norm(self._blocks[li].ln1, h, lrp)

    def qkv(self, li: int, x: Tensor, rope: Rope | None, lrp: LRPRules | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries ``[B, n, H, d]``, keys and values ``[B, n, K, d]``: projections, q/k-norm, rotary."""
        B, n, _ = x.shape
        d, H, K = self.dims.d_head, self.dims.n_heads, self.dims.n_kv_heads
        fam, attn = self.family, self._blocks[li].attn
        if fam.qkv == "separate":
            q = get_path(attn, fam.q)(x).view(B, n, H, d)
            k = get_path(attn, fam.k)(x).view(B, n, K, d)
            v = get_path(attn, fam.v)(x).view(B, n, K, d)
        elif fam.qkv == "gpt2_fused":
            q, k, v = getattr(attn, fam.q)(x).split(self.dims.d_model, dim=2)
            q, k, v = q.view(B, n, H, d), k.view(B, n, K, d), v.view(B, n, K, d)
        else:  # neox_fused: per head [q | k | v]
            q, k, v = getattr(attn, fam.q)(x).view(B, n, H, 3 * d).chunk(3, dim=-1)
        q, k = self.qk_post(li, q, k, rope, lrp)
        return q, k, v

    def qk_post(
        self, li: int, q: Tensor, k: Tensor, rope: Rope | None, lrp: LRPRules | None = None
    ) -> tuple[Tensor, Tensor]:
        """What follows the projections: the family's q/k norms (per head, per position), then rotary.

        Shared by :meth:`qkv` and by paths that project queries and keys themselves (the circuits'
        per-receiver forward feeds every head its own input), so the arithmetic has one copy.
        """
        fam, attn = self.family, self._blocks[li].attn
        if fam.qk_norm is not None:  # same norm kind as the family's
            q = self._norm(getattr(attn, fam.qk_norm[0]), q, lrp)
            k = self._norm(getattr(attn, fam.qk_norm[1]), k, lrp)
        if rope is not None:
            cos, sin = rope[self.dims.layer_types[li] if fam.rope_by_layer_type else ""]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k

    def attend(
        self,
        li: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        prefix: tuple[Tensor, Tensor] | None = None,
        *,
        lrp: LRPRules | None = None,
        need_pattern: bool = False,
        on_pattern: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Per-head outputs ``[B, n, H, d]`` of layer ``li``'s causal (or local, or, in encoders,
        bidirectional) attention.

        ``q`` ``[B, n, H, d]`` and ``k``, ``v`` ``[B, n, K, d]`` are this call's positions; ``prefix``
        holds cached keys/values ``[Bp, K, p, d]`` of the positions before them, shared by rows
        ``r % Bp`` (see :mod:`patchtrace.models.attention`).
        """
        scale, window = self.dims.attn_scale, self.dims.window(li)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        frozen = lrp is not None and lrp.attention
        if prefix is not None and prefix[0].shape[2] > 0 and q.shape[0] % prefix[0].shape[0]:
            raise RunnerError(f"layer {li}: batch {q.shape[0]} is not a multiple of the cached prefix batch "
                              f"{prefix[0].shape[0]}")
        if (prefix is None or prefix[0].shape[2] == 0) and not (need_pattern or frozen or on_pattern):
            return fused_attention(qh, kh, vh, scale, window, causal=self.family.causal).transpose(1, 2)
        z = explicit_attention(qh, kh, vh, prefix, scale, window, freeze_pattern=frozen, on_pattern=on_pattern,
                               causal=self.family.causal)
        return z.transpose(1, 2)

    def attn_out(self, li: int, z: Tensor, lrp: LRPRules | None = None) -> Tensor:
        """What layer ``li``'s attention adds to the residual stream: ``o_proj`` of the heads
        ``z`` ``[B, n, H, d]``, then the post-attention norm where the family has one."""
        blk = self._blocks[li]
        out = blk.o(z.reshape(*z.shape[:2], self.dims.n_heads * self.dims.d_head))
        return self._norm(blk.post_attn, out, lrp) if blk.post_attn is not None else out

    def add_attn(self, h: Tensor, attn_out: Tensor, li: int | None = None, lrp: LRPRules | None = None) -> Tensor:
        """``resid_mid = resid_pre + attn_out`` (sequential blocks only); post-norm blocks normalise the
        sum with layer ``li``'s attention LayerNorm (under ``lrp``'s norm rule, like every norm)."""
        if self.dims.parallel_residual:
            raise RunnerError(f"{self.family.name} blocks are parallel: there is no resid_mid")
        return self._post_add(li, 0, h + attn_out, lrp)

    def _post_add(self, li: int | None, which: int, x: Tensor, lrp: LRPRules | None = None) -> Tensor:
        """The norm after a residual add in post-norm blocks (``which`` 0: attention, 1: MLP)."""
        if not self.family.post_ln:
            return x
        if li is None:
            raise RunnerError(f"{self.family.name} blocks normalise after the residual add: pass the layer")
        post = self._blocks[li].post_add
        assert post is not None
        return self._norm(post[which], x, lrp)

    # -- the MLP sublayer -----------------------------------------------------------------------

    def mlp_in(self, li: int, h: Tensor, lrp: LRPRules | None = None) -> Tensor:
        """The norm entering layer ``li``'s MLP (of ``resid_mid``; of ``resid_pre`` in parallel blocks;
        none in post-norm blocks)."""
        if self.family.post_ln:
            return h
        return self._norm(self._blocks[li].ln2, h, lrp)

    def mlp_hidden(self, li: int, x: Tensor, lrp: LRPRules | None = None) -> Tensor:
        """The MLP hidden activation ``[B, n, M]``: ``act(gate(x)) · up(x)`` or ``act(up(x))``."""
        fam, mlp = self.family, self._blocks[li].mlp
        up = get_path(mlp, fam.mlp_in)(x)
        if not (fam.gated and fam.mlp_gate is not None):
            return self._identity_rule(up, self.act(up), lrp)
        g_in = getattr(mlp, fam.mlp_gate)(x)
        prod = self._identity_rule(g_in, self.act(g_in), lrp) * up
        if lrp is not None and lrp.gate:
            prod = 0.5 * prod + 0.5 * prod.detach()
        return prod

    def router(self, li: int, x: Tensor) -> Tensor:
        """Router logits ``[B, n, E]`` of a mixture-of-experts MLP (see :mod:`patchtrace.models.moe`)."""
        from patchtrace.models.moe import router_logits

        assert self.family.moe_router is not None
        return router_logits(getattr(self._blocks[li].mlp, self.family.moe_router), x)

    def experts(self, li: int, x: Tensor, router: Tensor, lrp: LRPRules | None = None) -> Tensor:
        """Each expert's weighted output ``[B, n, E, D]``, routed by the (maybe patched) logits."""
        from patchtrace.models.moe import expert_outputs, routing_weights

        if lrp is not None:
            raise RunnerError(f"{self.family.name}: LRP rules for mixture-of-experts MLPs are not implemented")
        assert self.family.moe_experts is not None
        w = routing_weights(router, self.dims.top_k)
        return expert_outputs(getattr(self._blocks[li].mlp, self.family.moe_experts), self.act, x, w)

    def mlp_out(self, li: int, act: Tensor, lrp: LRPRules | None = None) -> Tensor:
        """What layer ``li``'s MLP adds to the residual stream: the down projection of ``act``, then
        the post-feedforward norm where the family has one."""
        blk = self._blocks[li]
        out = get_path(blk.mlp, self.family.mlp_out)(act)
        return self._norm(blk.post_mlp, out, lrp) if blk.post_mlp is not None else out

    def resid_post(
        self, h: Tensor, mlp_out: Tensor, attn_out: Tensor | None = None, li: int | None = None,
        lrp: LRPRules | None = None,
    ) -> Tensor:
        """The residual stream leaving a layer.

        Sequential blocks: ``h`` is ``resid_mid`` and ``attn_out`` must be None. Parallel blocks:
        ``h`` is ``resid_pre`` and both outputs are added, ``(h + attn_out) + mlp_out``. Post-norm
        blocks normalise the sum with layer ``li``'s output LayerNorm.
        """
        if self.dims.parallel_residual:
            if attn_out is None:
                raise RunnerError(f"{self.family.name} blocks are parallel: resid_post needs attn_out")
            return h + attn_out + mlp_out
        if attn_out is not None:
            raise RunnerError(f"{self.family.name} blocks are sequential: pass resid_mid, not attn_out")
        return self._post_add(li, 1, h + mlp_out, lrp)
