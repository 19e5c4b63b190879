"""Tasks: built-in generators and a loader for your own data.

>>> from patchtrace.tasks import make_task
>>> len(make_task("ioi", n=4))
4
"""

from __future__ import annotations

from typing import Any

from patchtrace.tasks.base import Example, Task, TaskError, TokenizedTask
from patchtrace.tasks.factual import factual
from patchtrace.tasks.greater_than import greater_than
from patchtrace.tasks.io import load_task
from patchtrace.tasks.ioi import ioi

#: Built-in task generators: name → one-line description.
BUILTIN_TASKS = {
    "ioi": "indirect-object identification (Mary/John), answer IO vs S",
    "factual": "country → capital recall, corrupted by another country; keeps facts the model knows",
    "greater_than": "years: 'from 1732 to 17' → later years (or tens digits)",
}


def make_task(name: str, n: int = 16, seed: int = 0, model: Any = None) -> Task:
    """Build a task by name, or load it from a ``.jsonl``/``.csv`` path.

    Args:
        name: a built-in name (:data:`BUILTIN_TASKS`; extended by other modules, e.g.
            ``variable_binding``) or a file path.
        n: number of examples.
        seed: RNG seed.
        model: for generators that filter on what the model knows or adapt to its tokenizer.

    Raises:
        TaskError: unknown name (lists the built-ins) or unreadable file.
    """
    if name == "ioi":
        return ioi(n, seed)
    if name == "factual":
        return factual(n, seed, model=model)
    if name in ("greater_than", "greater-than"):
        return greater_than(n, seed, tokenizer=getattr(model, "tokenizer", None))
    if name.endswith((".jsonl", ".json", ".csv")):
        return load_task(name)
    extra = _extra_tasks()
    key = name.replace("-", "_")
    if key in extra:
        return extra[key](n=n, seed=seed, model=model)
    raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join(list(BUILTIN_TASKS) + sorted(extra))}, or a .jsonl/.csv file")


def _extra_tasks() -> dict[str, Any]:
    """Generators contributed by other subpackages, imported lazily."""
    out: dict[str, Any] = {}
    try:
        from patchtrace.tasks.variable_binding import variable_binding_task

        out["variable_binding"] = variable_binding_task
    except ImportError:
        pass
    try:
        from patchtrace.tasks.extractive_qa import qa_patching_task

        out["extractive_qa"] = qa_patching_task
    except ImportError:
        pass
    return out


__all__ = [
    "BUILTIN_TASKS",
    "Example",
    "Task",
    "TaskError",
    "TokenizedTask",
    "factual",
    "greater_than",
    "ioi",
    "load_task",
    "make_task",
]
