"""Output folders and what a command says before it computes: helpers of :mod:`patchtrace.cli.common`.

Kept apart so ``common`` stays about option parsing and printing results; both names are re-exported
there (``common.prepare_out``, ``common.print_scored``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from patchtrace.errors import PatchtraceError


class CLIError(PatchtraceError, ValueError):
    """A command-line value that cannot be parsed or used (the message names the option and the value)."""


def print_scored(tok: Any, tokenizer: Any, con: Console | None = None) -> None:
    """One line saying which tokens the metric scores (example 0), so a missing leading space shows."""
    from patchtrace.report.summary import display_token

    con = con or Console(highlight=False)
    ans, wrong = tok.scored_tokens(tokenizer, 0)
    a = ", ".join(repr(display_token(t)) for t in ans)
    w = ", ".join(repr(display_token(t)) for t in wrong)
    con.print(Text(f"scoring (example 0): answer {a} vs wrong {w}"))


def prepare_out(root: Path, folders: Sequence[Path], overwrite: bool) -> None:
    """Check an output folder before a run writes ``folders`` under it.

    Results already under ``root`` that this run will not rewrite (a per-kind subfolder of an earlier
    run with other sites, or a single-kind result where this run writes subfolders) would be left
    stale, and ``show``/``report`` would mix them in: refuse them, or with ``overwrite`` delete them.
    The folders this run writes are checked by the method itself (same run: resume; different: refuse).

    Raises:
        CLIError: stale results and no ``overwrite``; or ``root`` is a file.
    """
    from patchtrace.engine.checkpoint import remove_results

    if root.exists() and not root.is_dir():
        raise CLIError(f"--out {root}: is a file, not a folder; choose a folder path")
    if not root.is_dir():
        return
    found = ([root] if (root / "scores.json").is_file() else []) + [
        c for c in sorted(root.iterdir()) if c.is_dir() and (c / "scores.json").is_file()
    ]
    keep = {Path(f).resolve() for f in folders}
    stale = [f for f in found if Path(f).resolve() not in keep]
    if not stale:
        return
    if not overwrite:
        raise CLIError(
            f"--out {root} holds results this run would not replace ({', '.join(str(f) for f in stale[:4])}); "
            "use another --out folder, or --overwrite to clear them"
        )
    for f in stale:
        remove_results(f)
    stale_report = root / "report.html"
    if stale_report.is_file():
        stale_report.unlink()


