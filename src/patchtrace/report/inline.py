"""Results in a notebook: static HTML for ``_repr_html_`` (a heatmap table and the top sites).

A notebook shows an object's ``_repr_html_`` instead of its ``repr``. A script cannot be relied on
there (notebook viewers and GitHub strip it), so the heatmap is a plain ``<table>`` whose cells are
coloured with the report's diverging scale (red up, blue down, centred at 0) and carry a ``title``
tooltip (site, value, token). The layout follows the grid's shape as in the report
(:mod:`patchtrace.report.layouts`): a neuron sweep shows its binned overview, heads × positions the
largest-magnitude value over positions per head (the full report has the per-layer facets). Every
string is escaped: a token ``</td><script>`` stays text.

Example:
    >>> import torch
    >>> from patchtrace import Scores
    >>> s = Scores(torch.tensor([[0.5, -1.0], [0.0, 2.0]]), ("layer", "head"), "head")
    >>> page = s._repr_html_()
    >>> page.count("<td class=pt-c"), "head[1].h1" in page
    (4, True)
"""

from __future__ import annotations

import html
import math
from typing import Any

import torch

from patchtrace.report.layouts import WIDE, Layout, Panel, color_label, layout
from patchtrace.report.summary import axis_ticks, order_phrase, top_rows
from patchtrace.results import Scores
from patchtrace.tokens import display_tokens

_W, _RED, _BLUE = (247, 247, 247), (178, 24, 43), (33, 102, 172)
#: Cells above this are shown binned (a notebook cell is not a canvas).
MAX_CELLS = 4000


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def color(v: float, lim: float) -> str:
    """The report's diverging colour of ``v`` on the scale ``[-lim, lim]`` (grey for NaN)."""
    if not math.isfinite(v):
        return "#ccc"
    t = max(-1.0, min(1.0, v / lim))
    end = _RED if t >= 0 else _BLUE
    t = abs(t)
    return "rgb(" + ",".join(str(math.floor(w + (e - w) * t + 0.5)) for w, e in zip(_W, end, strict=True)) + ")"  # as JS Math.round


def _facet_overview(scores: Scores) -> Layout:
    """Heads × positions → layers × heads, each cell the largest-magnitude value over positions
    (binned across when the second axis is wide, as a neuron sweep is)."""
    v = scores.values.detach().float()
    idx = torch.nan_to_num(v, nan=0.0).abs().argmax(-1, keepdim=True)
    best = v.gather(-1, idx)[..., 0]
    lay = layout(scores)
    if v.shape[1] > WIDE:
        flat = Scores(best, scores.axes[:2], scores.site_kind, scores.value_name, scores.metric)
        over = layout(flat)
        over.note = f"each cell: the largest-magnitude value over {scores.axes[2]}; " + over.note
        return over
    rows = [p.title for p in lay.panels]
    cells: list[list[tuple[int, ...]]] = [[(i, j, int(idx[i, j, 0])) for j in range(v.shape[1])] for i in range(v.shape[0])]
    panel = Panel("", best, rows, axis_ticks(scores, scores.axes[1]), cells)
    note = f"each cell: the largest-magnitude value over {scores.axes[2]} (the HTML report shows every {scores.axes[2]})"
    return Layout("matrix", [panel], scores.axes[0], scores.axes[1], lay.color_label, note, limit=lay.limit)


