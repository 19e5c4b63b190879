"""The HTML report's one inline script (kept here so that ``html.py`` stays about the page).

It reads the JSON data block, draws every panel on a ``<canvas>`` (axis titles, tick labels, the
last row/column always labelled), a colour bar with its label per section, and the drill-down of a
binned overview; tooltips and tables are written with ``textContent`` only. The page's
Content-Security-Policy allows exactly this script by its SHA-256 hash (no ``'unsafe-inline'``).
"""

JS = r"""
(function(){
'use strict';
const data = JSON.parse(document.getElementById('pt-data').textContent);
const tip = document.getElementById('tip');
const W = [247,247,247], RED = [178,24,43], BLUE = [33,102,172];
function color(v, lim){
  if (v === null || v === undefined) return '#ccc';
  let t = Math.max(-1, Math.min(1, v / lim));
  const e = t >= 0 ? RED : BLUE; t = Math.abs(t);
  return 'rgb(' + W.map(function(x, i){ return Math.round(x + (e[i] - x) * t); }).join(',') + ')';
}
function fmt(v, d){ return (v === null || v === undefined) ? 'n/a' : (v >= 0 ? '+' : '') + v.toFixed(d); }
function labelSteps(n, px){ const s = Math.max(1, Math.ceil(12 / px)); const out = [];
  for (let i = 0; i < n; i += s) out.push(i);
  if (out[out.length - 1] !== n - 1 && (n - 1 - out[out.length - 1]) * px >= 12) out.push(n - 1);
  return out; }
function drawPanel(canvas, P, M, lim, o){
  const R = M.length, C = R ? M[0].length : 0, ctx = canvas.getContext('2d');
  ctx.font = '11px sans-serif';
  let lw = 0; for (const s of P.rows) lw = Math.max(lw, ctx.measureText(s).width);
  let cw = 0; for (const s of P.cols) cw = Math.max(cw, ctx.measureText(s).width);
  const left = Math.ceil(lw) + 8 + (o.rowTitle ? 16 : 0), top = o.title ? 18 : 4;
  const bottom = Math.min(150, Math.ceil(cw) + 8) + (o.colTitle ? 18 : 0);
  const cell = Math.max(o.minCell || 4, Math.min(o.cellMax || 28, Math.floor((o.maxW - left - 8) / Math.max(C, 1))));
  const ch = Math.max(o.minCell || 4, Math.min(o.rowMax || 22, cell));
  canvas.width = left + C * cell + 8; canvas.height = top + R * ch + bottom;
  ctx.font = '11px sans-serif'; ctx.textBaseline = 'middle';
  for (let r = 0; r < R; r++) for (let c = 0; c < C; c++){
    ctx.fillStyle = color(M[r][c], lim); ctx.fillRect(left + c * cell, top + r * ch, cell, ch); }
  ctx.fillStyle = '#222'; ctx.textAlign = 'right';
  for (const r of labelSteps(R, ch)) ctx.fillText(P.rows[r], left - 4, top + r * ch + ch / 2);
  for (const c of labelSteps(C, cell)){ ctx.save(); ctx.translate(left + c * cell + cell / 2, top + R * ch + 4);
    ctx.rotate(-Math.PI / 2); ctx.textAlign = 'right'; ctx.fillText(P.cols[c], 0, 0); ctx.restore(); }
  ctx.font = 'bold 11px sans-serif';
  if (o.title){ ctx.textAlign = 'left'; ctx.fillText(o.title, left, 9); }
  if (o.colTitle){ ctx.textAlign = 'center'; ctx.fillText(o.colTitle, left + C * cell / 2, canvas.height - 8); }
  if (o.rowTitle){ ctx.save(); ctx.translate(8, top + R * ch / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = 'center';
    ctx.fillText(o.rowTitle, 0, 0); ctx.restore(); }
  const g = {left: left, top: top, cell: cell, ch: ch, R: R, C: C};
  canvas._geom = g; canvas.dataset.geom = JSON.stringify(g);
}
function drawLegend(canvas, lim, label){
  const ctx = canvas.getContext('2d'), w = 240;
  ctx.font = '11px sans-serif';
  canvas.width = Math.max(w + 20, Math.ceil(ctx.measureText(label).width) + 20); canvas.height = 46;
  for (let x = 0; x < w; x++){ ctx.fillStyle = color(lim * (2 * x / (w - 1) - 1), lim); ctx.fillRect(10 + x, 4, 1, 12); }
  ctx.font = '11px sans-serif'; ctx.fillStyle = '#222'; ctx.textBaseline = 'top';
  ctx.textAlign = 'left'; ctx.fillText(fmt(-lim, 3), 10, 19);
  ctx.textAlign = 'center'; ctx.fillText('0', 10 + w / 2, 19);
  ctx.textAlign = 'right'; ctx.fillText(fmt(lim, 3), 10 + w, 19);
  ctx.textAlign = 'left'; ctx.font = 'bold 11px sans-serif'; ctx.fillText(label, 10, 32);
}
function cellAt(canvas, ev){
  const g = canvas._geom, rect = canvas.getBoundingClientRect();
  const c = Math.floor((ev.clientX - rect.left - g.left) / g.cell), r = Math.floor((ev.clientY - rect.top - g.top) / g.ch);
  return (r < 0 || c < 0 || r >= g.R || c >= g.C) ? null : [r, c];
}
function show(ev, lines){
  tip.textContent = lines.join('\n'); tip.style.display = 'block';
  tip.style.left = (ev.clientX + 14) + 'px'; tip.style.top = (ev.clientY + 14) + 'px';
}
function hide(){ tip.style.display = 'none'; }
function cellLines(sec, P, r, c){
  if (!P.sites) return [sec.facet_axis + ' ' + P.title + ', ' + P.rows[r] + ', ' + P.cols[c],
    'largest |' + sec.value_name + '| in the bin: ' + fmt(P.values[r][c], 4)];
  const lines = [P.sites[r][c], sec.value_name + ' ' + fmt(P.values[r][c], 4)];
  if (P.recovery) lines.push('recovery ' + fmt(P.recovery[r][c], 3));
  if (P.tokens && P.tokens[r] && P.tokens[r][c] !== null) lines.push('token ' + P.tokens[r][c]);
  return lines;
}
function drillSite(D, r, u){ return D.sites ? D.sites[r][u] : D.prefix[r] + D.units[u] + D.suffix[r]; }
data.forEach(function(sec, i){
  let mode = 'values';
  const canvases = document.querySelectorAll('canvas.pt-panel[data-sec="' + i + '"]');
  const legend = document.querySelector('canvas.pt-legend[data-sec="' + i + '"]');
  const facets = sec.layout === 'facets';
  function drawAll(){
    const lim = sec.limits[mode] || 1;
    canvases.forEach(function(canvas){
      const P = sec.panels[+canvas.dataset.panel];
      drawPanel(canvas, P, P[mode] || P.values, lim, facets
        ? {maxW: 420, cellMax: 16, rowMax: 14, title: P.title}
        : {maxW: Math.min(window.innerWidth - 60, 1300), rowTitle: sec.row_axis, colTitle: sec.col_axis,
           minCell: sec.layout === 'binned' ? 10 : 4, rowMax: sec.layout === 'binned' ? 16 : 22});
    });
    if (legend) drawLegend(legend, lim, mode === 'recovery' ? 'normalized recovery' : sec.color_label);
    if (sec.drill) drawDrill();
  }
  // drill-down of a binned overview: every unit of one row, a row per bin, and its top table
  const D = sec.drill, dcanvas = document.querySelector('canvas.pt-drill[data-sec="' + i + '"]');
  function drawDrill(){
    const r = D.row, vals = D[mode] ? D[mode][r] : D.values[r], n = vals.length, b = D.bin, M = [];
    for (let s = 0; s < n; s += b){ const row = []; for (let k = 0; k < b; k++) row.push(s + k < n ? vals[s + k] : null); M.push(row); }
    const offs = []; for (let k = 0; k < b; k++) offs.push('+' + k);
    drawPanel(dcanvas, {rows: sec.panels[0].cols, cols: offs}, M, sec.limits[mode] || 1,
      {maxW: 900, cellMax: 18, minCell: 8, rowTitle: 'bin', colTitle: 'offset in the bin',
       title: sec.panels[0].rows[r] + ': every ' + D.unit + ' (click a row of the overview to change)'});
    const order = vals.map(function(v, u){ return u; }).filter(function(u){ return vals[u] !== null; })
      .sort(function(a, b2){ return Math.abs(vals[b2]) - Math.abs(vals[a]); }).slice(0, D.top);
    const body = document.querySelector('tbody.pt-drill-top[data-sec="' + i + '"]');
    while (body.firstChild) body.removeChild(body.firstChild);
    order.forEach(function(u, k){
      const tr = document.createElement('tr');
      [String(k + 1), drillSite(D, r, u), fmt(D.values[r][u], 4), D.recovery ? fmt(D.recovery[r][u], 3) : '']
        .forEach(function(t, j){ const td = document.createElement('td'); td.textContent = t;
          if (j >= 2) td.className = 'num'; tr.appendChild(td); });
      body.appendChild(tr);
    });
    const cap = document.querySelector('.pt-drill-title[data-sec="' + i + '"]');
    if (cap) cap.textContent = 'drill-down: ' + sec.panels[0].rows[r] + ', top ' + order.length + ' by |' + sec.value_name + '|';
  }
  canvases.forEach(function(canvas){
    const P = sec.panels[+canvas.dataset.panel];
    canvas.addEventListener('mousemove', function(ev){
      const rc = cellAt(canvas, ev); if (!rc) return hide();
      const r = rc[0], c = rc[1];
      if (!D) return show(ev, cellLines(sec, P, r, c));
      const s = P.spans[c], vals = D.values[r]; let best = s[0];
      for (let u = s[0]; u < s[1]; u++) if (Math.abs(vals[u]) > Math.abs(vals[best])) best = u;
      show(ev, [P.rows[r] + ', ' + D.unit + 's ' + P.cols[c] + ' (bin of ' + (s[1] - s[0]) + ')',
        'largest |' + sec.value_name + '|: ' + drillSite(D, r, best) + ' ' + fmt(vals[best], 4),
        'click: every ' + D.unit + ' of ' + P.rows[r]]);
    });
    canvas.addEventListener('mouseleave', hide);
    if (D) canvas.addEventListener('click', function(ev){ const rc = cellAt(canvas, ev);
      if (rc){ D.row = rc[0]; drawDrill(); } });
  });
  if (dcanvas){
    dcanvas.addEventListener('mousemove', function(ev){
      const rc = cellAt(dcanvas, ev); if (!rc) return hide();
      const u = rc[0] * D.bin + rc[1], r = D.row; if (u >= D.values[r].length) return hide();
      const lines = [drillSite(D, r, u), sec.value_name + ' ' + fmt(D.values[r][u], 4)];
      if (D.recovery) lines.push('recovery ' + fmt(D.recovery[r][u], 3));
      show(ev, lines);
    });
    dcanvas.addEventListener('mouseleave', hide);
  }
  const sel = document.querySelector('select.mode[data-sec="' + i + '"]');
  if (sel) sel.addEventListener('change', function(){ mode = sel.value; drawAll(); });
  drawAll();
});
})();
"""
