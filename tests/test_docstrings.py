"""Every docstring example in the ``patchtrace`` package runs, and its printed output is checked.

The examples teach, so they must stay true: each module of the package is imported (found with
:func:`pkgutil.walk_packages`, so a new module is covered the day it is added), its examples are
collected with :class:`doctest.DocTestFinder` and run with ``ELLIPSIS | NORMALIZE_WHITESPACE``, one
test per module so that a failure names the module. ``# doctest: +SKIP`` is refused: an example
that cannot run here is prose, not an example.

Examples that call ``load_model()`` get the bundled SmolLM2 of the session (the ``smollm2`` fixture
of ``conftest.py``), loaded once and shared: ``load_model`` is replaced, for the duration of the
module's examples, by one that returns that instance for the default arguments (any other model or
setting still goes to the real loader; ``tests/shared_model.py``). Those modules are in the ``smollm2`` tier. The task
and method registries are restored after each module, so an example that registers something leaves
no trace in other tests.

The examples run single-threaded: they are tiny, and on a shared CPU torch's worker threads spend
more time waiting for each other than computing (ten times slower on the 2-core machine here).
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
from collections.abc import Iterator

import pytest
import torch

import patchtrace
import patchtrace.methods.registry as method_registry
import patchtrace.tasks as task_registry
from shared_model import REAL_LOAD_MODEL, share_model

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _walk() -> tuple[dict[str, list[doctest.DocTest]], dict[str, str]]:
    """``{module: its doctests with examples}`` for every module of the package, and import errors."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    found: dict[str, list[doctest.DocTest]] = {}
    errors: dict[str, str] = {}
    for info in pkgutil.walk_packages(patchtrace.__path__, "patchtrace.", onerror=lambda name: errors.setdefault(name, "walk")):
        try:
            module = importlib.import_module(info.name)
        except Exception as e:  # reported by test_every_module_imports, not as a collection error
            errors[info.name] = f"{type(e).__name__}: {e}"
            continue
        tests = [t for t in finder.find(module) if t.examples]
        if tests:
            found[info.name] = tests
    return found, errors


DOCTESTS, IMPORT_ERRORS = _walk()


def _needs_model(tests: list[doctest.DocTest]) -> bool:
    return any("load_model(" in ex.source for t in tests for ex in t.examples)


PARAMS = [
    pytest.param(name, marks=[pytest.mark.smollm2] if _needs_model(tests) else [], id=name)
    for name, tests in sorted(DOCTESTS.items())
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_module_imports():
    assert not IMPORT_ERRORS, IMPORT_ERRORS


def test_examples_are_found():
    """The walk reaches the subpackages (a broken walk would silently test nothing)."""
    assert {"patchtrace.sites", "patchtrace.methods.activation_patching", "patchtrace.qa.steering"} <= set(DOCTESTS)


def test_no_example_is_skipped():
    skipped = [
        f"{t.name} (line {(t.lineno or 0) + ex.lineno + 1})"
        for tests in DOCTESTS.values() for t in tests for ex in t.examples if ex.options.get(doctest.SKIP)
    ]
    assert not skipped, f"examples marked +SKIP (make them run, or turn them into prose): {skipped}"


@pytest.mark.parametrize("module", PARAMS)
def test_docstring_examples(module: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    tests = DOCTESTS[module]
    loader = None
    if _needs_model(tests):
        loader = share_model(monkeypatch, request.getfixturevalue("smollm2"))
    # examples may register tasks or methods: each module starts from, and leaves, the same registries
    monkeypatch.setattr(task_registry, "_REGISTRY", dict(task_registry._REGISTRY))
    monkeypatch.setattr(method_registry, "_REGISTRY", dict(method_registry._REGISTRY))
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    for found in tests:
        globs = dict(found.globs)  # a fresh namespace per run (the runner clears the one it is given)
        if loader is not None:
            globs.update({k: loader for k, v in globs.items() if v is REAL_LOAD_MODEL})
        test = doctest.DocTest(found.examples, globs, found.name, found.filename, found.lineno, found.docstring)
        runner.run(test, out=report.write)
    assert runner.tries > 0
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples failed in {module}:\n{report.getvalue()}"
