"""Layouts chosen per grid shape (facets, binned overviews, plain matrices), the trace's window note,
and the HTML page's strict Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest
import torch

from patchtrace.methods.causal_tracing import window_layers
from patchtrace.report import heatmap_png, html_report
from patchtrace.report.layouts import choose, layout, window_note
from patchtrace.results import Scores


def head_pos(L=3, H=4, T=5) -> Scores:
    torch.manual_seed(0)
    return Scores(torch.randn(L, H, T), ("layer", "head", "pos"), "head",
                  labels={"pos": ["A", "Ġb", "ðŁ", "Ĺ¼", "Ċ"][:T]})


def neurons(L=4, N=1536) -> Scores:
    torch.manual_seed(1)
    return Scores(torch.randn(L, N) * 0.01, ("layer", "neuron"), "neuron", baselines={"clean": 1.0, "corrupt": 0.0},
                  extras={"patched": torch.zeros(L, N)})


def test_layout_choice_by_shape():
    assert choose(head_pos()) == "facets"
    assert choose(neurons()) == "binned"
    assert choose(Scores(torch.zeros(30, 9), ("layer", "head"), "head")) == "matrix"
    assert choose(Scores(torch.zeros(30, 14), ("layer", "pos"), "resid_pre")) == "matrix"


def test_facets_are_one_panel_per_layer():
    s = head_pos()
    lay = layout(s)
    assert [p.title for p in lay.panels] == ["L0", "L1", "L2"]
    for i, p in enumerate(lay.panels):
        assert torch.equal(p.values, s.values[i])
        assert p.rows == ["H0", "H1", "H2", "H3"]
        assert p.cells[2][3] == (i, 2, 3)
    assert lay.panels[0].cols[1:4] == ["1:␣b", "2:🗼[1/2]", "3:🗼[2/2]"]  # decoded tokens as ticks
    assert (lay.row_axis, lay.facet_axis) == ("head", "layer") and "pos" in lay.col_axis
    assert lay.limit == pytest.approx(float(s.values.abs().max()))


def test_binned_overview_keeps_the_strongest_unit_with_its_sign():
    s = neurons()
    s.values[2, 700] = -5.0  # one strong neuron: it must show in its bin, negative
    lay = layout(s)
    p = lay.panels[0]
    width = lay.bin
    assert len(p.cols) <= 48 and width * len(p.cols) >= 1536
    v = s.values.tolist()
    for r in range(4):
        for j, (a, b) in enumerate(p.spans):
            ref = max(v[r][a:b], key=abs)  # naive reference: the signed value of largest magnitude
            assert float(p.values[r, j]) == pytest.approx(ref)
    assert float(p.values[2, 700 // width]) == -5.0
    assert p.cols[0] == f"N0–N{width - 1}" and p.spans[-1][1] == 1536
    assert "bin" in lay.note and "largest-magnitude" in lay.note


def test_trace_states_its_window(tmp_path):
    prov = {"method": "causal_tracing", "config": {"kind": "mlp", "window": 10}}
    s = Scores(torch.zeros(30, 5), ("layer", "pos"), "mlp_out", provenance=prov)
    note = window_note(s)
    restored = window_layers(15, 10, 30)  # the method's own rule, around layer 15
    assert f"L−{15 - restored[0]} … L+{restored[-1] - 15}" in note and "window 10" in note
    assert window_note(Scores(torch.zeros(3, 5), ("layer", "pos"), "resid_pre")) == ""
    doc = html_report(s, tmp_path / "t.html").read_text()
    assert "mlp_out (window 10)" in doc and "window 10: each cell restores" in doc


def test_neuron_png_is_readable_size(tmp_path):
    """The issue's 2880×360 strip: the overview is a reasonable canvas with every layer labelled."""
    from PIL import Image

    s = neurons(L=30)
    w, h = Image.open(heatmap_png(s, tmp_path / "n.png")).size
    assert w <= 2600 and h >= 600, (w, h)


def test_facets_png(tmp_path):
    from PIL import Image

    w, h = Image.open(heatmap_png(head_pos(L=8, H=9, T=5), tmp_path / "f.png")).size
    assert h > 300 and w < 3000, (w, h)  # 8 facets: 6 across, 2 rows


def test_html_axis_titles_colour_label_and_strict_csp(tmp_path):
    doc = html_report([head_pos(), neurons()], tmp_path / "r.html").read_text()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', doc).group(1)
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp
    scripts = re.findall(r"<script>(.*?)</script>", doc, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp  # the one inline script, by its hash
    style = re.search(r"<style>(.*?)</style>", doc, re.S).group(1)
    assert base64.b64encode(hashlib.sha256(style.encode()).digest()).decode() in csp
    data = json.loads(re.search(r'id="pt-data">(.*?)</script>', doc, re.S).group(1))
    assert [d["layout"] for d in data] == ["facets", "binned"]
    assert [(d["row_axis"], d["col_axis"], d["color_label"]) for d in data] == [
        ("head", "position: token (example 0)", "effect (logit_diff)"),
        ("layer", "neuron (bins of 32)", "effect (logit_diff)"),
    ]
    drill = data[1]["drill"]
    assert drill["prefix"][2] + drill["units"][700] + drill["suffix"][2] == "neuron[2].n700"


def test_wide_facets_are_binned(tmp_path):
    """Layers × neurons × positions: a facet per layer whose rows are bins of neurons (not 1536-row canvases)."""
    torch.manual_seed(2)
    v = torch.randn(2, 300, 3)
    s = Scores(v, ("layer", "neuron", "pos"), "neuron", labels={"pos": ["a", "b", "c"]})
    lay = layout(s)
    p = lay.panels[1]
    assert lay.kind == "facets" and p.values.shape == (len(p.spans), 3) and len(p.spans) <= 48
    for j, (a, b) in enumerate(p.spans):
        for t in range(3):
            assert float(p.values[j, t]) == pytest.approx(max(v[1, a:b, t].tolist(), key=abs))
    doc = html_report(s, tmp_path / "r.html").read_text()
    assert '"sites": null' in doc and "bins of" in doc
    assert s._repr_html_().count("<td class=pt-c") == 2 * 43  # layers × neuron bins (max over positions)
    assert heatmap_png(s, tmp_path / "w.png").stat().st_size > 1000
