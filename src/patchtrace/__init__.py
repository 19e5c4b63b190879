"""patchtrace: find where in a neural network a behaviour is computed, then use that location.

The public API in one screen::

    from patchtrace import load_model, make_task, SiteSpec, activation_patching

    model = load_model()                                  # bundled SmolLM2-135M-Instruct
    task = make_task("ioi", n=16)                         # clean / corrupt / answer / wrong
    scores = activation_patching(model, task, SiteSpec("head", per_unit=True, positions="last"))
    scores.top_k(5)                                       # [(Site(kind='head', layer=23, unit=3, pos=-1), 4.23...), ...]
    scores.save("runs/ioi-heads")                         # safetensors + JSON, no pickle
    [m.name for m in list_methods()]                      # every method: run(model, task, sites, config)

Importing patchtrace has no side effects: nothing is loaded, downloaded or patched until called.
"""

from __future__ import annotations

__version__ = "0.1.0"

from patchtrace.desiderata import Desideratum, Triple, load_desiderata
from patchtrace.errors import PatchtraceError, PatchtraceWarning
from patchtrace.methods.activation_patching import PatchingConfig
from patchtrace.methods.activation_patching import run as activation_patching
from patchtrace.methods.atp import AtPConfig
from patchtrace.methods.atp import run as attribution_patching
from patchtrace.methods.atp_star import AtPStarConfig
from patchtrace.methods.atp_star import run as attribution_patching_star
from patchtrace.methods.causal_tracing import TracingConfig
from patchtrace.methods.causal_tracing import run as causal_tracing
from patchtrace.methods.compare import CompareConfig, CompareResult
from patchtrace.methods.compare import run as compare_methods
from patchtrace.methods.dbm import DBMConfig
from patchtrace.methods.dbm import run as desiderata_masking
from patchtrace.methods.ig import IGConfig
from patchtrace.methods.ig import run as integrated_gradients
from patchtrace.methods.registry import MethodSpec, get_method, list_methods, register_method
from patchtrace.methods.relp import RelPConfig
from patchtrace.methods.relp import run as relevance_patching
from patchtrace.methods.validate import ConfigError
from patchtrace.metrics import Metric
from patchtrace.models.adapters import UnsupportedModelError, supported_model_types
from patchtrace.models.load import DEFAULT_MODEL, Model, ModelLoadError, load_model, wrap_model
from patchtrace.progress import Progress
from patchtrace.qa.attnattrib import AttnAttribConfig
from patchtrace.qa.attnattrib import attribute as qa_attribute
from patchtrace.qa.circuit import QACircuitConfig
from patchtrace.qa.circuit import run as qa_circuit
from patchtrace.qa.generation import GenerationError
from patchtrace.qa.steering import SteeringConfig
from patchtrace.qa.steering import steer as qa_steer
from patchtrace.results import Scores
from patchtrace.sites import Site, SiteError, SiteSpec, parse_site
from patchtrace.tasks import BUILTIN_TASKS, Example, Task, TaskError, load_task, make_task

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_MODEL",
    "AtPConfig",
    "AtPStarConfig",
    "AttnAttribConfig",
    "CompareConfig",
    "CompareResult",
    "ConfigError",
    "DBMConfig",
    "Desideratum",
    "Example",
    "GenerationError",
    "IGConfig",
    "MethodSpec",
    "Metric",
    "Model",
    "ModelLoadError",
    "PatchingConfig",
    "PatchtraceError",
    "PatchtraceWarning",
    "Progress",
    "QACircuitConfig",
    "RelPConfig",
    "Scores",
    "Site",
    "SiteError",
    "SiteSpec",
    "SteeringConfig",
    "Task",
    "TaskError",
    "TracingConfig",
    "Triple",
    "UnsupportedModelError",
    "__version__",
    "activation_patching",
    "attribution_patching",
    "attribution_patching_star",
    "causal_tracing",
    "compare_methods",
    "desiderata_masking",
    "get_method",
    "integrated_gradients",
    "list_methods",
    "load_desiderata",
    "load_model",
    "load_task",
    "make_task",
    "parse_site",
    "qa_attribute",
    "qa_circuit",
    "qa_steer",
    "register_method",
    "relevance_patching",
    "supported_model_types",
    "wrap_model",
]