def _table(scores: Scores, lay: Layout) -> str:
    p = lay.panels[0]
    v = p.values
    R, C = v.shape
    toks = display_tokens(scores.labels["pos"]) if "pos" in scores.axes and scores.labels.get("pos") else None
    pos_axis = scores.axes.index("pos") if toks else None
    cw = 14 if C > 40 else 22
    out = ["<table class=pt-heat style='border-collapse:collapse;font:10px monospace'><tr><th></th>"]
    step = max(1, math.ceil(C / 40))
    for j in range(C):
        lab = p.cols[j] if j % step == 0 or j == C - 1 else ""
        out.append(f"<th style='writing-mode:vertical-rl;transform:rotate(180deg);font-weight:normal;"
                   f"padding:0 1px;max-height:90px;overflow:hidden'>{_e(lab)}</th>")
    out.append("</tr>")
    for r in range(R):
        out.append(f"<tr><th style='text-align:right;font-weight:normal;padding-right:4px'>{_e(p.rows[r])}</th>")
        for c in range(C):
            x = float(v[r, c])
            if p.cells is not None:
                cell = p.cells[r][c]
                tip = f"{scores.cell_label(cell)}: {x:+.4f}"
                if toks is not None and pos_axis is not None and cell[pos_axis] < len(toks):
                    tip += f" · token {toks[cell[pos_axis]]}"
            else:
                tip = f"{p.rows[r]}, {p.cols[c]}: largest |value| {x:+.4f}"
            out.append(f"<td class=pt-c title='{_e(tip)}' style='background:{color(x, lay.limit)};"
                       f"width:{cw}px;height:14px;padding:0'></td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def scores_html(scores: Scores, top: int = 10) -> str:
    """A heatmap table, the colour scale, the baselines and the top ``top`` sites, as static HTML."""
    lay = _facet_overview(scores) if layout(scores).kind == "facets" else layout(scores)
    if lay.kind == "matrix" and lay.panels[0].values.numel() > MAX_CELLS:  # pragma: no cover - very wide flat grids
        lay = layout(scores)
    b = scores.baselines
    base = " · ".join(f"{_e(k)} {v:+.4f}" for k, v in b.items() if isinstance(v, (int, float)))
    head = (f"<div><b>{_e(scores.provenance.get('method', 'Scores'))} · {_e(scores.site_kind)}</b> "
            f"{_e(' × '.join(scores.axes))} {tuple(scores.values.shape)} · {_e(color_label(scores))}"
            + (f" · baselines {base}" if base else "") + "</div>")
    axes = f"<div style='color:#555'>rows: {_e(lay.row_axis)} · columns: {_e(lay.col_axis)}"
    axes += f" · colour: {_e(lay.color_label)}, ±{lay.limit:.3g} (red up, blue down)</div>"
    note = f"<div style='color:#555'>{_e(lay.note)}</div>" if lay.note else ""
    rows = top_rows(scores, top)
    has_tok = any(r["token"] is not None for r in rows)
    tt = [f"<tr><th>#</th><th>site</th><th>{_e(scores.value_name)}</th>" + ("<th>token</th>" if has_tok else "") + "</tr>"]
    for r in rows:
        tt.append(f"<tr><td>{r['rank']}</td><td><code>{_e(r['site'])}</code></td><td>{r['value']:+.4f}</td>"
                  + (f"<td><code>{_e(r['token'] or '')}</code></td>" if has_tok else "") + "</tr>")
    table = f"<div>top {len(rows)} · {_e(order_phrase(scores))}</div><table>{''.join(tt)}</table>"
    return f"<div class=patchtrace>{head}{axes}{note}{_table(scores, lay)}{table}</div>"


def mask_html(mask: Any, top: int = 10) -> str:
    """A DBM :class:`~patchtrace.methods.dbm.result.Mask`: kept sites, held-out accuracy, per-kind heatmaps."""
    ev = getattr(mask, "evaluation", {}) or {}
    kept = list(getattr(mask, "kept", []) or [])
    acc = ev.get("accuracy")
    head = (f"<div><b>DBM mask</b> · {len(kept)} of {len(mask.sites)} components kept"
            + (f" · held-out accuracy {acc:.2f}" if isinstance(acc, (int, float)) else "") + "</div>")
    shown = ", ".join(_e(k) for k in kept[:30]) + (" …" if len(kept) > 30 else "")
    parts = [head, f"<div>kept: <code>{shown}</code></div>"]
    try:
        views = mask.to_scores()
    except Exception:  # a mask whose components do not form a grid: the summary is all there is
        views = {}
    for s in views.values():
        parts.append(scores_html(s, top))
    return f"<div class=patchtrace>{''.join(parts)}</div>"


def attribution_html(res: Any) -> str:
    """A QA :class:`~patchtrace.qa.attnattrib.Attribution`: the answer and each sentence's score, shaded."""
    ss = res.sentence_scores.float()
    lo, hi = float(ss.min()), float(ss.max())
    span = (hi - lo) or 1.0
    rows = []
    for i in range(len(ss)):
        a = (float(ss[i]) - lo) / span
        mark = " (top)" if i == res.top_sentence else ""
        rows.append(f"<tr><td>{i}{mark}</td><td style='background:rgba(241,196,15,{a:.2f})'>{float(ss[i]):.4g}</td>"
                    f"<td>{res.ranking.index(i) + 1}</td></tr>")
    steer = ""
    if "steered" in res.extras:
        steer = (f" · steered: {_e(repr(res.extras.get('unsteered_text')))} → {_e(repr(res.answer_text))}"
                 if res.extras["steered"] else " · not steered (gate closed)")
    return (f"<div class=patchtrace><div><b>Attribution</b> ({_e(res.method)}) · answer "
            f"<code>{_e(repr(res.answer_text))}</code> ← sentence {res.top_sentence}{steer}</div>"
            f"<table><tr><th>sentence</th><th>score</th><th>rank</th></tr>{''.join(rows)}</table></div>")


__all__ = ["MAX_CELLS", "attribution_html", "color", "mask_html", "scores_html"]
