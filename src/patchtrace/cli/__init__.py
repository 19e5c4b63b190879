"""The ``patchtrace`` command line: a thin typer app over the library.

Commands live in their own modules of this package. Every module here that defines

.. code-block:: python

    def register(app: typer.Typer) -> None:
        @app.command("mycmd")
        def mycmd(...): ...

is found by :func:`build_app` (via :func:`pkgutil.iter_modules`) and asked to add its commands, so a
new command is a new file, with no edit to this one. Shared option parsing and loading helpers are
in :mod:`patchtrace.cli.common`.

Errors raised by the library (:data:`patchtrace.cli.common.LIBRARY_ERRORS`: bad model, task, site,
metric, engine, results or checkpoint), click's usage errors and operating-system errors (a path that
cannot be written) are caught once, here at the boundary, and printed as a single red line with exit
code 2; any other exception is a bug and is printed as one line with exit code 1
(:mod:`patchtrace.cli._boundary`). Set ``PATCHTRACE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any

import typer
from typer.core import TyperGroup

#: Modules of this package that are helpers, not command modules.
_NOT_COMMANDS = frozenset({"common"})


class _GuardedGroup(TyperGroup):
    """The root command group; turns library errors into one red line and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        import warnings

        from patchtrace.cli import _boundary
        from patchtrace.cli.common import fail
        from patchtrace.errors import PatchtraceWarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, PatchtraceWarning):
                from patchtrace.cli.common import warn

                warn(str(message))
            else:
                original(message, category, *args, **kwargs)

        original = warnings.showwarning
        argv = [*getattr(ctx, "_protected_args", []), *ctx.args]  # the raw words, for naming a bad value
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", PatchtraceWarning)
                warnings.showwarning = show
                return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # the error boundary (LIBRARY_ERRORS and the rest): see patchtrace.cli._boundary
            if _boundary.debug() or _boundary.shows_help(e):
                raise
            name = ctx.invoked_subcommand
            cmd, words = _boundary.leaf_command(self.get_command(ctx, name) if name else None, ctx, argv)
            message, code = _boundary.explain(e, cmd, " ".join([name, *words]) if name else None, argv)
            fail(message, code=code)


def command_modules() -> list[str]:
    """Names of the modules of this package that may hold commands (sorted, helpers excluded)."""
    return sorted(
        m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name not in _NOT_COMMANDS
    )


def build_app(*, strict: bool = False) -> typer.Typer:
    """Create the typer app and register the commands of every command module.

    Args:
        strict: re-raise when a command module fails to import or register (tests use this);
            by default such a module is skipped with a warning on stderr, so one broken command
            does not take the others down.

    Returns:
        the app; call it (``app()``) to run the command line, or pass it to ``typer.testing.CliRunner``.
    """
    app = typer.Typer(
        name="patchtrace",
        cls=_GuardedGroup,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        help="Find where inside a neural network a behaviour is computed, exactly and fast.",
    )
    for name in command_modules():
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
            register = getattr(mod, "register", None)
            if callable(register):
                register(app)
        except Exception as e:
            if strict:
                raise
            print(f"patchtrace: skipping command module {name!r} ({type(e).__name__}: {e})", file=sys.stderr)
    return app


def main() -> None:
    """Entry point of the ``patchtrace`` console script."""
    build_app()(prog_name="patchtrace")


__all__ = ["build_app", "command_modules", "main"]
