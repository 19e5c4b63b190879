"""``patchtrace report runs/x``: write PNG heatmaps next to the scores and one offline HTML page.

See :mod:`patchtrace.report` for what is drawn, and :mod:`patchtrace.report.html` for how
prompt-derived text is escaped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchtrace.cli import common


def register(app: typer.Typer) -> None:
    """Add ``report`` to the app."""

    @app.command("report")
    def report(
        path: Annotated[Path, typer.Argument(help="a results folder (or a folder of them)")],
        top: Annotated[int, typer.Option(help="rows of each top-k table in the HTML")] = 15,
        title: Annotated[str | None, typer.Option(help="title of the HTML page")] = None,
        by: Annotated[str, typer.Option(help="rank the top tables by 'importance' (default), 'value', 'abs' or 'neg'")] = "importance",
    ) -> None:
        """Write heatmap.png next to each scores.json and report.html in PATH; print the paths."""
        from patchtrace.report import write_report

        common.parse_by(by)
        common.parse_top(top)
        con = common.console()
        for p in write_report(path, title=title, top=top, by=by):
            con.print(str(p), markup=False)
