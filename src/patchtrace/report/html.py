"""A single self-contained HTML report: interactive heatmaps, top-k tables, baselines and provenance.

The file works offline and makes no request of any kind: no CDN, no fonts, no images from elsewhere.
A Content-Security-Policy meta tag (``default-src 'none'``) makes browsers enforce that. The
heatmaps are drawn by a small inline script on a ``<canvas>`` from data embedded as JSON; hovering a
cell shows its site string, value, normalized recovery and prompt token.

Prompt-derived text is untrusted (a task file can contain anything, including ``</script>``).
Therefore:

* every string placed in HTML text or attributes goes through :func:`html.escape` (quotes too);
* the JSON data block is written by :func:`script_json`, which escapes ``<``, ``>`` and ``&`` as
  ``\\u003c``, ``\\u003e``, ``\\u0026`` (still valid JSON, but it can never close the ``<script>``
  element or open a comment), and the page reads it with ``JSON.parse``;
* the script writes strings into the page only through ``textContent`` (never ``innerHTML``).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from patchtrace.report.summary import as_matrix, display_token, order_phrase, provenance_summary, top_rows
from patchtrace.results import Scores


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


def _section_data(name: str, scores: Scores) -> dict[str, Any]:
    norm = _normalized(scores)
    m = as_matrix(scores)
    rec = as_matrix(scores, norm).values.tolist() if norm is not None and norm.shape == scores.values.shape else None
    toks = scores.labels.get("pos") if "pos" in scores.axes else None
    pos_axis = scores.axes.index("pos") if "pos" in scores.axes else None
    sites, tokens = [], []
    for row in m.cells:
        sites.append([scores.cell_label(c) for c in row])
        if toks and pos_axis is not None:
            tokens.append([display_token(toks[c[pos_axis]]) if c[pos_axis] < len(toks) else None for c in row])
    return {
        "name": name,
        "kind": scores.site_kind,
        "value_name": scores.value_name,
        "metric": scores.metric,
        "rows": m.rows,
        "cols": m.cols,
        "row_axis": m.row_axis,
        "col_axis": m.col_axis,
        "values": m.values.tolist(),
        "recovery": rec,
        "sites": sites,
        "tokens": tokens or None,
    }


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
        tr = f"<tr><td>{r['rank']}</td><td><code>{_e(r['site'])}</code></td><td>{r['value']:+.4f}</td>"
        if norm is not None:
            tr += f"<td>{'' if r['recovery'] is None else format(r['recovery'], '+.3f')}</td>"
        if has_tok:
            tr += f"<td><code>{_e(display_token(r['token'] or ''))}</code></td>"
        body.append(tr + "</tr>")
    prov = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in provenance_summary(scores))
    toks = scores.labels.get("pos")
    prompt = ""
    if toks:
        prompt = "<p class=prompt>prompt tokens (example 0): " + "".join(
            f"<span class=tok>{_e(display_token(t))}</span>" for t in toks
        ) + "</p>"
    mode = ""
    if norm is not None:
        mode = (
            f"<label>show <select data-sec='{i}' class=mode><option value=values>{_e(scores.value_name)}</option>"
            "<option value=recovery>normalized recovery</option></select></label>"
        )
    title = _e(name or scores.site_kind)
    return f"""
<section id="sec{i}">
<h2>{title}</h2>
<p class=base>baselines ({_e(scores.metric)}): {base or "n/a"}</p>
{prompt}
<div class=controls>{mode}</div>
<div class=wrap><canvas data-sec="{i}"></canvas></div>
<h3>top {len(rows)} · {_e(order_phrase(scores, by))}</h3>
<table class=top>{head}</tr>{"".join(body)}</table>
<details><summary>provenance</summary><table class=prov>{prov}</table>
<pre>{_e(json.dumps(_clean(scores.provenance), indent=2, default=str))}</pre></details>
</section>"""


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
table.top td:nth-child(3),table.top td:nth-child(4){text-align:right;font-variant-numeric:tabular-nums}
.wrap{overflow:auto;max-width:100%}canvas{display:block}
#tip{position:fixed;pointer-events:none;background:#111;color:#fff;padding:6px 8px;border-radius:4px;
font:12px/1.35 ui-monospace,monospace;white-space:pre;display:none;z-index:10}
.tok{background:#f1f1f1;border:1px solid #ddd;margin:1px;padding:0 3px;white-space:pre;font-family:ui-monospace,monospace}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:400px}
"""

