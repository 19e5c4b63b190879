"""Helpers shared by every CLI command: option parsing, loading, printing, error reporting.

Use these from your own command module (``cli/<yourcmd>.py``) so that all commands accept the same
spellings and fail the same way:

* :func:`load` — ``--model/--device/--dtype/--trust-remote-code`` → a :class:`~patchtrace.models.load.Model`
  (a path that does not exist is refused before any hub lookup);
* :func:`build_task` — ``--task/--n/--seed`` → a :class:`~patchtrace.tasks.base.Task` (built-in name
  or ``.jsonl``/``.csv`` file);
* :func:`parse_positions` — ``last``, ``all``, ``none`` or ``0,3,-1``;
* :func:`parse_sites` — ``head,resid_pre`` → one :class:`~patchtrace.sites.SiteSpec` per kind;
* :func:`parse_layers` — ``0-3,7`` → ``(0, 1, 2, 3, 7)``;
* :func:`parse_memory` — ``4GB``, ``512MiB``, ``1e9`` → bytes;
* :func:`progress` — a rich progress bar whose ``update(done, total)`` is the one progress protocol
  (:mod:`patchtrace.progress`) that every registered method's ``on_progress`` accepts;
* :func:`scores_table`, :func:`print_baselines` — the standard rich renderings of :class:`Scores`;
* :func:`fail` — print one red line and exit with code 2.

Errors: parsers raise the library's own exceptions (:class:`~patchtrace.sites.SiteError`,
:class:`CLIError` ...). The app catches everything in :data:`LIBRARY_ERRORS` at the boundary, so a
command body never needs its own try/except for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from patchtrace.cli._output import CLIError, check_out, prepare_out, print_scored
from patchtrace.engine.checkpoint import CheckpointError
from patchtrace.engine.sweep import EngineError
from patchtrace.errors import PatchtraceError
from patchtrace.metrics import MetricError
from patchtrace.models.adapters import UnsupportedModelError
from patchtrace.models.load import ModelLoadError
from patchtrace.qa.generation import GenerationError
from patchtrace.results import ResultsError, Scores
from patchtrace.sites import SiteError, SiteSpec
from patchtrace.tasks.base import TaskError

#: Exceptions that the app reports as one red line with exit code 2 (no traceback).
LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    PatchtraceError,  # every library error (the ones below are listed for readers)
    CLIError,
    ModelLoadError,
    UnsupportedModelError,
    TaskError,
    SiteError,
    MetricError,
    EngineError,
    ResultsError,
    CheckpointError,
    GenerationError,
    FileNotFoundError,
)


def console() -> Console:
    """The stdout console (a new one per call: no module-level state; rich adapts to the terminal).

    Printed lines never wrap (``soft_wrap``): a path or a number is not split across lines when the
    output is a file or a narrow terminal; tables still fit the width. When the output is not a
    terminal (a pipe, a file, a notebook cell) and ``COLUMNS`` is not set, the width is
    :data:`PIPE_WIDTH` instead of rich's 80 columns, so table cells are not folded (``-4.83`` never
    becomes ``-4.8`` + ``3``)."""
    import os
    import sys

    isatty = getattr(sys.stdout, "isatty", None)
    piped = not (callable(isatty) and isatty()) and not os.environ.get("COLUMNS")
    return Console(highlight=False, soft_wrap=True, width=PIPE_WIDTH if piped else None)


#: Output width when stdout is not a terminal (wide enough for every table the commands print).
PIPE_WIDTH = 240


def err_console() -> Console:
    """The stderr console (errors, warnings, progress bars); lines never wrap either."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """Print ``message`` as one yellow ``warning:`` line on stderr (no markup interpretation)."""
    err_console().print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` as one red line on stderr (no markup interpretation) and exit with ``code``
    (2: bad input; the boundary uses 1 for a bug). Line breaks in ``message`` are folded: one line."""
    from patchtrace.cli._boundary import one_line

    err_console().print(Text(f"error: {one_line(message)}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


# -- parsing -----------------------------------------------------------------------------------------


def parse_positions(text: str) -> str | list[int] | None:
    """``--positions``: ``last`` → ``"last"``, ``all`` → ``"all"``, ``none`` → None (whole layer at
    once, no position axis), ``0,3,-1`` → ``[0, 3, -1]``.

    Raises:
        CLIError: anything else.
    """
    t = text.strip().lower()
    if t in ("last", "all"):
        return t
    if t in ("none", "whole", "layer"):
        return None
    try:
        out = [int(x) for x in t.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out:
        raise CLIError(f"--positions {text!r}: use 'last', 'all', 'none' or a comma list of integers like '0,5,-1'")
    return out


def parse_sites(text: str, positions: str | list[int] | None = "last", layers: Sequence[int] | None = None) -> list[SiteSpec]:
    """``--sites``: a comma list of sweep names (see :meth:`SiteSpec.parse`), e.g. ``head,resid_pre``;
    an item may carry its own positions after ``@`` (``head@last,resid_pre@all``), as in ``compare``.

    Raises:
        SiteError: an unknown kind (named in the message), or a repeated one.
        CLIError: bad positions after ``@``.
    """
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise SiteError(f"--sites {text!r}: give at least one site kind, e.g. 'head' or 'head,resid_pre'")
    specs = []
    for item in names:
        name, at, pos = item.partition("@")
        item_pos = parse_positions(pos) if at else positions
        spec = SiteSpec.parse(name.strip(), positions=item_pos)  # type: ignore[arg-type]
        if layers is not None:
            spec = SiteSpec(spec.kind, spec.per_unit, spec.positions, tuple(layers), spec.units)
        specs.append(spec)
    kinds = [s.kind for s in specs]
    dup = {k for k in kinds if kinds.count(k) > 1}
    if dup:
        raise SiteError(f"--sites {text!r}: kind(s) {', '.join(sorted(dup))} given twice")
    return specs


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``--layers``: ``0-3,7`` → ``(0, 1, 2, 3, 7)``; None or empty → None (all layers).

    Raises:
        CLIError: a malformed range.
    """
    if text is None or not text.strip():
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise CLIError(f"--layers {text!r}: {part!r} is not a layer or a range like '3-7'")
        a, b = int(m[1]), int(m[2] or m[1])
        if b < a:
            raise CLIError(f"--layers {text!r}: range {part!r} runs backwards")
        out.extend(range(a, b + 1))
    return tuple(dict.fromkeys(out))


_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "p": 10**15, "pb": 10**15, "pib": 2**50,
}

#: The smallest ``--max-memory`` that can hold a useful block of patched activations.
MIN_MEMORY = 2**20


def machine_memory() -> int | None:
    """Bytes of physical memory of this machine (plus the largest GPU's, when CUDA is available), if known."""
    import os

    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None
    import torch

    if torch.cuda.is_available():
        total += max(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return total


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{int(n)} bytes"


def parse_memory(text: str | None) -> int | None:
    """``--max-memory``: ``4GB`` (10^9), ``4GiB`` (2^30), ``512MB``, ``1e9`` → bytes; None → None.

    Raises:
        CLIError: not a number with a known unit, a zero or negative amount, less than
            :data:`MIN_MEMORY` (1 MiB), or more than this machine has (each said as such).
    """
    if text is None or not text.strip():
        return None
    m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m:
        raise CLIError(f"--max-memory {text!r}: use a number with a unit, e.g. '4GB', '512MiB'")
    unit = m[2].lower()
    if unit not in _UNITS:
        raise CLIError(f"--max-memory {text!r}: unknown unit {m[2]!r}; use B, KB, MB, GB, TB (or KiB, MiB, GiB, TiB)")
    n = float(m[1]) * _UNITS[unit]
    if n <= 0:
        raise CLIError(f"--max-memory {text!r}: a memory budget must be positive, e.g. '4GB'")
    if n < MIN_MEMORY:
        raise CLIError(f"--max-memory {text!r} is {_size(n)}; the engine needs at least 1 MiB (e.g. '512MB' or '4GB')")
    have = machine_memory()
    if have is not None and n > have:
        raise CLIError(f"--max-memory {text!r} is {_size(n)}, more than this machine's {_size(have)}; give less, e.g. '4GB'")
    return int(n)


# -- loading -----------------------------------------------------------------------------------------


def load(model: str, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False) -> Any:
    """Load a model for a command (a bundled name, a local directory or a hub id).

    A spec that looks like a path (starts with ``.``, ``/`` or ``~``) but does not exist is refused
    here, naming it, instead of being sent to the hub.

    Raises:
        ModelLoadError, UnsupportedModelError: from :func:`patchtrace.load_model`.
    """
    from patchtrace.models.load import load_model
    from patchtrace.progress import quiet_third_party, step

    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise ModelLoadError(f"model {model!r}: no such directory")
    # one line while it loads, none of transformers' bars (PATCHTRACE_VERBOSE=1 shows them)
    with step(f"loading {model}", err_console()), quiet_third_party():
        return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


#: ``--executor``: where the blocks of a sweep run (shared by every sweep-type command).
ExecutorOption = Annotated[str, typer.Option("--executor", help="where sweep blocks run: 'local' (this process) or 'ray' (Ray workers; same result bit for bit)")]
#: ``--ray-address``: the Ray cluster to join.
RayAddressOption = Annotated[str | None, typer.Option("--ray-address", help="Ray cluster to join (host:port, ray://host:port or auto); default: start a local one for this run")]


def executor(name: str, address: str | None) -> Any:
    """The sweep executor of ``--executor/--ray-address``, closed when the command ends (a local Ray
    instance it started is shut down, also after an error: the close is registered on the click
    context, which runs it however the command exits).

    Call it *before* loading the model: an unknown name or an unreachable address then fails in
    seconds (:class:`~patchtrace.engine.executors.ExecutorError`,
    :class:`~patchtrace.engine.executors.ray_executor.RayExecutorError`).
    """
    import click

    from patchtrace.engine.executors import close_executor, make_executor

    ex = make_executor(name, address)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lambda: close_executor(ex))
    return ex


def check_task(task: str, n: int = 1, option: str = "--task") -> None:
    """Check ``--task`` and ``--n`` before the model loads (a typo fails in milliseconds, not after ~5 s).

    A name ending in ``.jsonl``/``.json``/``.csv`` must be an existing file; any other name must be
    a registered task. The file's content is read later, by :func:`build_task`.

    Raises:
        TaskError: no such file, an unknown task name (lists the registered ones), or ``n < 1``.
    """
    from patchtrace.tasks import task_generators

    if n < 1:
        raise TaskError(f"--n {n}: need at least one example")
    if task.endswith((".jsonl", ".json", ".csv")):
        p = Path(task).expanduser()
        if not p.is_file():
            raise TaskError(f"{option} {task}: no such file" + (" (it is a folder)" if p.is_dir() else ""))
        return
    names = [g.name for g in task_generators()]
    if task.strip().replace("-", "_") not in names:
        raise TaskError(f"{option} {task!r}: unknown task; registered tasks: {', '.join(names)}, or a .jsonl/.csv file")


#: ``--n`` when not given, for a built-in task (a task file: all its examples).
DEFAULT_N = 16


def build_task(task: str, n: int | None, seed: int, model: Any = None, *, default_n: int = DEFAULT_N) -> Any:
    """A built-in task by name (``ioi``, ``factual``, ...) or a ``.jsonl``/``.csv`` file.

    ``n``: examples of a built-in task (None: ``default_n``); for a file, its first ``n``
    examples (None: all of them; more than the file has: all, with a warning) — never ignored.
    Building a task can take a while (generators that check each item on the model): a line says
    so while it runs.

    Raises:
        TaskError: unknown name (the message lists the built-ins), unreadable file, or ``n < 1``.
    """
    from patchtrace.progress import step
    from patchtrace.tasks import make_task

    if n is not None and n < 1:
        raise TaskError(f"--n {n}: need at least one example")
    is_file = task.endswith((".jsonl", ".json", ".csv"))
    with step(f"building the task {task}", err_console()):
        t = make_task(task, n=default_n if n is None or is_file else n, seed=seed, model=model)
    if is_file and n is not None:
        if n < len(t):
            err_console().print(Text(f"--n {n}: using the first {n} of the {len(t)} examples in {task}"), soft_wrap=True)
            t = t.subset(range(n))
        elif n > len(t):
            warn(f"--n {n}: {task} has only {len(t)} examples; using all of them")
    return t


# -- output ------------------------------------------------------------------------------------------


@contextmanager
def progress(description: str, *, quiet: bool = False) -> Iterator[Any]:
    """A rich progress bar; ``bar.update`` is an ``on_progress(done, total)`` callback
    (:mod:`patchtrace.progress`), so it fits every registered method.

    Example:
        Any registered method reports into the same bar (``quiet=True`` hides it, as ``-q`` does):

        >>> from patchtrace import SiteSpec, get_method, load_model, make_task
        >>> spec = get_method("activation_patching")
        >>> heads = SiteSpec("head", per_unit=True, layers=(23,))
        >>> with progress("patching head", quiet=True) as bar:
        ...     scores = spec.run(load_model(), make_task("ioi", n=2), heads, None, on_progress=bar.update)
        >>> tuple(scores.values.shape)
        (1, 9)
    """
    from patchtrace.progress import bar

    # drawn from the first report (no empty bar before an error); plain lines when not a terminal
    with bar(description, err_console(), quiet=quiet) as b:
        yield b


def normalized_or_none(scores: Scores) -> Any:
    """``scores.normalized()`` when the scores have what it needs, else None (never raises)."""
    try:
        return scores.normalized()
    except (ResultsError, MetricError, KeyError):
        return None


RANK_CHOICES = ("importance", "value", "abs", "neg")


def parse_by(by: str) -> str:
    """``--by``: one of :data:`RANK_CHOICES`.

    Raises:
        CLIError: anything else.
    """
    if by not in RANK_CHOICES:
        raise CLIError(f"--by {by!r}: use {', '.join(repr(c) for c in RANK_CHOICES)}")
    return by


def check_count(value: int, option: str, low: int = 1) -> int:
    """An integer option that counts something (examples, heads, steps): at least ``low``.

    Raises:
        CLIError: below ``low`` (names the option and the value).
    """
    if value < low:
        raise CLIError(f"{option} {value}: must be at least {low}")
    return value


def check_finite(value: float, option: str) -> float:
    """A number option: finite (NaN and infinity are refused, whatever the range check after).

    Raises:
        CLIError: NaN or infinite.
    """
    import math

    if not math.isfinite(value):
        raise CLIError(f"{option} {value}: must be a finite number")
    return value


def parse_top(top: int) -> int:
    """``--top``: a positive number of rows.

    Raises:
        CLIError: zero or negative.
    """
    if top < 1:
        raise CLIError(f"--top {top}: give a positive number of rows")
    return top


def scores_table(scores: Scores, k: int = 10, title: str | None = None, by: str = "importance") -> Table:
    """The top-``k`` sites with value and normalized recovery, as a rich table.

    The title always says what the order is (e.g. ``largest damage first`` for a noising sweep).

    Args:
        scores: the scores.
        k: rows.
        title: table title (the order is appended).
        by: ``importance`` (recovery when denoising, damage when noising, see
            :meth:`Scores.ranking`), ``value`` (largest first), ``abs`` or ``neg``.
    """
    import torch

    from patchtrace.report.summary import display_token, order_phrase, top_rows

    order = order_phrase(scores, by)
    title = f"{title} · {order}" if title else order
    table = Table(title=title, title_justify="left", min_width=len(title) + 2)  # the title on one line
    table.add_column("#", justify="right")
    table.add_column("site")
    table.add_column(scores.value_name, justify="right")
    norm = normalized_or_none(scores)
    if norm is not None:
        table.add_column("recovery", justify="right")
    has_tok = "pos" in scores.labels
    if has_tok:
        table.add_column("token")
    for r in top_rows(scores, k, normalized=norm if isinstance(norm, torch.Tensor) else None, by=by):
        cells: list[str | Text] = [str(r["rank"]), Text(r["site"]), f"{r['value']:+.4f}"]
        if norm is not None:
            cells.append("" if r["recovery"] is None else f"{r['recovery']:+.3f}")
        if has_tok:
            cells.append(Text(repr(display_token(r["token"])) if r["token"] is not None else ""))
        table.add_row(*cells)
    return table


def print_baselines(scores: Scores, con: Console | None = None) -> None:
    """One line: metric, direction, clean and corrupt baselines and the gap."""
    con = con or console()
    b = scores.baselines
    direction = scores.direction
    parts = [f"metric {scores.metric}"] + ([f"direction {direction}"] if direction else [])
    if "clean" in b:
        parts.append(f"clean {b['clean']:+.4f}")
    if "corrupt" in b:
        parts.append(f"corrupt {b['corrupt']:+.4f}")
    if "clean" in b and "corrupt" in b:
        parts.append(f"gap {b['clean'] - b['corrupt']:+.4f}")
    con.print(Text("baselines: " + " · ".join(parts)))


def find_scores(path: str | Path) -> dict[str, Path]:
    """The results folders under ``path`` (see :func:`patchtrace.report.find_results`).

    Raises:
        ResultsError: no results folder there.
    """
    from patchtrace.report import find_results

    return find_results(path)


__all__ = [
    "LIBRARY_ERRORS",
    "CLIError",
    "build_task",
    "check_count",
    "check_finite",
    "check_out",
    "check_task",
    "console",
    "err_console",
    "executor",
    "fail",
    "find_scores",
    "load",
    "normalized_or_none",
    "parse_by",
    "parse_layers",
    "parse_memory",
    "parse_positions",
    "parse_sites",
    "parse_top",
    "prepare_out",
    "print_baselines",
    "print_scored",
    "progress",
    "scores_table",
    "warn",
]
