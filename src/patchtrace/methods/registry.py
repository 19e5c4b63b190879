"""The method registry: every localization method under one name, one signature, one contract.

A method is a module with a frozen, keyword-only config dataclass and a function

    run(model, task, sites, config, *, on_progress=None, ...) -> result

(``config=None`` means the defaults; extra options are keyword-only after ``*``; ``on_progress``
follows :mod:`patchtrace.progress`). The module ends with one :func:`register_method` call that
records a :class:`MethodSpec`: the name, config class, run function, result type, a one-line
description, whether it is a sweep (one patched forward per cell) and, for tests, a fast config and a
small task that fit a tiny random model.

Everything that handles "any method" reads this table instead of naming methods: ``patchtrace
methods`` lists it, :mod:`patchtrace.methods.compare` takes every method that ``estimates`` exact
activation patching, and one contract suite (``tests/methods/test_contract.py``) runs every
registered method against the same invariants — grid and labels, baselines against a plain forward,
bit-exact save/load, determinism, the model left untouched, configs refused when invalid. So a method
registered tomorrow is listed, compared and tested on the day it is registered, with no other edit.
(The shape is peft's ``PEFT_TYPE_TO_CONFIG_MAPPING`` plus its test matrix.)

The built-in methods are registered when :mod:`patchtrace.methods` is imported (its ``__init__``
imports each built-in module explicitly); nothing else registers anything as a side effect.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True, kw_only=True)
    ... class NoopConfig:
    ...     pass
    >>> def noop(model, task, sites, config=None, *, on_progress=None):
    ...     return None
    >>> spec = register_method("noop_example", NoopConfig, noop, result=type(None),
    ...                        description="does nothing", sweep=False,
    ...                        tiny_config=NoopConfig, tiny_inputs=lambda m: (None, None))
    >>> get_method("noop_example").description
    'does nothing'
    >>> unregister_method("noop_example")
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from patchtrace.errors import PatchtraceError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_POSITIONAL = ("model", "task", "sites", "config")


class MethodRegistryError(PatchtraceError, ValueError):
    """An unknown method name (the message lists the registered ones), or a registration that breaks
    the method contract (names what is wrong)."""


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: the registry name (lower case, ``_``-separated), e.g. ``atp_star``.
        config: the config class; ``config()`` gives the defaults.
        run: ``run(model, task, sites, config, *, on_progress=None, ...)``.
        result: the type ``run`` returns (it has ``save(path)`` and a classmethod ``load(path)``).
        description: one line for listings.
        sweep: True when the method runs one patched forward per cell (cost grows with the grid);
            False for methods with a fixed number of passes (gradient estimators, mask training).
        tiny_config: a fast config for tests on tiny random models.
        tiny_inputs: ``tiny_inputs(model) -> (task, sites)``, a small task and grid that suit the
            method on a tiny model with the SmolLM2 tokenizer.
        estimates: the name of the method whose result this one estimates on the same grid (the
            gradient estimators estimate ``activation_patching``); None otherwise.
        run_many: optional ``run_many(model, task, [sites, ...], config)`` that scores several grids
            sharing passes (used by :mod:`patchtrace.methods.compare`).
        plain_baselines: the result's baselines that are the metric of a plain forward of the task's
            prompts (``clean`` = clean prompt, ``corrupt`` = corrupt prompt); the contract suite
            recomputes them with the Hugging Face model.
        invalid_configs: keyword sets the config must refuse (each raises a
            :class:`~patchtrace.errors.PatchtraceError`).
    """

    name: str
    config: type[Any]
    run: Callable[..., Any]
    result: type[Any]
    description: str
    sweep: bool
    tiny_config: Callable[[], Any]
    tiny_inputs: Callable[[Any], tuple[Any, Any]]
    estimates: str | None = None
    run_many: Callable[..., list[Any]] | None = None
    plain_baselines: tuple[str, ...] = ()
    invalid_configs: tuple[Mapping[str, Any], ...] = ()


_REGISTRY: dict[str, MethodSpec] = {}


