"""``patchtrace show runs/x``: the top components of saved Scores, with baselines and provenance.

``runs/x`` is a folder written by :meth:`Scores.save` (``scores.json`` + ``scores.safetensors``), or
a folder of such folders (one per site kind, as ``patchtrace patch --sites head,resid_pre`` writes).
Reading a results folder never unpickles anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from patchtrace.cli import common


def register(app: typer.Typer) -> None:
    """Add ``show`` to the app."""

    @app.command("show")
    def show(
        path: Annotated[Path, typer.Argument(help="a results folder (or a folder of them)")],
        top: Annotated[int, typer.Option(help="rows in the top-k table")] = 10,
        by: Annotated[str, typer.Option(help="rank by 'importance' (recovery when denoising, damage when noising), 'value' (largest first), 'abs' or 'neg'")] = "importance",
        provenance: Annotated[bool, typer.Option("--provenance/--no-provenance", help="print the provenance summary")] = True,
    ) -> None:
        """Print the top sites of saved results, the baselines and where they came from."""
        from patchtrace.report.summary import provenance_summary
        from patchtrace.results import Scores

        common.parse_by(by)
        common.parse_top(top)
        con = common.console()
        for folder in common.find_scores(path).values():
            s = Scores.load(folder)
            con.print(Text(f"{folder}  ·  {s.site_kind} {s.value_name}, axes {s.axes} shape {s.shape}", style="bold"))
            common.print_baselines(s, con)
            con.print(common.scores_table(s, top, title=f"top {top}", by=by))
            if provenance:
                t = Table(show_header=False, box=None, pad_edge=False)
                t.add_column(style="dim")
                t.add_column()
                for k, v in provenance_summary(s):
                    t.add_row(Text(k), Text(v))
                con.print(t)
            con.print()
