"""What DBM learns from: desiderata, however they are given.

DBM needs desiderata (:mod:`patchtrace.desiderata`): named sets of ``(original, alternate, target)``
tuples. :func:`as_desiderata` turns what a caller has into a list of them, by type:

* a :class:`~patchtrace.desiderata.Desideratum`, or a list of them — used as given;
* an object that *provides* desiderata (:class:`ProvidesDesiderata`: a ``desiderata()`` method), such
  as :class:`~patchtrace.tasks.variable_binding.VariableBindingTask`, whose value pairs come with the
  operation alternates of a second desideratum — its own desiderata;
* any other :class:`~patchtrace.tasks.Task` — read as one value desideratum
  (:func:`~patchtrace.desiderata.desiderata_from_task`: the patched components should carry the
  corrupt prompt's answer into the clean run).

A task type that knows better desiderata than the generic reading only has to define
``desiderata()``; nothing here needs to know it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from patchtrace.desiderata import Desideratum, desiderata_from_task
from patchtrace.methods.dbm.config import DBMError
from patchtrace.tasks.base import Task


@runtime_checkable
class ProvidesDesiderata(Protocol):
    """Anything with a ``desiderata()`` method returning its desiderata (e.g. a variable-binding task)."""

    def desiderata(self) -> list[Desideratum]: ...


DesiderataSource = Desideratum | Sequence[Desideratum] | ProvidesDesiderata | Task


def as_desiderata(source: DesiderataSource) -> list[Desideratum]:
    """The desiderata of ``source`` (see the module docstring for the rules, by type).

    Example:
        >>> from patchtrace.tasks.base import Example, Task
        >>> [d.name for d in as_desiderata(Task("t", [Example("a b", "a c", " x", " y")]))]
        ['value_dependence']

    Raises:
        DBMError: anything else (an empty list, a string, a list that is not all desiderata).
    """
    if isinstance(source, Desideratum):
        return [source]
    if isinstance(source, ProvidesDesiderata):
        return list(source.desiderata())
    if isinstance(source, Task):
        return [desiderata_from_task(source)]
    if isinstance(source, Sequence) and not isinstance(source, str) and source and all(
        isinstance(d, Desideratum) for d in source
    ):
        return list(source)
    raise DBMError(
        "DBM needs desiderata: a Desideratum, a list of them, a task that provides them (e.g. a "
        f"variable-binding task) or a Task (read as a value desideratum); got {type(source).__name__}"
    )
