"""The command line's error boundary: every failure becomes one line on stderr, never a traceback.

The root command group (:class:`patchtrace.cli._GuardedGroup`) hands every exception a command
raises to :func:`explain`, which turns it into the one line printed after ``error:`` and an exit code:

* a library error (:class:`~patchtrace.errors.PatchtraceError`: bad site, task, model, results
  folder, ...) — its own message, which names the item; exit code 2. A config error that names a
  config field (``TracingConfig.noise_scale: -3.0 is outside (0, inf]``) is restated with the
  command's option (``--noise-scale``) when the command has one of that name;
* a command-line usage error found by click (a missing argument, ``--n abc``, an unknown option or
  command) — click's message on one line instead of its usage box; exit code 2;
* an operating-system error (a folder that cannot be created, a read-only file system, a disk that
  is full, a file where a folder is expected) — the path, the reason and what to do; exit code 2,
  because it is about the user's environment, which they can change;
* anything else is a bug in patchtrace, not bad input: one line saying so and how to see the
  traceback; exit code 1 (so tests that expect exit code 2 for bad input tell the two apart).

Set ``PATCHTRACE_DEBUG=1`` to get the original traceback instead of the line.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

#: Exit code of a failure the user can fix (bad input, unusable path).
EXIT_BAD_INPUT = 2
#: Exit code of an unexpected exception (a bug in patchtrace).
EXIT_INTERNAL = 1

_CONFIG_FIELD = re.compile(r"^(\w+Config)\.(\w+): (.*)$", re.DOTALL)

_OS_ADVICE = {
    errno.EACCES: "no permission; choose a path you can write to (or fix its permissions)",
    errno.EPERM: "not permitted; choose a path you can write to",
    errno.EROFS: "the file system is read-only; choose a path on a writable disk",
    errno.ENOSPC: "the disk is full; free some space or choose a path on another disk",
    errno.EDQUOT: "the disk quota is exhausted; free some space or choose another path",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "this is a folder where a file is expected; choose a file path",
    errno.EEXIST: "something already exists there; choose another path",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
}


def debug() -> bool:
    """True when ``PATCHTRACE_DEBUG`` asks for tracebacks instead of one-line errors."""
    return os.environ.get("PATCHTRACE_DEBUG", "") not in ("", "0")


def shows_help(e: BaseException) -> bool:
    """True for the usage "error" that means "show the help" (a command group called with no
    arguments): it is left to typer, which prints the help."""
    return any(c.__name__ == "NoArgsIsHelpError" for c in type(e).__mro__)


def one_line(text: str) -> str:
    """``text`` with its line breaks folded into `` · `` (a message is printed as one line)."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return " · ".join(parts)


def option_names(command: Any) -> dict[str, str]:
    """``{param name: '--its-option'}`` of a click command (empty when there is none)."""
    out: dict[str, str] = {}
    for p in getattr(command, "params", []) or []:
        opts = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        if p.name and opts:
            out[p.name] = opts[0]
    return out


def os_error_message(e: OSError) -> str:
    """What an operating-system error means for the user: the path, the reason, what would work."""
    path = e.filename if e.filename is not None else ""
    reason = e.strerror or type(e).__name__
    advice = _OS_ADVICE.get(e.errno or -1, "check the path and its permissions")
    where = f"{os.fspath(path)!s}: " if path != "" else ""
    extra = f" (and {os.fspath(e.filename2)})" if getattr(e, "filename2", None) else ""
    return f"{type(e).__name__}: {where}{reason}{extra}; {advice}"


def leaf_command(command: Any, ctx: Any, argv: list[str]) -> tuple[Any, list[str]]:
    """The command that ran: ``command`` itself, or for a group (``weights apply``) the subcommand
    named by the next words of ``argv``; also those words."""
    words: list[str] = []
    rest = list(argv[1:])  # argv[0] is the top-level command's own name
    while command is not None and hasattr(command, "get_command") and rest:
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            break
        words.append(rest.pop(0))
        command = sub
    return command, words


def given_value(argv: list[str], opts: list[str]) -> str | None:
    """The word given to option ``opts`` on the command line ``argv`` (``--n abc`` or ``--n=abc``), if any."""
    for i, word in enumerate(argv):
        for o in opts:
            if word == o and i + 1 < len(argv):
                return argv[i + 1]
            if word.startswith(o + "="):
                return word[len(o) + 1:]
    return None


def explain(
    e: BaseException, command: Any = None, command_name: str | None = None, argv: list[str] | None = None
) -> tuple[str, int]:
    """The one-line message (without the ``error:`` prefix) and the exit code for exception ``e``.

    Args:
        e: what the command raised.
        command: the click command that was running (to name options), if known.
        command_name: its name, for the usage hint.
        argv: the command's words as typed (to quote the value click refused), if known.
    """
    from typer.exceptions import TyperException  # typer's own click: usage errors derive from it

    from patchtrace.errors import PatchtraceError

    if isinstance(e, PatchtraceError) or (isinstance(e, FileNotFoundError) and not e.filename):
        text = str(e)
        m = _CONFIG_FIELD.match(text)
        opts = option_names(command)
        if m and m[2] in opts:
            text = f"{opts[m[2]]}: {m[3]} ({m[1]}.{m[2]})"
        return one_line(f"{type(e).__name__}: {text}"), EXIT_BAD_INPUT
    if isinstance(e, TyperException):
        hint = f"patchtrace {command_name} --help" if command_name else "patchtrace --help"
        text = e.format_message() if hasattr(e, "format_message") else str(e)
        param = getattr(e, "param", None)
        value = given_value(argv or [], list(getattr(param, "opts", []) or []))
        if value is not None and repr(value) not in text:
            text = f"{text.rstrip('.')} (got {value!r})"
        return one_line(f"{text} (see '{hint}')"), EXIT_BAD_INPUT
    if isinstance(e, OSError):
        return one_line(os_error_message(e)), EXIT_BAD_INPUT
    where = f" in 'patchtrace {command_name}'" if command_name else ""
    return one_line(
        f"internal error{where}: {type(e).__name__}: {e} — this is a bug in patchtrace, not in your input; "
        "rerun with PATCHTRACE_DEBUG=1 to see the traceback and please report it"
    ), EXIT_INTERNAL


__all__ = [
    "EXIT_BAD_INPUT", "EXIT_INTERNAL", "debug", "explain", "given_value", "leaf_command", "one_line", "option_names",
    "os_error_message", "shows_help",
]
