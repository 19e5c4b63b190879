"""The task registry: built-ins are listed, names with dashes or underscores resolve, user
generators register (and do not silently replace a name), and ``patchtrace tasks`` lists them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from patchtrace.cli import build_app
from patchtrace.tasks import (
    BUILTIN_TASKS,
    Example,
    Task,
    TaskError,
    VariableBindingTask,
    make_task,
    register_task,
    task_generators,
)


def test_builtins_are_registered_with_descriptions():
    names = [g.name for g in task_generators()]
    assert names[:5] == ["ioi", "factual", "greater_than", "variable_binding", "extractive_qa"]
    assert set(BUILTIN_TASKS) == set(names[:5]) and all(BUILTIN_TASKS.values())


def test_dash_and_underscore_name_the_same_generator():
    a, b = make_task("variable-binding", n=3, seed=2), make_task("variable_binding", n=3, seed=2)
    assert isinstance(a, VariableBindingTask) and a.hash() == b.hash() and len(a) == 3


def test_register_a_generator_and_refuse_a_silent_replacement():
    def toy(n, seed, model):
        return Task("toy", [Example(f"a {i}", f"b {i}", " x", " y") for i in range(n)], {"seed": seed})

    register_task("my-toy", toy, "a toy", replace=True)
    t = make_task("my_toy", n=3, seed=7)
    assert len(t) == 3 and t.params == {"seed": 7}
    with pytest.raises(TaskError, match="already registered"):
        register_task("my_toy", toy, "again")
    res = CliRunner().invoke(build_app(), ["tasks"])
    assert res.exit_code == 0 and "my_toy" in res.output and "extractive_qa" in res.output


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(TaskError, match=r"unknown task 'nope'; registered tasks: ioi, factual"):
        make_task("nope")
