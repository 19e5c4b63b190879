"""A single self-contained HTML report: interactive heatmaps, top-k tables, baselines and provenance.

The file works offline and makes no request of any kind: no CDN, no fonts, no images from elsewhere.
A Content-Security-Policy meta tag (``default-src 'none'``) makes browsers enforce that, and it
allows the page's one inline script and one stylesheet by their SHA-256 hashes only
(:func:`content_security_policy`; no ``'unsafe-inline'``), so even a string that escaped the escaping
could not run. The heatmaps are drawn by that script on ``<canvas>`` elements, in the layout chosen
for the grid's shape (:mod:`patchtrace.report.layouts`), from data embedded as JSON; hovering a cell
shows its site string, value, normalized recovery and prompt token (decoded, :mod:`patchtrace.tokens`).

Prompt-derived text is untrusted (a task file can contain anything, including ``</script>``).
Therefore:

* every string placed in HTML text or attributes goes through :func:`html.escape` (quotes too);
* the JSON data block is written by :func:`script_json`, which escapes ``<``, ``>`` and ``&`` as
  ``\\u003c``, ``\\u003e``, ``\\u0026`` (still valid JSON, but it can never close the ``<script>``
  element or open a comment), and the page reads it with ``JSON.parse``;
* the script writes strings into the page only through ``textContent`` (never ``innerHTML``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from patchtrace.report._js import JS as _JS
from patchtrace.report.layouts import Layout, layout
from patchtrace.report.summary import order_phrase, provenance_summary, top_rows
from patchtrace.results import Scores
from patchtrace.tokens import display_tokens


def script_json(data: Any) -> str:
    """JSON for embedding inside ``<script>``: ``<``, ``>``, ``&`` and U+2028/2029 escaped; NaN/inf → null."""
    text = json.dumps(_clean(data), ensure_ascii=False, allow_nan=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _normalized(scores: Scores) -> Any:
    try:
        return scores.normalized().float()
    except Exception:
        return None


def csp_hash(text: str) -> str:
    """The CSP source expression that allows exactly this inline script or style: ``'sha256-…'``."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def content_security_policy(scripts: Sequence[str] = (), styles: Sequence[str] = ()) -> str:
    """A policy that allows nothing but the given inline scripts and styles (by hash) and ``data:`` images.

    No ``'unsafe-inline'``: even if an injected string escaped the HTML escaping, a browser would
    refuse to run it, because its hash is not listed.
    """
    script = " ".join(csp_hash(x) for x in scripts) or "'none'"
    style = " ".join(csp_hash(x) for x in styles) or "'none'"
    return f"default-src 'none'; script-src {script}; style-src {style}; img-src data:"


def _cell_tokens(scores: Scores, cells: list[list[tuple[int, ...]]]) -> list[list[str | None]] | None:
    toks = scores.labels.get("pos") if "pos" in scores.axes else None
    if not toks:
        return None
    shown = display_tokens(toks)
    j = scores.axes.index("pos")
    return [[shown[c[j]] if c[j] < len(shown) else None for c in row] for row in cells]


