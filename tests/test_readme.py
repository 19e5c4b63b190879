"""The README's examples run: its Python blocks, its command lines, and the extension guide.

* **Python.** Every ```` ```python ```` block of ``README.md`` runs, in order, in one namespace (later
  blocks use earlier names such as ``model`` and ``task``), in a temporary working directory (the
  blocks write ``runs/...``). The blocks of ``docs/extending.md`` run the same way in a namespace of
  their own. ``load_model()`` hands out the session's SmolLM2 (``tests/shared_model.py``).
* **Command lines.** Every ``patchtrace ...`` line of a ```` ```bash ```` / ```` ```sh ```` block runs
  through ``typer.testing.CliRunner`` on :func:`patchtrace.cli.build_app`, in order, in one temporary
  working directory (so ``patchtrace show runs/ioi`` finds what ``patchtrace patch ... --out runs/ioi``
  wrote). Each must exit 0 without printing a traceback. Every other line of those blocks must be
  listed in :data:`NOT_RUN` with the reason; nothing is skipped silently.

Reduction rules. The README shows realistic sizes (16 prompts, every layer, ROME's 10 noise samples,
100 mask steps); run as written they take many minutes on a CPU. The test shrinks them by rules
written here, never by editing what it checks:

* command lines (:func:`reduce_command`): append ``--n 2`` to a command that has ``--n``; append
  ``--layers 23`` (the layer of the IOI name mover L23.H3) to one that has ``--layers`` and does not
  set it; append ``--samples 2`` to one that has ``--samples`` and ``--steps 5`` to one that has
  ``--steps``. A repeated option takes its last value, so the README's own values are overridden.
  ``--dry-run`` lines compute nothing and run unchanged.
* Python (:data:`PY_REDUCTIONS`): literal substitutions of the same kind (fewer prompts, layer 23
  only, fewer steps). Each must match the README text; a rule that no longer matches fails the
  test, so an edited README cannot silently escape its reduction.

Inputs a command names that no earlier command creates (``my_pairs.jsonl``, ``mine.jsonl``,
``my_qa.jsonl``) are written before the commands run, in the formats the README documents
(:func:`write_inputs`); the QA circuit that ``attribute --circuit`` reads is made by the README's own
``patchtrace qa-circuit`` line.
"""

from __future__ import annotations

import re
import shlex
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from shared_model import share_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXTENDING = ROOT / "docs" / "extending.md"

#: Lines of shell blocks that are not ``patchtrace`` commands, with why they are not run here.
NOT_RUN = {
    "make demo": "set-up target: creates .venv, installs, then runs `patchtrace demo` (a full-size sweep)",
    "make test": "runs lint and the whole test suite, this file included",
}

#: (README text, what the test runs instead): the Python blocks' reduction rules.
PY_REDUCTIONS = [
    ('make_task("ioi", n=16, seed=0)', 'make_task("ioi", n=2, seed=0)'),
    ('SiteSpec("head", per_unit=True, positions="last")', 'SiteSpec("head", per_unit=True, positions="last", layers=(23,))'),
    ('SiteSpec("head", per_unit=True)', 'SiteSpec("head", per_unit=True, layers=(23,))'),
    ('make_task("factual", n=8, model=model)', 'make_task("factual", n=2, model=model)'),
    ("TracingConfig(window=10)", "TracingConfig(window=10, samples=2)"),
    ("variable_binding_desiderata(48, model=model)", "variable_binding_desiderata(4, model=model)"),
    ('dbm.run(model, ds, "head,mlp_out", dbm.DBMConfig(lam=0.1))',
     'dbm.run(model, ds, [SiteSpec("head", per_unit=True, layers=(23,)), SiteSpec("mlp_out", layers=(23,))], '
     "dbm.DBMConfig(lam=0.1, steps=5))"),
    ("qa_patching_task(8, model=model)", "qa_patching_task(2, model=model, n_sentences=(4, 4))"),
]

#: Options appended to a command that has them (see the module docstring).
CLI_REDUCTIONS = {"--n": "2", "--samples": "2", "--steps": "5"}
REDUCED_LAYERS = "23"


# -- extracting the examples -------------------------------------------------------------------------


