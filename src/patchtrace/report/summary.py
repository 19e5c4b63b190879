"""Plain-data views of a :class:`~patchtrace.results.Scores` shared by the terminal, PNG and HTML reports.

Every report draws the same three things: a 2-D matrix of the values (:func:`as_matrix`), the
top-k sites (:func:`top_rows`) and a short provenance summary (:func:`provenance_summary`). Building
them here once keeps the three renderings consistent. Nothing here escapes text: the HTML writer
escapes every string it embeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patchtrace.results import Scores
from patchtrace.tokens import display_token, display_tokens


def axis_ticks(scores: Scores, axis: str) -> list[str]:
    """Tick labels of one axis: layer/unit indices (``L3``, ``H7``) or, for ``pos``, ``index:token``."""
    ticks = scores.grid.ticks(axis)
    if axis == "pos":
        toks = scores.labels.get("pos")
        if toks and len(toks) == len(ticks):
            return [f"{p}:{t}" for p, t in zip(ticks, display_tokens(toks), strict=True)]
    return ticks


@dataclass
class Matrix:
    """Scores laid out as rows × columns for drawing.

    Attributes:
        values: ``[R, C]`` float tensor.
        rows, cols: tick labels.
        row_axis, col_axis: axis names (``col_axis`` joins several with ``×`` when flattened).
        cells: for each (r, c), the multi-index into ``scores.values``.
    """

    values: Tensor
    rows: list[str]
    cols: list[str]
    row_axis: str
    col_axis: str
    cells: list[list[tuple[int, ...]]]


def as_matrix(scores: Scores, values: Tensor | None = None) -> Matrix:
    """Lay ``values`` (default ``scores.values``; same shape) out as a 2-D matrix.

    0-D → 1×1; 1-D → one row per layer/unit, or one row of positions; 2-D as is (layers down);
    3-D and more → first axis down, the others flattened across (``H0@3`` ...).
    """
    v = (scores.values if values is None else values).detach().float().cpu()
    axes = scores.axes
    shape = tuple(v.shape)
    if v.dim() == 0:
        return Matrix(v.reshape(1, 1), [""], [scores.site_kind], "", "", [[()]])
    if v.dim() == 1:
        ticks = axis_ticks(scores, axes[0])
        if axes[0] == "pos":
            return Matrix(v.reshape(1, -1), [scores.site_kind], ticks, "", "pos", [[(j,) for j in range(shape[0])]])
        return Matrix(v.reshape(-1, 1), ticks, [scores.site_kind], axes[0], "", [[(i,)] for i in range(shape[0])])
    rows = axis_ticks(scores, axes[0])
    rest = [axis_ticks(scores, a) for a in axes[1:]]
    cols: list[str] = []
    cells_rest: list[tuple[int, ...]] = []
    for multi in torch.cartesian_prod(*[torch.arange(n) for n in shape[1:]]).reshape(-1, v.dim() - 1).tolist():
        cells_rest.append(tuple(multi))
        cols.append("@".join(rest[k][j] for k, j in enumerate(multi)))
    cells = [[(i, *c) for c in cells_rest] for i in range(shape[0])]
    return Matrix(v.reshape(shape[0], -1), rows, cols, axes[0], "×".join(axes[1:]), cells)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def cell_token(scores: Scores, index: tuple[int, ...]) -> str | None:
    """The prompt token at the position of a cell, decoded for display (:mod:`patchtrace.tokens`), if known."""
    toks = scores.labels.get("pos")
    if "pos" in scores.axes and toks:
        j = index[scores.axes.index("pos")]
        return display_tokens(toks)[j] if j < len(toks) else None
    return None


def top_rows(
    scores: Scores, k: int = 10, normalized: Tensor | None = None, by: str = "importance"
) -> list[dict[str, Any]]:
    """The top-``k`` sites as dicts: ``rank``, ``site`` (string), ``value``, ``recovery`` (or None), ``token``.

    ``by`` is as in :meth:`Scores.ranking`; :func:`order_phrase` says the order in words.
    """
    out = []
    for rank, multi in enumerate(scores.top_indices(k, by), start=1):
        rec = None
        if normalized is not None and tuple(normalized.shape) == tuple(scores.values.shape):
            rec = _finite(float(normalized[multi]))
        out.append(
            {
                "rank": rank,
                "site": scores.cell_label(multi),
                "value": float(scores.values[multi]),
                "recovery": rec,
                "token": cell_token(scores, multi),
            }
        )
    return out


def order_phrase(scores: Scores, by: str = "importance") -> str:
    """What the order of :func:`top_rows` means, in words (``largest damage first (noising ...)``)."""
    return scores.ranking(by)[1]


def provenance_summary(scores: Scores) -> list[tuple[str, str]]:
    """The provenance fields a reader wants first, as ``(name, text)`` pairs (missing ones skipped)."""
    p = scores.provenance
    model: dict[str, Any] = p["model"] if isinstance(p.get("model"), dict) else {}
    task: dict[str, Any] = p["task"] if isinstance(p.get("task"), dict) else {}
    cfg: dict[str, Any] = p["config"] if isinstance(p.get("config"), dict) else {}
    rows: list[tuple[str, Any]] = [
        ("method", p.get("method")),
        ("sites", p.get("sites", scores.site_kind)),
        ("direction", scores.direction),
        ("metric", scores.metric),
        ("model", model.get("model") if model else p.get("model")),
        ("weights sha256", model.get("weights_sha256")),
        ("dtype", model.get("dtype")),
        ("task", task.get("name") if task else p.get("task")),
        ("examples", task.get("n")),
        ("task hash", task.get("hash")),
        ("task params", task.get("params")),
        ("fast path", cfg.get("fast")),
        ("sanity |clean→clean|", p.get("sanity_max_abs")),
        ("plan", p.get("plan")),
        ("patchtrace", p.get("version")),
        ("torch", p.get("torch")),
        ("created", p.get("created")),
    ]
    return [(k, v if isinstance(v, str) else repr(v)) for k, v in rows if v is not None and v != {}]


__all__ = ["Matrix", "as_matrix", "axis_ticks", "cell_token", "display_token", "order_phrase", "provenance_summary", "top_rows"]
