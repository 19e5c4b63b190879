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


def check_out(path: str | Path, option: str = "--out", *, folder: bool = True) -> Path:
    """Refuse, before anything is loaded or computed, an output path that cannot be written.

    Catches a file where a folder is expected (or a folder where a file is), a path under a file,
    and a place that cannot be written (no permission, a read-only file system, even as root): a
    probe file is created in the nearest existing folder and removed at once, so nothing is left.

    Args:
        path: the output folder (``folder=True``) or file.
        option: the option it came from, for the message.
        folder: whether ``path`` is a folder (else a file, whose parent folder must be writable).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        CLIError: the path cannot be used (names the option, the path and what to do).
    """
    import os
    import tempfile

    p = Path(path).expanduser()
    if folder and p.exists() and not p.is_dir():
        raise CLIError(f"{option} {path}: is a file, not a folder; choose a folder path")
    if not folder and p.is_dir():
        raise CLIError(f"{option} {path}: is a folder, not a file; give a file path")
    anc = p if folder else (p.parent if str(p.parent) else Path("."))
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise CLIError(f"{option} {path}: {anc} is a file, so nothing can be created under it; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".patchtrace-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"{option} {path}: cannot write in {anc} ({e.strerror}); choose a folder you can write to") from None
    return p


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


