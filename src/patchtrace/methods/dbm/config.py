"""DBM's settings and its error type.

Every knob of mask learning and evaluation is one field of the frozen :class:`DBMConfig`, checked
when it is built, so a bad setting fails before any model is touched. The config is stored in the
result's provenance (:class:`~patchtrace.methods.dbm.result.Mask`), which is how a saved mask says
how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from patchtrace.errors import PatchtraceError

Parametrization = Literal["clamp", "sigmoid", "hard_concrete"]
PARAMETRIZATIONS: tuple[str, ...] = ("clamp", "sigmoid", "hard_concrete")


class DBMError(PatchtraceError, ValueError):
    """A mask request that cannot be honoured (names the site, desideratum or setting)."""


@dataclass(frozen=True)
class DBMConfig:
    """Settings of mask learning.

    Attributes:
        lam: sparsity strength λ.
        steps: Adam iterations (the paper: 100).
        lr: Adam learning rate (the paper: 1e-2).
        parametrization: ``clamp`` (the paper's), ``sigmoid`` or ``hard_concrete``
            (see :mod:`patchtrace.methods.dbm.train`).
        threshold: a component is kept when its mask exceeds this.
        train_fraction: share of each desideratum's tuples used for training; the rest is held out.
        seed: seed of the split and of hard-concrete noise.
        baseline: also rank components by exact activation patching and evaluate the top-k at equal k.
        max_memory: working-memory budget (bytes) of the evaluation sweeps.

    Example:
        >>> DBMConfig(lam=0.05).steps
        100

    Raises:
        DBMError: an unknown parametrization, or ``lam < 0``, ``steps < 0`` or ``lr <= 0``.
    """

    lam: float = 0.1
    steps: int = 100
    lr: float = 1e-2
    parametrization: Parametrization = "clamp"
    threshold: float = 0.5
    train_fraction: float = 0.5
    seed: int = 0
    baseline: bool = True
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if self.parametrization not in PARAMETRIZATIONS:
            raise DBMError(f"unknown parametrization {self.parametrization!r}; use clamp, sigmoid or hard_concrete")
        if self.lam < 0 or self.steps < 0 or self.lr <= 0:
            raise DBMError(f"need lam ≥ 0, steps ≥ 0, lr > 0 (got {self.lam}, {self.steps}, {self.lr})")
