"""Notebook rendering (``_repr_html_``) of Scores, DBM masks and QA attributions: static, escaped, per layout."""

from __future__ import annotations

import re

import torch

from patchtrace.report.inline import attribution_html, color, scores_html
from patchtrace.results import Scores

PAYLOAD = "</td><script>alert(1)</script><img src=x onerror=alert(2)>"


def test_colours_are_the_reports_scale():
    assert color(2.0, 2.0) == "rgb(178,24,43)" and color(-2.0, 2.0) == "rgb(33,102,172)"
    assert color(0.0, 2.0) == "rgb(247,247,247)" and color(float("nan"), 1.0) == "#ccc"
    assert color(1.0, 2.0) == "rgb(213,136,145)"  # halfway: 247 + (178 − 247)/2 = 212.5 → 213, as the page rounds


def test_scores_html_matrix_escaped():
    v = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -2.0]])
    s = Scores(v, ("layer", "pos"), "resid_pre", labels={"pos": ["A", "Ġb", PAYLOAD]},
               provenance={"method": PAYLOAD})
    page = s._repr_html_()
    assert page.count("<td class=pt-c") == 6
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;alert(1)" in page
    cells = re.findall(r"title='([^']*)' style='background:([^;]+);", page)
    assert cells[2] == ("resid_pre[0]@2: +2.0000 · token " + PAYLOAD.replace(" ", "␣")
                        .replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"), "rgb(178,24,43)")
    assert cells[5][1] == "rgb(33,102,172)"  # −2 at the limit: full blue


def test_scores_html_facets_and_bins():
    v = torch.zeros(2, 3, 4)
    v[1, 2, 3] = -5.0
    page = scores_html(Scores(v, ("layer", "head", "pos"), "head", labels={"pos": list("abcd")}))
    assert page.count("<td class=pt-c") == 6  # layers × heads, the largest |value| over positions
    assert "head[1].h2@3: -5.0000 · token d" in page and "largest-magnitude value over pos" in page
    n = Scores(torch.zeros(3, 1000), ("layer", "neuron"), "neuron")
    assert scores_html(n).count("<td class=pt-c") == 3 * 48  # the binned overview, not 3000 cells


def test_attribution_html():
    from patchtrace.qa.attnattrib import Attribution

    r = Attribution([1], " <b>Lyon", torch.zeros(3), torch.tensor([0.2, 0.9]), [1, 0], (0, 1), 0.0, "steered", None,  # type: ignore[arg-type]
                    extras={"steered": True, "unsteered_text": " Paris"})
    page = r._repr_html_()
    assert "&lt;b&gt;Lyon" in page and "<b>Lyon" not in page
    assert "steered: &#x27; Paris&#x27; → " in page and "1 (top)" in page
    assert attribution_html(r) == page