def _drill(scores: Scores, norm: Any, lay: Layout) -> dict[str, Any]:
    """Every unit of a binned grid for the drill-down: values, recovery, and site strings as a
    template (``prefix[row] + units[u] + suffix[row]``, checked) or in full."""
    v = scores.values.detach().float()
    R, C = v.shape
    short = [[None if not math.isfinite(x) else float(f"{x:.6g}") for x in row] for row in v.tolist()]
    out: dict[str, Any] = {"bin": lay.bin, "unit": scores.axes[1], "values": short, "top": 10,
                           "row": int(scores.top_indices(1, "abs")[0][0]) if v.numel() else 0}
    if norm is not None:
        out["recovery"] = [[None if not math.isfinite(x) else float(f"{x:.4g}") for x in row] for row in norm.tolist()]
    first = [scores.cell_label((0, u)) for u in range(C)]
    pre = _common_prefix(first[0], first[-1]) if C > 1 else first[0]
    suf = _common_prefix(first[0][::-1], first[-1][::-1])[::-1] if C > 1 else ""
    units = [f[len(pre):len(f) - len(suf)] for f in first]
    prefix, suffix, ok = [], [], C > 1
    for r in range(R):
        lab = scores.cell_label((r, 0))
        p, sfx = lab[:len(lab) - len(units[0]) - len(suf)], suf
        ok = ok and all(p + units[u] + sfx == scores.cell_label((r, u)) for u in {0, C // 2, C - 1})
        prefix.append(p)
        suffix.append(sfx)
    if ok and all(pre + u + suf == f for u, f in zip(units, first, strict=True)):
        out.update(prefix=prefix, suffix=suffix, units=units)
    else:
        out["sites"] = [[scores.cell_label((r, u)) for u in range(C)] for r in range(R)]
    return out


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    # never split a number: back off to the start of the digits
    while n > 0 and a[n - 1].isdigit():
        n -= 1
    return a[:n]


def _section_data(name: str, scores: Scores) -> dict[str, Any]:
    norm = _normalized(scores)
    if norm is not None and norm.shape != scores.values.shape:
        norm = None
    lay = layout(scores)
    rec = layout(scores, norm, normalized=True) if norm is not None else None
    panels = []
    for k, p in enumerate(lay.panels):
        panels.append({
            "title": p.title, "rows": p.rows, "cols": p.cols, "values": p.values.tolist(),
            "recovery": rec.panels[k].values.tolist() if rec is not None else None,
            "sites": [[scores.cell_label(c) for c in row] for row in p.cells] if p.cells is not None else None,
            "tokens": _cell_tokens(scores, p.cells) if p.cells is not None else None,
            "spans": p.spans,
        })
    return {
        "name": name, "kind": scores.site_kind, "value_name": scores.value_name, "metric": scores.metric,
        "layout": lay.kind, "row_axis": lay.row_axis, "col_axis": lay.col_axis, "facet_axis": lay.facet_axis,
        "color_label": lay.color_label, "note": lay.note, "panels": panels,
        "limits": {"values": lay.limit, "recovery": rec.limit if rec is not None else None},
        "drill": _drill(scores, norm, lay) if lay.kind == "binned" else None,
    }


def _panels_html(i: int, scores: Scores) -> str:
    lay = layout(scores)
    if lay.kind == "facets":
        canvases = "".join(f'<canvas class=pt-panel data-sec="{i}" data-panel="{k}"></canvas>' for k in range(len(lay.panels)))
        return (f"<p class=axes>one heatmap per {_e(lay.facet_axis)} · rows: {_e(lay.row_axis)} · "
                f"columns: {_e(lay.col_axis)}</p><div class=facets>{canvases}</div>")
    html_ = f'<div class=wrap><canvas class=pt-panel data-sec="{i}" data-panel="0"></canvas></div>'
    if lay.kind == "binned":
        rec = "<th>recovery</th>" if _normalized(scores) is not None else ""
        html_ += (f'<h3 class=pt-drill-title data-sec="{i}">drill-down</h3><div class=drill>'
                  f'<div class=wrap><canvas class=pt-drill data-sec="{i}"></canvas></div>'
                  f'<table class=top><thead><tr><th>#</th><th>site</th><th>{_e(scores.value_name)}</th>{rec}</tr></thead>'
                  f'<tbody class=pt-drill-top data-sec="{i}"></tbody></table></div>')
    return html_


def _section_html(i: int, name: str, scores: Scores, top: int, by: str = "importance") -> str:
    b = scores.baselines
    norm = _normalized(scores)
    rows = top_rows(scores, top, normalized=norm, by=by)
    base = " · ".join(f"{_e(k)} <b>{v:+.4f}</b>" for k, v in b.items() if isinstance(v, (int, float)))
    if "clean" in b and "corrupt" in b:
        base += f" · gap <b>{b['clean'] - b['corrupt']:+.4f}</b>"
    has_tok = any(r["token"] is not None for r in rows)
    head = "<tr><th>#</th><th>site</th><th>" + _e(scores.value_name) + "</th>"
    head += "<th>recovery</th>" if norm is not None else ""
    head += "<th>token</th>" if has_tok else ""
    body = []
    for r in rows:
        tr = f"<tr><td>{r['rank']}</td><td><code>{_e(r['site'])}</code></td><td class=num>{r['value']:+.4f}</td>"
        if norm is not None:
            tr += f"<td class=num>{'' if r['recovery'] is None else format(r['recovery'], '+.3f')}</td>"
        if has_tok:
            tr += f"<td><code>{_e(r['token'] or '')}</code></td>"
        body.append(tr + "</tr>")
    prov = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in provenance_summary(scores))
    toks = scores.labels.get("pos")
    prompt = ""
    if toks:
        prompt = "<p class=prompt>prompt tokens (example 0; ␣ = a leading space): " + "".join(
            f"<span class=tok>{_e(t)}</span>" for t in display_tokens(toks)
        ) + "</p>"
    note = layout(scores).note
    mode = ""
    if norm is not None:
        mode = (
            f"<label>show <select data-sec='{i}' class=mode><option value=values>{_e(scores.value_name)}</option>"
            "<option value=recovery>normalized recovery</option></select></label>"
        )
    title = name or scores.site_kind
    window = (scores.provenance.get("config") or {}).get("window") if note.startswith("window") else None
    title = _e(title + (f" (window {window})" if window and "window" not in title else ""))
    return f"""
<section id="sec{i}">
<h2>{title}</h2>
<p class=base>baselines ({_e(scores.metric)}): {base or "n/a"}</p>
{prompt}
{f"<p class=note>{_e(note)}</p>" if note else ""}
<div class=controls>{mode}<canvas class=pt-legend data-sec="{i}"></canvas></div>
{_panels_html(i, scores)}
<h3>top {len(rows)} · {_e(order_phrase(scores, by))}</h3>
<table class=top>{head}</tr>{"".join(body)}</table>
<details><summary>provenance</summary><table class=prov>{prov}</table>
<pre>{_e(json.dumps(_clean(scores.provenance), indent=2, default=str))}</pre></details>
</section>"""


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.wrap{overflow:auto;max-width:100%}canvas{display:block}
#tip{position:fixed;pointer-events:none;background:#111;color:#fff;padding:6px 8px;border-radius:4px;
font:12px/1.35 ui-monospace,monospace;white-space:pre;display:none;z-index:10}
.tok{background:#f1f1f1;border:1px solid #ddd;margin:1px;padding:0 3px;white-space:pre;font-family:ui-monospace,monospace}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:400px}
.note,.axes{color:#555}.controls{display:flex;gap:24px;align-items:center;flex-wrap:wrap}
.facets{display:flex;flex-wrap:wrap;gap:10px 14px}.drill{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
"""


def html_report(
    scores: Scores | Mapping[str, Scores] | Sequence[Scores],
    path: str | Path,
    *,
    title: str = "patchtrace report",
    top: int = 15,
    note: str | None = None,
    by: str = "importance",
) -> Path:
    """Write a self-contained HTML report of one or several :class:`Scores` to ``path``.

    Args:
        scores: one Scores, a list, or a mapping section name → Scores (one section each).
        path: output ``.html`` file (parent folders created).
        title: page title (escaped).
        top: rows in each top-k table.
        note: an optional line under the title (escaped), e.g. the wall time of the run.
        by: order of the top tables (see :meth:`Scores.ranking`; default: importance for the
            direction and metric, and the table says which).

    Returns:
        the path written.
    """
    if isinstance(scores, Scores):
        items = [("", scores)]
    elif isinstance(scores, Mapping):
        items = list(scores.items())
    else:
        items = [("", s) for s in scores]
    sections = "".join(_section_html(i, name, s, top, by) for i, (name, s) in enumerate(items))
    data = script_json([_section_data(name or s.site_kind, s) for name, s in items])
    csp = content_security_policy([_JS], [_CSS])
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
{f"<p>{_e(note)}</p>" if note else ""}
<p>Red: the patch raises the metric; blue: it lowers it (colour scale centred at 0). Hover a cell for details.</p>
{sections}
<div id="tip"></div>
<script type="application/json" id="pt-data">{data}</script>
<script>{_JS}</script>
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out


__all__ = ["content_security_policy", "csp_hash", "html_report", "script_json"]