_JS = r"""
(function(){
const data = JSON.parse(document.getElementById('pt-data').textContent);
const tip = document.getElementById('tip');
function color(v, lim){
  if (v === null || v === undefined) return '#ccc';
  let t = Math.max(-1, Math.min(1, v / lim));
  const w=[247,247,247], r=[178,24,43], b=[33,102,172];
  const e = t >= 0 ? r : b; t = Math.abs(t);
  const c = w.map((x,i)=>Math.round(x + (e[i]-x)*t));
  return 'rgb('+c.join(',')+')';
}
function fmt(v, d){ return (v === null || v === undefined) ? 'n/a' : (v>=0?'+':'') + v.toFixed(d); }
function draw(canvas, sec, mode){
  const M = sec[mode] || sec.values, R = M.length, C = R ? M[0].length : 0;
  let lim = 0; for (const row of M) for (const v of row) if (v !== null) lim = Math.max(lim, Math.abs(v));
  if (!(lim > 0)) lim = 1;
  const ctx = canvas.getContext('2d'); ctx.font = '11px sans-serif';
  let lw = 0; for (const s of sec.rows) lw = Math.max(lw, ctx.measureText(s).width);
  let cw = 0; for (const s of sec.cols) cw = Math.max(cw, ctx.measureText(s).width);
  const left = Math.ceil(lw) + 10, bottom = Math.min(160, Math.ceil(cw) + 12), top = 8, legend = 70;
  const cell = Math.max(4, Math.min(28, Math.floor((Math.min(window.innerWidth - 80, 1300) - left - legend) / Math.max(C,1))));
  const ch = Math.max(4, Math.min(22, cell));
  canvas.width = left + C*cell + legend; canvas.height = top + R*ch + bottom;
  ctx.font = '11px sans-serif'; ctx.textBaseline = 'middle';
  for (let r=0;r<R;r++) for (let c=0;c<C;c++){ ctx.fillStyle = color(M[r][c], lim); ctx.fillRect(left+c*cell, top+r*ch, cell, ch); }
  ctx.fillStyle = '#222'; ctx.textAlign = 'right';
  const rs = Math.max(1, Math.ceil(11/ch));
  for (let r=0;r<R;r+=rs) ctx.fillText(sec.rows[r], left-4, top+r*ch+ch/2);
  const cs = Math.max(1, Math.ceil(11/cell));
  for (let c=0;c<C;c+=cs){ ctx.save(); ctx.translate(left+c*cell+cell/2, top+R*ch+4); ctx.rotate(-Math.PI/2);
    ctx.textAlign='right'; ctx.fillText(sec.cols[c], 0, 0); ctx.restore(); }
  const lx = left + C*cell + 16, lh = Math.max(60, R*ch);
  for (let y=0;y<lh;y++){ ctx.fillStyle = color(lim*(1-2*y/lh), lim); ctx.fillRect(lx, top+y, 12, 1); }
  ctx.fillStyle='#222'; ctx.textAlign='left';
  ctx.fillText(fmt(lim,2), lx+15, top+5); ctx.fillText('0', lx+15, top+lh/2); ctx.fillText(fmt(-lim,2), lx+15, top+lh-5);
  canvas._geom = {left, top, cell, ch, R, C};
}
document.querySelectorAll('canvas[data-sec]').forEach(function(canvas){
  const sec = data[+canvas.dataset.sec]; let mode = 'values';
  draw(canvas, sec, mode);
  const sel = document.querySelector('select.mode[data-sec="'+canvas.dataset.sec+'"]');
  if (sel) sel.addEventListener('change', function(){ mode = sel.value; draw(canvas, sec, mode); });
  canvas.addEventListener('mousemove', function(ev){
    const g = canvas._geom, rect = canvas.getBoundingClientRect();
    const c = Math.floor((ev.clientX - rect.left - g.left)/g.cell), r = Math.floor((ev.clientY - rect.top - g.top)/g.ch);
    if (r<0||c<0||r>=g.R||c>=g.C){ tip.style.display='none'; return; }
    let lines = [sec.sites[r][c], sec.value_name + ' ' + fmt(sec.values[r][c], 4)];
    if (sec.recovery) lines.push('recovery ' + fmt(sec.recovery[r][c], 3));
    if (sec.tokens && sec.tokens[r] && sec.tokens[r][c] !== null) lines.push('token ' + JSON.stringify(sec.tokens[r][c]));
    tip.textContent = lines.join('\n'); tip.style.display = 'block';
    tip.style.left = (ev.clientX + 14) + 'px'; tip.style.top = (ev.clientY + 14) + 'px';
  });
  canvas.addEventListener('mouseleave', function(){ tip.style.display='none'; });
});
})();
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
    csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"
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


__all__ = ["html_report", "script_json"]
