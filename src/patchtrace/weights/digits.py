"""A small real vision task trained here: scikit-learn's digits (8×8 images), corruptions, a tiny CNN.

Used by the Robust Weight Signatures reproduction (:mod:`patchtrace.weights.rws`). The digits come
with scikit-learn (1,797 images, no download); pixel values are scaled to ``[0, 1]``.

**Corruptions** are plain callables ``fn(images, generator) -> images`` on ``[N, 1, 8, 8]`` tensors
in ``[0, 1]`` (the generator makes random ones reproducible). Four ship, after the families of
CIFAR-10-C at a severity that hurts an 8×8 image about as much as severity 5 hurts a 32×32 one:
``gaussian_noise``, ``blur``, ``contrast``, ``pixelate``; :func:`register_corruption` adds yours::

    register_corruption("invert", lambda x, g: 1 - x)

The **CNN** (:class:`DigitsCNN`) has three conv layers (``conv1``–``conv3``, shallow to deep) and two
linear layers (``fc1``, ``fc2``), no batch norm (so a weight patch is the whole story), ~23k parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchtrace.weights.errors import WeightPatchError

Corruption = Callable[[Tensor, torch.Generator], Tensor]


def gaussian_noise(x: Tensor, g: torch.Generator, sigma: float = 0.35) -> Tensor:
    """Additive Gaussian noise, clipped to [0, 1]."""
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def blur(x: Tensor, g: torch.Generator, sigma: float = 1.0) -> Tensor:
    """Gaussian blur (5×5 kernel, reflect padding)."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k = (k1[:, None] * k1[None, :]) / (k1.sum() ** 2)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k[None, None])


def contrast(x: Tensor, g: torch.Generator, factor: float = 0.2) -> Tensor:
    """Contrast reduced towards each image's mean (``factor`` of the original spread)."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * factor + m).clamp(0, 1)


def pixelate(x: Tensor, g: torch.Generator, block: int = 3) -> Tensor:
    """Block averages (``block``×``block``, ceil-mode), upsampled by nearest neighbour."""
    small = F.avg_pool2d(x, block, ceil_mode=True)
    return F.interpolate(small, scale_factor=block, mode="nearest")[..., : x.shape[-2], : x.shape[-1]]


_CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "blur": blur,
    "contrast": contrast,
    "pixelate": pixelate,
}


def register_corruption(name: str, fn: Corruption, *, replace: bool = False) -> None:
    """Make ``fn(images, generator) -> images`` available under ``name``."""
    if not callable(fn):
        raise WeightPatchError(f"corruption {name!r}: {fn!r} is not callable")
    if name in _CORRUPTIONS and not replace:
        raise WeightPatchError(f"corruption {name!r} is already registered (replace=True to override)")
    _CORRUPTIONS[name] = fn


def corruption(name: str) -> Corruption:
    """The corruption registered as ``name`` (an error listing the known ones otherwise)."""
    if name not in _CORRUPTIONS:
        raise WeightPatchError(f"unknown corruption {name!r}; registered: {', '.join(_CORRUPTIONS)}")
    return _CORRUPTIONS[name]


def corruptions() -> list[str]:
    """Registered corruption names."""
    return list(_CORRUPTIONS)


def corrupt(x: Tensor, name: str, seed: int) -> Tensor:
    """``x`` under corruption ``name`` with a seeded generator (checked: same shape, finite)."""
    out = corruption(name)(x, torch.Generator().manual_seed(seed))
    if not isinstance(out, Tensor) or out.shape != x.shape or not bool(torch.isfinite(out).all()):
        raise WeightPatchError(f"corruption {name!r} must return a finite tensor of shape {tuple(x.shape)}")
    return out


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``[N, 1, 8, 8]`` float32 in [0, 1] and their labels (int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


class DigitsCNN(nn.Module):
    """conv1 → conv2 → pool → conv3 → pool → fc1 → fc2 (widths ``w``, ``2w``, ``2w``; 10 classes)."""

    def __init__(self, w: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.fc1 = nn.Linear(2 * w * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    #: shallow to deep, as tensor-name prefixes
    LAYERS = ("conv1", "conv2", "conv3", "fc1", "fc2")


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy (eval mode, batched)."""
    was = model.training
    model.eval()
    correct = sum(int((model(x[i : i + 512]).argmax(-1) == y[i : i + 512]).sum()) for i in range(0, len(x), 512))
    model.train(was)
    return correct / max(len(x), 1)


__all__ = [
    "Corruption",
    "DigitsCNN",
    "accuracy",
    "blur",
    "contrast",
    "corrupt",
    "corruption",
    "corruptions",
    "gaussian_noise",
    "load_digits_tensors",
    "pixelate",
    "register_corruption",
]
