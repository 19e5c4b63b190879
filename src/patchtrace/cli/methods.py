"""``patchtrace methods``: the registered localization methods, from the registry itself.

Example::

    patchtrace methods

One row per method registered with :func:`patchtrace.methods.registry.register_method` (the built-ins,
plus any your own code registered before building the app): its name, the type it returns, whether
it is a sweep (one patched forward per cell, so its cost grows with the grid) and what it does.
Estimators say which method's result they estimate on the same grid; ``patchtrace compare`` runs them.
"""

from __future__ import annotations

import typer

from patchtrace.cli import common


def register(app: typer.Typer) -> None:
    """Add ``methods`` to the app."""

    @app.command("methods")
    def methods_cmd() -> None:
        """List the registered methods: name, result type, sweep or not, what it does."""
        from rich.table import Table
        from rich.text import Text

        from patchtrace.methods import list_methods

        table = Table(title="registered methods (run(model, task, sites, config))", title_justify="left")
        for col in ("method", "result", "sweep", "config", "description"):
            table.add_column(col)
        for spec in list_methods():
            what = spec.description + (f" (estimates {spec.estimates})" if spec.estimates else "")
            table.add_row(
                Text(spec.name), Text(spec.result.__name__), "yes" if spec.sweep else "no",
                Text(spec.config.__name__), Text(what),
            )
        common.console().print(table)
