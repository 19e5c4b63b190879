"""The QA attribution page: heads listed, steering shown before/after, strict CSP, everything escaped."""

from __future__ import annotations

import base64
import hashlib
import re

import torch

from patchtrace.qa.attnattrib import Attribution
from patchtrace.qa.html import render_html
from patchtrace.qa.items import QAItem

PAYLOAD = '</style><script>alert(1)</script><img src=x onerror="alert(2)">'


def pair(steered: bool | None) -> tuple[QAItem, Attribution]:
    item = QAItem(("The capital of France is Lyon.", PAYLOAD + " is not a city."), "What is the capital of France?",
                  "The capital of France is", " Lyon", 0)
    extras = {} if steered is None else {"steered": steered, "unsteered_text": " Paris"}
    res = Attribution([1], " Lyon", torch.zeros(4), torch.tensor([0.9, 0.1]), [0, 1], (0, 2), 0.01,
                      "steered" if steered else "attnattrib", None, extras=extras)  # type: ignore[arg-type]
    return item, res


def test_heads_steering_and_csp():
    page = render_html([pair(True), pair(False), pair(None)], info={"heads": ((23, 2), (29, 1)), "rule": "given"})
    assert "heads: 23.2, 29.1" in page and "heads: given" not in page
    assert "steered: &#x27; Paris&#x27; → &#x27; Lyon&#x27;" in page  # before → after
    assert "not steered (gate closed): &#x27; Lyon&#x27;" in page
    assert "the gate opened on 1 of 2 items" in page
    csp = re.search(r'Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "unsafe-inline" not in csp and "script-src 'none'" in csp
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert base64.b64encode(hashlib.sha256(style.encode()).digest()).decode() in csp
    assert "style=" not in page  # shading by class: an inline style attribute would need 'unsafe-inline'
    assert re.search(r'class="s top gold a10"', page)  # top sentence fully shaded
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;alert(1)" in page
