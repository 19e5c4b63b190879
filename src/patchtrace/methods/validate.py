"""Checks every method config runs in ``__post_init__``, and the one error they raise.

A method's settings are a frozen, keyword-only dataclass. Settings are checked when the config is
*built*, not when the method runs: ``PatchingConfig(direction="sideways")`` fails on that line,
naming the field and the value, before a model is loaded or an hour of compute is spent — and a
config that exists is a config that is valid, so the code that reads it never re-checks.

Each helper reads one field of the config and raises :class:`ConfigError` with the message
``<Config>.<field>: <value> ...`` saying what is allowed. Types are checked too (``True`` is not a
count, ``"3"`` is not a number), so every field is validated, not only the ones with a range.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True, kw_only=True)
    ... class MyConfig:
    ...     steps: int = 5
    ...     def __post_init__(self) -> None:
    ...         check_int(self, "steps", low=1)
    >>> MyConfig(steps=0)
    Traceback (most recent call last):
    ...
    patchtrace.methods.validate.ConfigError: MyConfig.steps: 0 is below the minimum 1
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from patchtrace.errors import PatchtraceError
from patchtrace.metrics import METRICS, MetricError

#: The two patching directions: restore clean activations into the corrupt run, or the reverse.
DIRECTIONS = ("denoise", "noise")


class ConfigError(PatchtraceError, ValueError):
    """A method setting of the wrong type or out of range (the message names config, field and value)."""


class MetricConfigError(ConfigError, MetricError):
    """An unknown metric name in a config: both a :class:`ConfigError` and a
    :class:`~patchtrace.metrics.MetricError`, so code catching either sees it."""


def _where(cfg: Any, name: str) -> str:
    return f"{type(cfg).__name__}.{name}"


def check_choice(cfg: Any, name: str, choices: Iterable[str]) -> None:
    """``cfg.<name>`` must be one of ``choices`` (strings)."""
    value = getattr(cfg, name)
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{_where(cfg, name)}: {value!r} is not one of {', '.join(options)}")


def check_direction(cfg: Any, name: str = "direction") -> None:
    """``denoise`` or ``noise``."""
    check_choice(cfg, name, DIRECTIONS)


def check_metric(cfg: Any, name: str = "metric") -> None:
    """A metric name from :data:`patchtrace.metrics.METRICS` (raises :class:`MetricConfigError`)."""
    try:
        check_choice(cfg, name, METRICS)
    except ConfigError as e:
        raise MetricConfigError(str(e)) from None


def check_bool(cfg: Any, name: str) -> None:
    """``True`` or ``False`` (not 0/1, not a string)."""
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(cfg, name)}: {value!r} is not a bool")


def check_int(cfg: Any, name: str, *, low: int | None = None, optional: bool = False) -> None:
    """An ``int`` (not a bool) ``≥ low``; ``None`` too when ``optional``."""
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_where(cfg, name)}: {value!r} is not an integer" + (" or None" if optional else ""))
    if low is not None and value < low:
        raise ConfigError(f"{_where(cfg, name)}: {value!r} is below the minimum {low}")


def check_float(
    cfg: Any, name: str, *, low: float | None = None, high: float | None = None, open_low: bool = False,
    open_high: bool = False,
) -> None:
    """A finite real number in ``[low, high]`` (``(low`` / ``high)`` when open); ints are accepted."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{_where(cfg, name)}: {value!r} is not a finite number")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        rng = f"{'(' if open_low else '['}{lo}, {hi}{')' if open_high else ']'}"
        raise ConfigError(f"{_where(cfg, name)}: {value!r} is outside {rng}")


def check_instance(cfg: Any, name: str, cls: type | tuple[type, ...]) -> None:
    """An instance of ``cls``."""
    value = getattr(cfg, name)
    if not isinstance(value, cls):
        want = cls.__name__ if isinstance(cls, type) else " or ".join(c.__name__ for c in cls)
        raise ConfigError(f"{_where(cfg, name)}: {value!r} is not a {want}")


__all__ = [
    "DIRECTIONS",
    "ConfigError",
    "MetricConfigError",
    "check_bool",
    "check_choice",
    "check_direction",
    "check_float",
    "check_instance",
    "check_int",
    "check_metric",
]
