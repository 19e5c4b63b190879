"""Quantizing a weight delta to ``n`` levels: the linear, log and tanh schemes of RWS.

Robust Weight Signatures (Cai et al. 2023, ``tools.py`` of VITA-Group/Robust_Weight_Signatures)
store each signature tensor as codes on a small grid, per tensor:

* **linear**: ``n`` evenly spaced values between the tensor's min and max;
  ``code = round((v − lo)/(hi − lo)·(n − 1))``. Error ≤ ``(hi − lo)/(2(n − 1))``.
* **log**: sign and magnitude, the magnitude on an even grid of ``log2|v|`` (relative precision,
  good for heavy-tailed deltas). Here ``n`` counts every code: exact zero plus ``m = (n − 1)//2``
  magnitudes per sign (the reference code maps 0 to ``log2 0 = −inf``; we keep zeros exact), so
  ``n ≥ 3``. Error: ``|log2|q| − log2|v|| ≤ (log-range)/(2(m − 1))``, sign and zeros exact.
* **tanh**: the linear grid on ``tanh(v)``, mapped back with ``atanh``: finer near 0, coarser in
  the tails. Error ≤ ``(tanh-range)/(2(n − 1))`` measured in ``tanh`` space.

Codes are bit-packed at ``ceil(log2 n)`` bits each, so :attr:`QTensor.nbytes` is what the file
really holds (plus two floats of range per tensor). Dequantization is deterministic (float64 math,
rounded once to float32), so a saved and reloaded patch has the very same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from patchtrace.weights.errors import WeightPatchError

Scheme = Literal["linear", "log", "tanh"]
SCHEMES: tuple[str, ...] = ("linear", "log", "tanh")


@dataclass(frozen=True)
class QTensor:
    """One quantized tensor: integer codes, the scheme, the level count and the per-tensor range."""

    codes: Tensor  # int64, flat
    shape: tuple[int, ...]
    scheme: str
    levels: int
    lo: float
    hi: float

    @property
    def bits(self) -> int:
        """Bits per code (``ceil(log2 levels)``, at least 1)."""
        return max(1, math.ceil(math.log2(self.levels)))

    @property
    def nbytes(self) -> int:
        """Packed size: the codes at :attr:`bits` bits each, plus the range (two float64)."""
        return math.ceil(self.codes.numel() * self.bits / 8) + 16

    def dequantize(self) -> Tensor:
        """The float32 values the codes stand for."""
        return _DEQ[self.scheme](self).reshape(self.shape)


def check_levels(scheme: str, levels: int) -> None:
    """Refuse an unknown scheme or too few levels (naming both)."""
    if scheme not in SCHEMES:
        raise WeightPatchError(f"quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
        raise WeightPatchError(f"quantization levels {levels!r}: need an integer ≥ 2")
    if scheme == "log" and levels < 3:
        raise WeightPatchError(f"quantization levels {levels} with scheme 'log': need ≥ 3 (zero and one magnitude per sign)")
    if levels > 65536:
        raise WeightPatchError(f"quantization levels {levels}: at most 65536 (16-bit codes)")


def _grid(x: Tensor, n: int) -> tuple[Tensor, float, float]:
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    if hi == lo:
        return torch.zeros_like(x, dtype=torch.int64), lo, hi
    codes = torch.round((x - lo) / (hi - lo) * (n - 1)).clamp_(0, n - 1).to(torch.int64)
    return codes, lo, hi


def _ungrid(codes: Tensor, n: int, lo: float, hi: float) -> Tensor:
    if hi == lo or n == 1:
        return torch.full(codes.shape, (lo + hi) / 2, dtype=torch.float64)
    return lo + codes.to(torch.float64) / (n - 1) * (hi - lo)


def quantize(v: Tensor, scheme: str, levels: int) -> QTensor:
    """Quantize one tensor (see the module docstring for the schemes and their error bounds)."""
    check_levels(scheme, levels)
    x = v.detach().to("cpu", torch.float64).reshape(-1)
    shape = tuple(int(s) for s in v.shape)
    if scheme == "linear":
        codes, lo, hi = _grid(x, levels)
    elif scheme == "tanh":
        codes, lo, hi = _grid(torch.tanh(x), levels)
    else:
        m = (levels - 1) // 2
        nz = x != 0
        mags = torch.log2(x[nz].abs())
        k, lo, hi = _grid(mags, m)
        codes = torch.zeros_like(x, dtype=torch.int64)
        codes[nz] = torch.where(x[nz] > 0, k + 1, k + 1 + m)
    return QTensor(codes, shape, scheme, levels, lo, hi)


def _deq_linear(q: QTensor) -> Tensor:
    return _ungrid(q.codes, q.levels, q.lo, q.hi).to(torch.float32)


def _deq_tanh(q: QTensor) -> Tensor:
    t = _ungrid(q.codes, q.levels, q.lo, q.hi).clamp(-1 + 1e-15, 1 - 1e-15)
    return torch.atanh(t).to(torch.float32)


def _deq_log(q: QTensor) -> Tensor:
    m = (q.levels - 1) // 2
    c = q.codes
    out = torch.zeros(c.shape, dtype=torch.float64)
    pos, neg = (c >= 1) & (c <= m), c > m
    out[pos] = torch.exp2(_ungrid(c[pos] - 1, m, q.lo, q.hi))
    out[neg] = -torch.exp2(_ungrid(c[neg] - 1 - m, m, q.lo, q.hi))
    return out.to(torch.float32)


_DEQ = {"linear": _deq_linear, "log": _deq_log, "tanh": _deq_tanh}


def pack(codes: Tensor, bits: int) -> Tensor:
    """Codes (each < 2**bits ≤ 65536) as a uint8 tensor of ``ceil(numel·bits/8)`` bytes."""
    c = codes.to(torch.int64).numpy().astype(">u2")
    allbits = np.unpackbits(c.view(np.uint8).reshape(-1, 2), axis=1)[:, 16 - bits :]
    return torch.from_numpy(np.packbits(allbits.reshape(-1)).copy())


def unpack(data: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack`: ``count`` codes of ``bits`` bits (int64)."""
    raw = np.unpackbits(data.numpy().astype(np.uint8))[: count * bits].reshape(count, bits)
    full = np.zeros((count, 16), dtype=np.uint8)
    full[:, 16 - bits :] = raw
    vals = np.packbits(full, axis=1).view(">u2").reshape(-1).astype(np.int64)
    return torch.from_numpy(vals)


__all__ = ["SCHEMES", "QTensor", "Scheme", "check_levels", "pack", "quantize", "unpack"]