def _check_config(name: str, config: type[Any]) -> None:
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise MethodRegistryError(f"method {name!r}: config {config!r} is not a dataclass")
    params = getattr(config, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise MethodRegistryError(f"method {name!r}: {config.__name__} must be @dataclass(frozen=True, kw_only=True)")
    positional = [f.name for f in dataclasses.fields(config) if not f.kw_only]
    if positional:
        raise MethodRegistryError(f"method {name!r}: {config.__name__} fields {positional} are not keyword-only")


def _check_run(name: str, run: Callable[..., Any]) -> None:
    params = list(inspect.signature(run).parameters.values())
    head = [p.name for p in params[:4]]
    kinds_ok = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:4])
    if tuple(head) != _POSITIONAL or not kinds_ok:
        raise MethodRegistryError(f"method {name!r}: run must start with (model, task, sites, config), got ({', '.join(head)})")
    rest = [p for p in params[4:] if p.kind is not p.KEYWORD_ONLY and p.kind is not p.VAR_KEYWORD]
    if rest:
        raise MethodRegistryError(f"method {name!r}: run's extra parameters must be keyword-only (after *): {rest[0].name}")
    if "on_progress" not in {p.name for p in params}:
        raise MethodRegistryError(f"method {name!r}: run must accept the keyword on_progress (see patchtrace.progress)")


def register_method(
    name: str,
    config: type[Any],
    run: Callable[..., Any],
    *,
    result: type[Any],
    description: str,
    sweep: bool,
    tiny_config: Callable[[], Any],
    tiny_inputs: Callable[[Any], tuple[Any, Any]],
    estimates: str | None = None,
    run_many: Callable[..., list[Any]] | None = None,
    plain_baselines: tuple[str, ...] = (),
    invalid_configs: tuple[Mapping[str, Any], ...] = (),
    replace: bool = False,
) -> MethodSpec:
    """Register a method under ``name`` (see :class:`MethodSpec` for the arguments).

    Re-importing the module that registered a name registers it again without complaint; any other
    second registration of a name needs ``replace=True``.

    Raises:
        MethodRegistryError: a malformed name, a name already taken, a config that is not a frozen
            keyword-only dataclass, a ``run`` without the ``(model, task, sites, config, *,
            on_progress)`` signature, or an estimator whose config lacks ``direction``/``metric``.
    """
    if not _NAME.match(name):
        raise MethodRegistryError(f"method name {name!r}: use lower-case letters, digits and '_'")
    old = _REGISTRY.get(name)
    same_origin = old is not None and (old.run.__module__, old.run.__qualname__) == (run.__module__, run.__qualname__)
    if old is not None and not (replace or same_origin):
        raise MethodRegistryError(f"method {name!r} is already registered (by {old.run.__module__}); pass replace=True")
    _check_config(name, config)
    _check_run(name, run)
    if estimates is not None:
        names = {f.name for f in dataclasses.fields(config)}
        if not {"direction", "metric"} <= names:
            raise MethodRegistryError(f"method {name!r} estimates {estimates!r}: its config needs direction and metric")
    spec = MethodSpec(
        name=name, config=config, run=run, result=result, description=description, sweep=sweep,
        tiny_config=tiny_config, tiny_inputs=tiny_inputs, estimates=estimates, run_many=run_many,
        plain_baselines=tuple(plain_baselines), invalid_configs=tuple(invalid_configs),
    )
    _REGISTRY[name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (for tests and notebooks).

    Raises:
        MethodRegistryError: ``name`` is not registered.
    """
    get_method(name)
    del _REGISTRY[name]


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name``.

    Raises:
        MethodRegistryError: an unknown name (the message lists the registered ones).
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise MethodRegistryError(f"unknown method {name!r}; registered methods: {', '.join(_REGISTRY) or '(none)'}")
    return spec


def list_methods() -> list[MethodSpec]:
    """Every registered method, in registration order (built-ins first)."""
    return list(_REGISTRY.values())


def estimators_of(reference: str) -> list[MethodSpec]:
    """The registered methods whose result estimates ``reference``'s on the same grid."""
    return [s for s in _REGISTRY.values() if s.estimates == reference]


__all__ = [
    "MethodRegistryError",
    "MethodSpec",
    "estimators_of",
    "get_method",
    "list_methods",
    "register_method",
    "unregister_method",
]
