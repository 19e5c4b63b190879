"""How a grid of scores is laid out on a page: chosen from the grid's shape, shared by PNG, HTML and notebooks.

One flat matrix does not fit every grid the library produces. Flattening heads × positions gives
one row per layer and 126 columns (``H0@0:When`` ...), half of them unlabelled; a neuron sweep gives
1536 columns of 4-pixel rows. So the layout depends on the shape:

* **matrix** — a 2-D grid that fits (layers × heads, layers × positions, a trace): one heatmap.
* **facets** — a 3-D grid (layers × heads × positions): one small heatmap per value of the first
  axis (a *facet* per layer, heads down, the prompt's tokens across), all on one colour scale, so a
  head's position profile reads directly and layers compare at a glance.
* **binned** — a 2-D grid with many columns (layers × 1536 neurons): an *overview* in which each
  cell is a bin of consecutive units and shows the bin's largest-magnitude value (with its sign), so
  a single strong neuron is never averaged away; the HTML report drills down into one layer's units,
  and the top-k table lists the neurons themselves.

Every layout carries its axis titles and the colour-bar label (``effect (logit_diff)``), and a note
saying what a cell is when that is not obvious: the bin width, or the window of a causal trace
(``each cell restores the mlp outputs of 10 layers around it``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from patchtrace.report.summary import as_matrix, axis_ticks
from patchtrace.results import Scores

#: A 2-D grid with more columns than this is shown binned.
WIDE = 128
#: Target number of bins across in a binned overview.
BINS = 48

LayoutKind = Literal["matrix", "facets", "binned"]


@dataclass
class Panel:
    """One heatmap: ``values[R, C]``, tick labels, and for each cell the index into the scores
    (``cells``; None in a binned overview, where ``spans`` gives each column's unit range)."""

    title: str
    values: Tensor
    rows: list[str]
    cols: list[str]
    cells: list[list[tuple[int, ...]]] | None
    spans: list[tuple[int, int]] | None = None


@dataclass
class Layout:
    """Panels and what they mean: the layout kind, axis titles, colour-bar label and a note."""

    kind: LayoutKind
    panels: list[Panel]
    row_axis: str
    col_axis: str
    color_label: str
    note: str = ""
    facet_axis: str = ""
    bin: int = 1
    limit: float = 1.0
    extra: dict[str, object] = field(default_factory=dict)


def color_label(scores: Scores, normalized: bool = False) -> str:
    """What the colour encodes: ``effect (logit_diff)`` or ``normalized recovery``."""
    return "normalized recovery" if normalized else f"{scores.value_name} ({scores.metric})"


def window_note(scores: Scores) -> str:
    """For a causal trace of MLP/attention windows: what one cell restores (empty otherwise)."""
    p = scores.provenance
    cfg: dict[str, object] = p["config"] if isinstance(p.get("config"), dict) else {}
    kind, window = cfg.get("kind"), cfg.get("window")
    if p.get("method") != "causal_tracing" or kind not in ("mlp", "attn") or not isinstance(window, int):
        return ""
    lo, hi = window // 2, math.ceil(window / 2) - 1
    return (f"window {window}: each cell restores the {kind} outputs of {window} consecutive layers "
            f"(L−{lo} … L+{hi}, clipped at the ends) at that position")


def _limit(v: Tensor) -> float:
    finite = v[torch.isfinite(v)]
    lim = float(finite.abs().max()) if finite.numel() else 1.0
    return lim if lim > 0 else 1.0


def _spans(n: int) -> list[tuple[int, int]]:
    """At most :data:`BINS` ranges of equal width covering ``range(n)``."""
    width = math.ceil(n / BINS)
    return [(s, min(n, s + width)) for s in range(0, n, width)]


def _bin_max(v: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    """``[R, C]`` → ``[R, len(spans)]``: per bin of columns, the value of largest magnitude (sign kept)."""
    out = torch.empty(v.shape[0], len(spans))
    for j, (s, e) in enumerate(spans):
        block = torch.nan_to_num(v[:, s:e], nan=0.0)
        out[:, j] = block.gather(1, block.abs().argmax(1, keepdim=True))[:, 0]
    return out


def _axis_title(scores: Scores, axis: str) -> str:
    if axis == "pos" and "pos" in scores.labels:
        return "position: token (example 0)"
    return axis


def choose(scores: Scores) -> LayoutKind:
    """The layout for a grid's shape (see the module docstring)."""
    shape = tuple(scores.values.shape)
    if len(shape) == 3:
        return "facets"
    if len(shape) == 2 and shape[1] > WIDE:
        return "binned"
    return "matrix"


def layout(scores: Scores, values: Tensor | None = None, *, normalized: bool = False) -> Layout:
    """Lay ``values`` (default ``scores.values``, same shape) out for drawing."""
    v = (scores.values if values is None else values).detach().float().cpu()
    kind = choose(scores)
    label = color_label(scores, normalized)
    note = window_note(scores)
    if kind == "facets":
        a0, a1, a2 = scores.axes
        t0, t1, t2 = (axis_ticks(scores, a) for a in (a0, a1, a2))
        if v.shape[1] > WIDE:  # e.g. layers × neurons × positions: each facet's rows are bins of units
            spans = _spans(v.shape[1])
            rows = [f"{t1[s]}–{t1[e - 1]}" for s, e in spans]
            panels = [Panel(t0[i], _bin_max(v[i].T, spans).T, rows, t2, None, spans) for i in range(v.shape[0])]
            note = (f"each row of a facet is a bin of {spans[0][1]} consecutive {a1}s showing its largest-magnitude "
                    f"value (sign kept); the top table lists single {a1}s") + (f"; {note}" if note else "")
            return Layout("facets", panels, f"{a1} (bins of {spans[0][1]})", _axis_title(scores, a2), label, note,
                          facet_axis=a0, bin=spans[0][1], limit=_limit(v))
        panels = [
            Panel(t0[i], v[i], t1, t2, [[(i, r, c) for c in range(v.shape[2])] for r in range(v.shape[1])])
            for i in range(v.shape[0])
        ]
        return Layout("facets", panels, a1, _axis_title(scores, a2), label, note, facet_axis=a0, limit=_limit(v))
    if kind == "binned":
        a0, a1 = scores.axes
        spans = _spans(v.shape[1])
        width = spans[0][1]
        binned = _bin_max(v, spans)
        ticks = axis_ticks(scores, a1)
        cols = [f"{ticks[s]}–{ticks[e - 1]}" for s, e in spans]
        note = (f"overview: each cell is a bin of {width} consecutive {a1}s and shows the bin's largest-magnitude "
                f"value (sign kept); the top table lists single {a1}s") + (f"; {note}" if note else "")
        panel = Panel("", binned, axis_ticks(scores, a0), cols, None, spans)
        return Layout("binned", [panel], a0, f"{a1} (bins of {width})", label, note, bin=width, limit=_limit(v))
    m = as_matrix(scores, v)
    col = _axis_title(scores, m.col_axis) if m.col_axis in scores.axes else m.col_axis
    return Layout("matrix", [Panel("", m.values, m.rows, m.cols, m.cells)], m.row_axis, col, label, note,
                  limit=_limit(m.values))


__all__ = ["BINS", "WIDE", "Layout", "Panel", "choose", "color_label", "layout", "window_note"]
