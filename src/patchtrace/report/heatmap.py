"""PNG heatmaps of :class:`~patchtrace.results.Scores` with matplotlib.

Layers run down, the other axis across: layers × heads for a head sweep, layers × positions (the
prompt's tokens as tick labels) for a residual-stream sweep. The colour map is diverging and centred
at 0 (red = the patch moves the metric up, blue = down), with symmetric limits so that equal colours
mean equal magnitudes. The title names the method, site kind, metric, direction and baselines.

matplotlib is imported inside :func:`heatmap_png`, never at import time, and the figure is a
standalone :class:`matplotlib.figure.Figure` rendered straight to a file: pyplot's global state and
the caller's backend are never touched (a notebook keeps its inline backend).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from patchtrace.report.summary import as_matrix
from patchtrace.results import Scores


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
    dpi: int = 120,
) -> Path:
    """Draw ``scores`` as a heatmap and write it to ``path`` (a ``.png``; parent folders created).

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
    from matplotlib.figure import Figure

    m = as_matrix(scores, values)
    v = m.values.numpy()
    R, C = v.shape
    finite = v[~(v != v)] if v.size else v
    lim = float(abs(finite).max()) if finite.size else 1.0
    lim = lim if lim > 0 else 1.0
    width = min(24.0, 3.0 + 0.38 * C)
    height = min(24.0, 2.4 + 0.24 * R)
    fig = Figure(figsize=(max(width, 5.0), max(height, 3.0)))
    ax = fig.subplots()
    im = ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, shrink=0.9)
    cbar.set_label(_mpl_text("normalized recovery" if normalized else f"{scores.value_name} ({scores.metric})"))
    step_r = max(1, R // 40)
    ax.set_yticks(range(0, R, step_r))
    ax.set_yticklabels([_mpl_text(m.rows[i]) for i in range(0, R, step_r)], fontsize=7)
    step_c = max(1, C // 60)
    ax.set_xticks(range(0, C, step_c))
    rot = 90 if any(len(c) > 3 for c in m.cols) else 0
    ax.set_xticklabels([_mpl_text(m.cols[j]) for j in range(0, C, step_c)], fontsize=7, rotation=rot)
    ax.set_ylabel(m.row_axis)
    xl = m.col_axis + (" (tokens of example 0)" if "pos" in scores.axes and "pos" in scores.labels else "")
    ax.set_xlabel(_mpl_text(xl))
    ax.set_title(_mpl_text(title) if title is not None else heatmap_title(scores, normalized), fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


__all__ = ["heatmap_png", "heatmap_title"]
