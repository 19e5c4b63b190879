"""Causal attention over this call's positions and a cached prefix, with an optional sliding window.

Two ways to compute the same numbers. Without a cached prefix and without anyone needing the
pattern, PyTorch's fused ``scaled_dot_product_attention`` is used (fastest, and what the Hugging Face
forward uses, so the two agree to rounding). Otherwise the scores are formed explicitly: queries of
positions ``p..p+n-1`` against the cached keys of positions ``0..p-1`` and against this call's own
keys, so that the sweep engine can recompute only a suffix of the prompt and share the prefix.

The mask is written in absolute positions: query ``i`` sees key ``j`` iff ``j ≤ i`` and, for a
sliding-window layer of window ``w``, ``j > i − w`` (``w`` positions including itself). That is the
rule transformers' ``sliding_window_overlay`` applies, so local layers (Mistral, Qwen2, Gemma 3)
are exact at any sequence length, also when a call resumes after a cached prefix. Encoders (BERT,
RoBERTa) pass ``causal=False``: every query sees every key (no window).

Grouped-query attention is computed grouped (``rep`` query heads per KV head share one matmul) and
the prefix is shared by rows: row ``r`` of a batch of ``B`` attends to prefix row ``r % Bp``, folded
into the query axis of one matmul rather than copied per row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] → [−x2, x1]`` on the last axis (the rotary pairing transformers uses)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on ``x`` ``[B, n, H, d]``; partial rotary when ``cos`` is narrower than ``d``."""
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


def visible(p: int, n: int, window: int | None, device: torch.device, causal: bool = True) -> Tensor:
    """``[n, p + n]`` booleans: which keys (absolute ``0..p+n-1``) each query ``p..p+n-1`` sees."""
    qi = torch.arange(p, p + n, device=device)[:, None]
    kj = torch.arange(p + n, device=device)[None, :]
    mask = kj <= qi if causal else torch.ones(n, p + n, dtype=torch.bool, device=device)
    if window is not None:
        mask = mask & (kj > qi - window)
    return mask


def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None, *, causal: bool = True) -> Tensor:
    """``q`` ``[B, H, n, d]`` over ``k``, ``v`` ``[B, K, n, d]`` (no prefix) with the fused kernel."""
    rep = q.shape[1] // k.shape[1]
    kr = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    vr = v.repeat_interleave(rep, dim=1) if rep > 1 else v
    n = q.shape[2]
    if window is None:
        return F.scaled_dot_product_attention(q, kr, vr, is_causal=causal and n > 1, scale=scale)
    return F.scaled_dot_product_attention(q, kr, vr, attn_mask=visible(0, n, window, q.device, causal), scale=scale)


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix: tuple[Tensor, Tensor] | None,
    scale: float,
    window: int | None,
    *,
    freeze_pattern: bool = False,
    on_pattern: Callable[[Tensor], Tensor] | None = None,
    causal: bool = True,
) -> Tensor:
    """Attention with the pattern formed explicitly.

    Args:
        q: queries ``[B, H, n, d]`` of positions ``p..p+n-1``.
        k, v: this call's keys/values ``[B, K, n, d]``.
        prefix: cached ``(pk, pv)`` ``[Bp, K, p, d]`` of positions ``0..p-1`` (``B % Bp == 0``).
        scale: factor on ``q·k``.
        window: sliding window of this layer (None: global).
        freeze_pattern: detach the pattern (LRP's attention rule).
        on_pattern: called with the pattern ``[B, H, n, p + n]``; returns the pattern to use.
        causal: False for bidirectional (encoder) attention: every key is visible.

    Returns:
        the per-head outputs ``[B, H, n, d]``.
    """
    B, H, n, d = q.shape
    K = k.shape[1]
    rep = H // K
    p = 0 if prefix is None else prefix[0].shape[2]
    qg = q.reshape(B, K, rep * n, d)
    s_new = torch.matmul(qg, k.transpose(2, 3)).view(B, H, n, n) * scale
    R = Bp = 1
    if prefix is not None and p > 0:
        pk, pv = prefix
        Bp = pk.shape[0]
        R = B // Bp
        # rows r = i * Bp + j share prefix row j: fold i into the query axis of one matmul
        qp = q.reshape(R, Bp, K, rep, n, d).permute(1, 2, 0, 3, 4, 5).reshape(Bp, K, R * rep * n, d)
        s_pre = torch.matmul(qp, pk.transpose(2, 3)) * scale  # [Bp, K, R*rep*n, p]
        s_pre = s_pre.view(Bp, K, R, rep, n, p).permute(2, 0, 1, 3, 4, 5).reshape(B, H, n, p)
        scores = torch.cat((s_pre, s_new), dim=-1)
    else:
        scores = s_new
    scores = scores.masked_fill(~visible(p, n, window, q.device, causal), torch.finfo(scores.dtype).min)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if freeze_pattern:
        pattern = pattern.detach()
    if on_pattern is not None:
        pattern = on_pattern(pattern)
    out = torch.matmul(pattern[..., p:].reshape(B, K, rep * n, n), v).view(B, H, n, d)
    if prefix is not None and p > 0:
        pv = prefix[1]
        pp = pattern[..., :p].reshape(R, Bp, K, rep, n, p).permute(1, 2, 0, 3, 4, 5).reshape(Bp, K, R * rep * n, p)
        o_pre = torch.matmul(pp, pv).view(Bp, K, R, rep, n, d).permute(2, 0, 1, 3, 4, 5).reshape(B, H, n, d)
        out = out + o_pre
    return out
