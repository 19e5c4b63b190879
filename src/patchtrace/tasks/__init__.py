"""Tasks: built-in generators, the registry that names them, and a loader for your own data.

A *task generator* is a function ``(n, seed, model) -> Task``; the model (optional) lets a generator
keep only what the model gets right (:mod:`patchtrace.tasks.filtering`) or adapt to its tokenizer.
Generators are looked up by name in one explicit registry: the built-ins are entered below, and
:func:`register_task` adds your own. :func:`make_task` reads the registry (``-`` and ``_`` in a name
are the same: ``variable-binding`` is ``variable_binding``) or loads a ``.jsonl``/``.csv`` file;
``patchtrace tasks`` lists :func:`task_generators`. Nothing is imported conditionally: a generator
that fails to import fails loudly.

>>> from patchtrace.tasks import make_task
>>> len(make_task("ioi", n=4))
4
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchtrace.tasks.base import Example, Task, TaskError, TokenizedTask
from patchtrace.tasks.factual import factual
from patchtrace.tasks.greater_than import greater_than
from patchtrace.tasks.io import load_task
from patchtrace.tasks.ioi import ioi
from patchtrace.tasks.variable_binding import VariableBindingTask, variable_binding_task

if TYPE_CHECKING:
    from patchtrace.models.load import Model

#: ``build(n, seed, model) -> Task``.
Builder = Callable[[int, int, "Model | None"], Task]


@dataclass(frozen=True)
class TaskGenerator:
    """One registry entry.

    Attributes:
        name: the registered name (underscores; ``make_task`` also accepts dashes).
        build: ``build(n, seed, model) -> Task``.
        description: one line for ``patchtrace tasks``.
    """

    name: str
    build: Builder
    description: str


_REGISTRY: dict[str, TaskGenerator] = {}


def _key(name: str) -> str:
    return name.strip().replace("-", "_")


def register_task(name: str, build: Builder, description: str, *, replace: bool = False) -> TaskGenerator:
    """Register a task generator under ``name``.

    Example:
        >>> from patchtrace.tasks import Example, Task, register_task
        >>> _ = register_task("toy", lambda n, seed, model: Task("toy", [Example("A B", "A C", " x", " y")] * n),
        ...                   "a toy task", replace=True)
        >>> len(make_task("toy", n=2))
        2

    Raises:
        TaskError: the name is taken (pass ``replace=True`` to replace it) or empty.
    """
    key = _key(name)
    if not key:
        raise TaskError("a task generator needs a name")
    if key in _REGISTRY and not replace:
        raise TaskError(f"task {key!r} is already registered; pass replace=True to replace it")
    entry = TaskGenerator(key, build, description)
    _REGISTRY[key] = entry
    return entry


def task_generators() -> list[TaskGenerator]:
    """Every registered generator, built-ins first, in registration order."""
    return list(_REGISTRY.values())


def make_task(name: str, n: int = 16, seed: int = 0, model: Model | None = None) -> Task:
    """Build a task by registered name, or load it from a ``.jsonl``/``.csv`` path.

    Args:
        name: a registered name (:func:`task_generators`) or a file path.
        n: number of examples.
        seed: RNG seed.
        model: for generators that filter on what the model knows or adapt to its tokenizer.

    Raises:
        TaskError: unknown name (lists the registered ones) or unreadable file.
    """
    if name.endswith((".jsonl", ".json", ".csv")):
        return load_task(name)
    entry = _REGISTRY.get(_key(name))
    if entry is None:
        raise TaskError(f"unknown task {name!r}; registered tasks: {', '.join(_REGISTRY)}, or a .jsonl/.csv file")
    return entry.build(n, seed, model)


# -- the built-ins ------------------------------------------------------------------------------------


def _greater_than(n: int, seed: int, model: Model | None) -> Task:
    return greater_than(n, seed, tokenizer=model.tokenizer if model is not None else None)


def _extractive_qa(n: int, seed: int, model: Model | None) -> Task:
    # Imported here, not at the top: patchtrace.qa builds on patchtrace.tasks (Task, Example, the
    # capitals), so a top-level import would be circular. An ImportError still propagates.
    from patchtrace.qa.patching import qa_patching_task

    return qa_patching_task(n, seed, model)


register_task("ioi", lambda n, seed, model: ioi(n, seed), "indirect-object identification (Mary/John), answer IO vs S")
register_task("factual", lambda n, seed, model: factual(n, seed, model=model),
              "country → capital recall, corrupted by another country; keeps facts the model knows")
register_task("greater_than", _greater_than, "years: 'from 1732 to 17' → later years (or tens digits)")
register_task("variable_binding", lambda n, seed, model: variable_binding_task(n, seed, model),
              "print the value a query variable is bound to (two DBM desiderata); keeps items the model solves")
register_task("extractive_qa", _extractive_qa,
              "QA conflict: counterfactual context vs the same prompt with the answer sentence swapped out")

#: Built-in task names → descriptions (a snapshot; :func:`task_generators` includes registered ones).
BUILTIN_TASKS: dict[str, str] = {g.name: g.description for g in task_generators()}


__all__ = [
    "BUILTIN_TASKS",
    "Example",
    "Task",
    "TaskError",
    "TaskGenerator",
    "TokenizedTask",
    "VariableBindingTask",
    "factual",
    "greater_than",
    "ioi",
    "load_task",
    "make_task",
    "register_task",
    "task_generators",
]