def code_blocks(text: str, langs: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block whose info string is one of ``langs``."""
    out = []
    for m in re.finditer(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, re.S | re.M):
        if m.group(1) in langs:
            out.append((text.count("\n", 0, m.start()) + 2, m.group(2)))
    return out


def shell_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, command)`` of every non-empty line of the shell blocks, comments removed."""
    out = []
    for start, code in code_blocks(text, ("bash", "sh", "shell", "console")):
        for i, line in enumerate(code.splitlines()):
            words = shlex.split(line, comments=True)
            if words:
                out.append((start + i, shlex.join(words)))
    return out


def readme_commands() -> list[tuple[int, str]]:
    lines = shell_lines(README.read_text())
    return [(n, c) for n, c in lines if c not in NOT_RUN]


def test_shell_lines_are_commands_or_listed():
    """Every line of a shell block is a ``patchtrace`` command, or in NOT_RUN with its reason."""
    lines = [c for _, c in shell_lines(README.read_text())]
    assert all(c.startswith("patchtrace ") or c in NOT_RUN for c in lines), lines
    assert set(NOT_RUN) <= set(lines), "NOT_RUN lists a line the README no longer has"


# -- command lines -----------------------------------------------------------------------------------


def options_of(app: Any, argv: list[str]) -> set[str]:
    """The option names the command ``argv[0]`` takes (empty for the top level)."""
    group = get_command(app)
    cmd = group.commands.get(argv[0]) if argv and not argv[0].startswith("-") else None  # type: ignore[attr-defined]
    return {o for p in cmd.params for o in getattr(p, "opts", [])} if cmd is not None else set()


def reduce_command(app: Any, argv: list[str]) -> list[str]:
    """The README command with the reduction rules of the module docstring applied."""
    if "--dry-run" in argv:
        return argv
    opts = options_of(app, argv)
    out = list(argv)
    for opt, value in CLI_REDUCTIONS.items():
        if opt in opts:
            out += [opt, value]
    if "--layers" in opts and "--layers" not in argv:
        out += ["--layers", REDUCED_LAYERS]
    return out


def write_inputs(model: Any = None) -> None:
    """The files the README's commands name and no command creates, in the formats it documents."""
    pairs = [
        ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
        ("When Tom and Anna went to the park, Anna gave a ball to", "When Tom and Anna went to the park, Tom gave a ball to", " Tom", " Anna"),
    ]
    Path("my_pairs.jsonl").write_text(
        "".join(f'{{"clean": "{c}", "corrupt": "{k}", "answer": "{a}", "wrong": "{w}"}}\n' for c, k, a, w in pairs)
    )
    Path("mine.jsonl").write_text("".join(
        f'{{"desideratum": "value", "kind": "value", "original": "a = {x}\\nprint(a)  # prints ", '
        f'"alternate": "a = {y}\\nprint(a)  # prints ", "target": "{y}", "contrast": "{x}"}}\n'
        for x, y in ((3, 5), (2, 7), (4, 1), (6, 8))
    ))
    Path("my_qa.jsonl").write_text(
        '{"sentences": ["The capital of France is Lyon.", "The capital of Spain is Madrid."], '
        '"question": "What is the capital of France?", "answer": " Lyon", "gold": 0, "prefix": "The capital of France is"}\n'
    )


@dataclass
class Outcome:
    argv: list[str]
    exit_code: int
    output: str
    exception: BaseException | None


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny runs: torch's worker threads only wait for each other on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def command_outcomes(smollm2, one_thread, tmp_path_factory) -> dict[int, Outcome]:
    """Run every README command, in order, in one working directory; outcomes by README line."""
    from patchtrace.cli import build_app

    mp = pytest.MonkeyPatch()
    try:
        share_model(mp, smollm2)
        mp.chdir(tmp_path_factory.mktemp("readme-cli"))
        mp.setenv("COLUMNS", "200")
        write_inputs(smollm2)
        app = build_app(strict=True)
        runner = CliRunner()
        out = {}
        for line, command in readme_commands():
            argv = reduce_command(app, shlex.split(command)[1:])
            res = runner.invoke(app, argv)
            out[line] = Outcome(argv, res.exit_code, res.output, res.exception)
        return out
    finally:
        mp.undo()


@pytest.mark.smollm2
@pytest.mark.parametrize(("line", "command"), readme_commands(), ids=[f"L{n}:{c}" for n, c in readme_commands()])
def test_readme_command(line: int, command: str, command_outcomes: dict[int, Outcome]):
    o = command_outcomes[line]
    ran = "patchtrace " + shlex.join(o.argv)
    assert o.exit_code == 0, f"README line {line}: `{ran}` exited {o.exit_code}:\n{o.output}\n{o.exception!r}"
    assert "Traceback" not in o.output, f"README line {line}: `{ran}` printed a traceback:\n{o.output}"


# -- Python blocks -------------------------------------------------------------------------------------


def reduced_python(text: str) -> list[tuple[int, str]]:
    """The README's Python blocks with :data:`PY_REDUCTIONS` applied (each rule must match)."""
    blocks = code_blocks(text, ("python",))
    joined = "\n".join(code for _, code in blocks)
    stale = [old for old, _ in PY_REDUCTIONS if old not in joined]
    assert not stale, f"reduction rules that no longer match the README (update PY_REDUCTIONS): {stale}"
    out = []
    for line, code in blocks:
        for old, new in PY_REDUCTIONS:
            code = code.replace(old, new)
        out.append((line, code))
    return out


def run_blocks(path: Path, blocks: list[tuple[int, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute ``blocks`` in order in one namespace (a module of its own, as a reader's script would
    be: dataclasses look their module up); a failure names the document and line."""
    module = types.ModuleType(f"{path.stem}_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for line, code in blocks:
        try:
            exec(compile(code, f"{path.name} (block at line {line})", "exec"), module.__dict__)
        except Exception as e:
            raise AssertionError(f"{path.name}: the Python block at line {line} failed: {type(e).__name__}: {e}") from e


@pytest.mark.smollm2
def test_readme_python(smollm2, one_thread, tmp_path, monkeypatch):
    share_model(monkeypatch, smollm2)
    monkeypatch.chdir(tmp_path)
    run_blocks(README, reduced_python(README.read_text()), monkeypatch)
    assert (tmp_path / "runs" / "ioi-heads" / "report.html").exists()


@pytest.mark.smollm2
def test_extending_python(smollm2, one_thread, tmp_path, monkeypatch):
    import patchtrace.grid as grid
    import patchtrace.methods.registry as method_registry
    import patchtrace.models.adapters as adapters

    share_model(monkeypatch, smollm2)
    monkeypatch.chdir(tmp_path)
    # the guide registers a method, declares an axis and adds a family: other tests see none of them
    monkeypatch.setattr(method_registry, "_REGISTRY", dict(method_registry._REGISTRY))
    monkeypatch.setattr(grid, "AXES", dict(grid.AXES))
    monkeypatch.setattr(adapters, "FAMILIES", adapters.FAMILIES)
    run_blocks(EXTENDING, code_blocks(EXTENDING.read_text(), ("python",)), monkeypatch)


def test_extending_is_linked():
    assert "docs/extending.md" in README.read_text()
