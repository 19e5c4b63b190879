"""Localization methods: one module per method, one signature, one registry.

Every method is ``run(model, task, sites, config, *, on_progress=None, ...) -> result`` with a frozen,
keyword-only config checked when it is built, and registers itself at the end of its module
(:func:`patchtrace.methods.registry.register_method`). The imports below are the *only* place the
built-in methods are registered from: importing this package makes :func:`list_methods` see them,
and nothing else registers anything as a side effect. Register your own method with
:func:`register_method`; it is then listed by ``patchtrace methods``, compared by
:mod:`~patchtrace.methods.compare` if it estimates exact patching, and covered by the contract suite.

Example:
    >>> from patchtrace.methods import get_method, list_methods
    >>> [m.name for m in list_methods()][:3]
    ['activation_patching', 'atp', 'atp_star']
    >>> get_method("atp").estimates
    'activation_patching'
"""

from __future__ import annotations

# The built-in methods; each module registers itself on import (listed in this order).
from patchtrace.methods import (  # noqa: F401
    activation_patching,
    atp,
    atp_star,
    causal_tracing,
    dbm,
    ig,
    relp,
)
from patchtrace.methods.registry import (
    MethodRegistryError,
    MethodSpec,
    estimators_of,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)
from patchtrace.qa import circuit as _qa_circuit  # noqa: F401  (registers "qa_circuit")

__all__ = [
    "MethodRegistryError",
    "MethodSpec",
    "estimators_of",
    "get_method",
    "list_methods",
    "register_method",
    "unregister_method",
]
