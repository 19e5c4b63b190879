"""The HTML report's inline script, executed under Node with a minimal DOM/canvas stub.

Checks that the embedded JSON parses in JavaScript, every cell is drawn, and hovering a cell puts
its site, value, recovery and token in the tooltip (through ``textContent``). Skipped without node.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from patchtrace.report import html_report
from patchtrace.results import Scores

HARNESS = r"""
const fs = require('fs');
const doc = fs.readFileSync(process.argv[1], 'utf8');
const data = doc.match(/<script type="application\/json" id="pt-data">([\s\S]*?)<\/script>/)[1];
const code = doc.match(/<script>([\s\S]*?)<\/script>/)[1];
let fills = 0;
function mkCanvas(sec){ return { dataset:{sec:String(sec), panel:'0'}, width:0, height:0, _l:{},
  getContext(){ return { measureText(s){ return {width: 6*s.length}; }, fillRect(){ fills++; }, fillText(){},
    save(){}, restore(){}, translate(){}, rotate(){} }; },
  addEventListener(ev, fn){ this._l[ev]=fn; }, getBoundingClientRect(){ return {left:0, top:0}; } }; }
const canvases = JSON.parse(data).map((_, i) => mkCanvas(i)), legend = mkCanvas(0);
const tip = { style:{}, textContent:'' };
global.window = { innerWidth: 1200 };
global.document = { getElementById(id){ return id === 'pt-data' ? { textContent: data } : tip; },
  querySelectorAll(q){ return q.startsWith('canvas.pt-panel') ? canvases : []; },
  querySelector(q){ return q.startsWith('canvas.pt-legend') ? legend : null; } };
eval(code);
const c = canvases[0], g = c._geom, out = [];
for (const [r, col] of JSON.parse(process.argv[2])) {
  c._l.mousemove({clientX: g.left + g.cell*col + 1, clientY: g.top + g.ch*r + 1});
  out.push(tip.textContent);
}
console.log(JSON.stringify({fills, tips: out}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_inline_script_draws_and_hovers(tmp_path):
    tokens = ["A", "</script><b>x", " to"]
    v = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    s = Scores(v, ("layer", "pos"), "resid_pre", baselines={"clean": 4.0, "corrupt": -4.0},
               labels={"pos": tokens, "pos_index": ["0", "1", "2"]}, extras={"patched": v - 4.0})
    path = html_report(s, tmp_path / "r.html")
    res = subprocess.run(["node", "-e", HARNESS, str(path), json.dumps([[1, 1], [0, 2]])],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["fills"] >= 6  # every cell painted (plus the legend)
    assert out["tips"][0].split("\n") == ["resid_pre[1]@1", "effect +3.0000", "recovery +0.375",  # (−1 − (−4)) / 8
                                          'token </script><b>x']
    assert out["tips"][1].split("\n")[:2] == ["resid_pre[0]@2", "effect +0.5000"]
