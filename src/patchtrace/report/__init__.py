"""Reports of :class:`~patchtrace.results.Scores`: PNG heatmaps and one self-contained HTML page.

>>> import tempfile, torch
>>> from patchtrace import Scores
>>> from patchtrace.report import write_report
>>> d = tempfile.mkdtemp()
>>> _ = Scores(torch.tensor([[0.1, 0.9], [0.4, -0.2]]), ("layer", "head"), "head").save(d)
>>> [p.name for p in write_report(d)]
['heatmap.png', 'report.html']

* :func:`~patchtrace.report.heatmap.heatmap_png` — one matplotlib heatmap (layers × heads, layers ×
  positions with the prompt's tokens), diverging colours centred at 0;
* :func:`~patchtrace.report.html.html_report` — an offline HTML page with interactive heatmaps,
  top-k tables, baselines and provenance; every prompt-derived string is escaped;
* :func:`write_report` — both, for a results folder written by :meth:`Scores.save` (or a folder of
  such folders, one per site kind).

Both lay a grid out by its shape (:mod:`patchtrace.report.layouts`: one heatmap, a facet per layer,
or a binned overview with drill-down) and show tokens decoded (:mod:`patchtrace.tokens`); in a
notebook, results render through :mod:`patchtrace.report.inline` (``_repr_html_``).
"""

from __future__ import annotations

from pathlib import Path

from patchtrace.report.heatmap import heatmap_png
from patchtrace.report.html import html_report
from patchtrace.results import ResultsError, Scores


def find_results(path: str | Path) -> dict[str, Path]:
    """The results folders at ``path``: ``path`` itself (name ``""``), its subfolders with ``scores.json``,
    or else their subfolders (named ``method/kind``, as ``patchtrace compare`` writes ``<method>/<kind>/``).

    Raises:
        ResultsError: there are none (a missing path or a file is named as such).
    """
    p = Path(path)
    if (p / "scores.json").is_file():
        return {"": p}
    if p.exists() and not p.is_dir():
        raise ResultsError(f"{p} is a file; give a results folder (one holding scores.json, or folders of them)")
    if not p.exists():
        raise ResultsError(f"{p}: no such folder; give a results folder written by a patchtrace command")
    subs = {c.name: c for c in sorted(p.iterdir()) if (c / "scores.json").is_file()}
    if not subs:  # one level deeper: compare's <method>/<kind>/
        subs = {f"{c.name}/{g.name}": g for c in sorted(p.iterdir()) if c.is_dir()
                for g in sorted(c.iterdir()) if (g / "scores.json").is_file()}
    if subs:
        return subs
    raise ResultsError(f"{p} holds no patchtrace results (no scores.json in it or in its subfolders)")


def write_report(
    path: str | Path, *, title: str | None = None, top: int = 15, note: str | None = None, by: str = "importance"
) -> list[Path]:
    """Write ``heatmap.png`` next to each ``scores.json`` under ``path`` and one ``report.html`` in ``path``.

    Args:
        path: a results folder, or a folder of results folders (e.g. ``runs/x/head``, ``runs/x/resid_pre``).
        title: HTML title (default: ``patchtrace report: <folder name>``).
        top: rows of each top-k table.
        note: an extra line in the HTML (e.g. wall time).
        by: order of the top tables (default: importance for the direction and metric).

    Returns:
        the files written: the PNGs, then the HTML.

    Raises:
        ResultsError: no results at ``path`` or a malformed results folder.
    """
    found = find_results(path)
    written: list[Path] = []
    sections: dict[str, Scores] = {}
    for name, folder in found.items():
        s = Scores.load(folder)
        sections[name or s.site_kind] = s
        written.append(heatmap_png(s, folder / "heatmap.png"))
    root = Path(path)
    written.append(
        html_report(sections, root / "report.html", title=title or f"patchtrace report: {root.name}", top=top, note=note,
                    by=by)
    )
    _embed_circuit(root, written[-1])
    return written


def _embed_circuit(root: Path, html: Path) -> None:
    """Append the circuit graph (``circuit.png`` written by ``patchtrace circuit``) to the page, inline."""
    png = root / "circuit.png"
    if not png.is_file():
        return
    import base64

    img = base64.b64encode(png.read_bytes()).decode("ascii")
    section = f'<section><h2>circuit graph</h2><img alt="circuit graph" style="max-width:100%" src="data:image/png;base64,{img}"></section>'
    text = html.read_text()
    html.write_text(text.replace("</body>", section + "</body>", 1) if "</body>" in text else text + section)


__all__ = ["find_results", "heatmap_png", "html_report", "write_report"]
