"""PNG heatmaps of :class:`~patchtrace.results.Scores` with matplotlib.

The layout follows the grid's shape (:mod:`patchtrace.report.layouts`): layers down and the other
axis across for layers × heads or layers × positions (the prompt's decoded tokens as tick labels);
one facet per layer, drawn as one image with gutters, for heads × positions; a binned overview for a
neuron sweep. Axis titles and the colour-bar label are always drawn, and the layout's note (bin
width, a trace's window) goes under the title. The colour map is diverging and centred
at 0 (red = the patch moves the metric up, blue = down), with symmetric limits so that equal colours
mean equal magnitudes. The title names the method, site kind, metric, direction and baselines.

matplotlib is imported inside :func:`heatmap_png`, never at import time, and the figure is a
standalone :class:`matplotlib.figure.Figure` rendered straight to a file: pyplot's global state and
the caller's backend are never touched (a notebook keeps its inline backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

from patchtrace.report.layouts import Layout, layout
from patchtrace.results import Scores

#: Diverging colour map centred at 0 (red: the patch raises the metric; blue: lowers it).
CMAP = "RdBu_r"


def _mpl_text(s: str) -> str:
    """Text safe for matplotlib: ``$`` would start mathtext."""
    return s.replace("$", r"\$")


def heatmap_title(scores: Scores, normalized: bool = False) -> str:
    """Two-line title: method/kind/value and metric/direction/baselines."""
    p = scores.provenance
    direction = p.get("direction") or (p.get("config") or {}).get("direction")
    what = "normalized recovery" if normalized else scores.value_name
    line1 = f"{p.get('method', 'scores')} · {scores.site_kind} · {what} of {scores.metric}"
    if direction:
        line1 += f" ({direction})"
    b = scores.baselines
    parts = [f"{k} {b[k]:+.3f}" for k in ("clean", "corrupt") if k in b]
    model = p.get("model", {})
    name = model.get("model") if isinstance(model, dict) else model
    line2 = " · ".join([*(["baselines: " + ", ".join(parts)] if parts else []), *([str(name)] if name else [])])
    return _mpl_text(line1 + ("\n" + line2 if line2 else ""))


def heatmap_png(
    scores: Scores,
    path: str | Path,
    *,
    values: Tensor | None = None,
    normalized: bool = False,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Draw ``scores`` as a heatmap and write it to ``path`` (a ``.png``; parent folders created).

    The layout follows the grid's shape (:mod:`patchtrace.report.layouts`): one heatmap, one facet
    per layer for heads × positions, or a binned overview for a neuron sweep.

    Args:
        scores: the scores to draw.
        path: output file.
        values: draw these instead of ``scores.values`` (same shape), e.g. ``scores.normalized()``.
        normalized: say "normalized recovery" in the title (when ``values`` are recoveries).
        title: override the title.
        dpi: resolution.

    Returns:
        the path written.
    """
    import warnings

    from matplotlib.figure import Figure

    lay = layout(scores, values, normalized=normalized)
    head = _mpl_text(title) if title is not None else heatmap_title(scores, normalized)
    if lay.note:
        head += "\n" + _mpl_text(lay.note)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # emoji in a token
        if lay.kind == "facets":
            fig = _facets(Figure, lay, head)
        else:
            fig = _single(Figure, lay, head)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    return out


def _ticks(ax: Any, n: int, labels: list[str], axis: str, max_labels: int, fontsize: int = 7) -> None:
    step = max(1, math.ceil(n / max_labels))
    idx = list(range(0, n, step))
    if idx and idx[-1] != n - 1 and n - 1 - idx[-1] >= step / 2:
        idx.append(n - 1)  # the last row/column is always labelled
    lab = [_mpl_text(labels[i]) for i in idx]
    if axis == "y":
        ax.set_yticks(idx)
        ax.set_yticklabels(lab, fontsize=fontsize)
    else:
        ax.set_xticks(idx)
        rot = 90 if any(len(c) > 3 for c in lab) else 0
        ax.set_xticklabels(lab, fontsize=fontsize, rotation=rot)


def _single(Figure: Any, lay: Layout, head: str) -> Any:
    p = lay.panels[0]
    v = p.values.numpy()
    R, C = v.shape
    fig = Figure(figsize=(max(5.0, min(22.0, 3.2 + 0.3 * C)), max(3.2, min(16.0, 2.6 + 0.22 * R))),
                 layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(v, cmap=CMAP, vmin=-lay.limit, vmax=lay.limit, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.9).set_label(_mpl_text(lay.color_label))
    _ticks(ax, R, p.rows, "y", 40)
    _ticks(ax, C, p.cols, "x", 60)
    ax.set_ylabel(_mpl_text(lay.row_axis))
    ax.set_xlabel(_mpl_text(lay.col_axis))
    ax.set_title(head, fontsize=9)
    return fig


def _facets(Figure: Any, lay: Layout, head: str) -> Any:
    """Small multiples, one per layer, drawn as ONE image with blank gutters between the facets (one
    axes: tens of matplotlib axes take seconds to lay out), tick labels on the outer facets."""
    import numpy as np

    n = len(lay.panels)
    R, C = lay.panels[0].values.shape
    ncols = min(n, 6 if C <= 20 else 3 if C <= 50 else 2)
    nrows = math.ceil(n / ncols)
    gx, gy = 1, 2  # gutters (cells) between facets; gy leaves room for the facet titles
    big = np.full((nrows * (R + gy), ncols * (C + gx) - gx), np.nan)
    for k, p in enumerate(lay.panels):
        r0, c0 = (k // ncols) * (R + gy) + gy, (k % ncols) * (C + gx)
        big[r0:r0 + R, c0:c0 + C] = p.values.numpy()
    fw, fh = 0.2 * C + 0.1, 0.17 * (R + gy)
    W, H = min(26.0, ncols * fw + 2.6), min(40.0, nrows * fh + 2.6)
    fig = Figure(figsize=(W, H), layout="constrained")
    ax = fig.subplots()
    import matplotlib as mpl

    cmap = mpl.colormaps[CMAP].with_extremes(bad="white")
    im = ax.imshow(big, cmap=cmap, vmin=-lay.limit, vmax=lay.limit, aspect="auto", interpolation="nearest")
    p0 = lay.panels[0]
    ystep = max(1, math.ceil(R / 12))
    yt = [(fr * (R + gy) + gy + i, p0.rows[i]) for fr in range(nrows) for i in range(0, R, ystep)]
    ax.set_yticks([t for t, _ in yt])
    ax.set_yticklabels([_mpl_text(lab) for _, lab in yt], fontsize=6)
    xstep = max(1, math.ceil(C / 30))
    xt = [(fc * (C + gx) + j, p0.cols[j]) for fc in range(ncols) for j in range(0, C, xstep)]
    ax.set_xticks([t for t, _ in xt])
    ax.set_xticklabels([_mpl_text(lab) for _, lab in xt], fontsize=6, rotation=90)
    for k, p in enumerate(lay.panels):
        ax.text((k % ncols) * (C + gx) - 0.5, (k // ncols) * (R + gy) + gy - 0.7, _mpl_text(p.title),
                fontsize=7, fontweight="bold", va="bottom", ha="left")
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(length=0)
    ax.set_ylabel(_mpl_text(f"{lay.row_axis} (one facet per {lay.facet_axis})"), fontsize=9)
    ax.set_xlabel(_mpl_text(lay.col_axis), fontsize=9)
    ax.set_title(head, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.5).set_label(_mpl_text(lay.color_label))
    return fig


__all__ = ["heatmap_png", "heatmap_title"]
