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
from patchtrace.methods.validate import ConfigError, check_bool, check_choice, check_float, check_int

Parametrization = Literal["clamp", "sigmoid", "hard_concrete"]
PARAMETRIZATIONS: tuple[str, ...] = ("clamp", "sigmoid", "hard_concrete")


class DBMError(PatchtraceError, ValueError):
    """A mask request that cannot be honoured (names the site, desideratum or setting)."""


class DBMConfigError(DBMError, ConfigError):
    """A DBM setting of the wrong type or out of range: both a :class:`DBMError` and a
    :class:`~patchtrace.methods.validate.ConfigError`."""


@dataclass(frozen=True, kw_only=True)
class DBMConfig:
    """Settings of mask learning (keyword-only; checked when built).

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
        DBMConfigError: a field of the wrong type or out of range (an unknown parametrization,
            ``lam < 0``, ``steps < 0``, ``lr <= 0``, a threshold outside [0, 1], a train fraction
            outside (0, 1] ...).
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
        try:
            check_float(self, "lam", low=0.0)
            check_int(self, "steps", low=1)
            check_float(self, "lr", low=0.0, open_low=True)
            check_choice(self, "parametrization", PARAMETRIZATIONS)
            check_float(self, "threshold", low=0.0, high=1.0)
            check_float(self, "train_fraction", low=0.0, high=1.0, open_low=True)
            check_int(self, "seed", low=0)
            check_bool(self, "baseline")
            check_int(self, "max_memory", low=1, optional=True)
        except ConfigError as e:
            raise DBMConfigError(str(e)) from None
