"""One SmolLM2 for a whole test session, handed out wherever code calls ``load_model()``.

Documentation tests (docstring examples, the README) call ``load_model()`` the way a reader would.
Loading the bundled model takes seconds each time; :func:`share_model` makes every such call with the
default arguments return the session's instance (the ``smollm2`` fixture of ``conftest.py``), while
any other model or setting still goes to the real loader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import patchtrace
import patchtrace.models.load as load_module

REAL_LOAD_MODEL = load_module.load_model


def shared_loader(model: Any) -> Callable[..., Any]:
    """``load_model`` that returns ``model`` for the bundled model on CPU in float32."""

    def load_model(spec: str = load_module.DEFAULT_MODEL, **kwargs: Any) -> Any:
        default = (
            spec == load_module.DEFAULT_MODEL
            and kwargs.get("dtype", "float32") == "float32"
            and kwargs.get("device", "cpu") in ("cpu", None)
            and not kwargs.get("trust_remote_code")
            and not kwargs.get("revision")
        )
        return model if default else REAL_LOAD_MODEL(spec, **kwargs)

    load_model.__doc__ = REAL_LOAD_MODEL.__doc__
    return load_model


def share_model(monkeypatch: pytest.MonkeyPatch, model: Any) -> Callable[..., Any]:
    """Route ``patchtrace.load_model`` and ``patchtrace.models.load.load_model`` to ``model``;
    returns the replacement (to put into namespaces that imported the real one)."""
    loader = shared_loader(model)
    monkeypatch.setattr(patchtrace, "load_model", loader)
    monkeypatch.setattr(load_module, "load_model", loader)
    return loader
