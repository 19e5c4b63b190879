"""The LocoGen report: escaped prompts, the pictures it names exist."""

from __future__ import annotations

import torch

from patchtrace.diffusion.locogen import LocoGenResult
from patchtrace.diffusion.report import locogen_report
from patchtrace.results import Scores


def test_report_escapes_prompts_and_writes_pictures(tmp_path):
    s = Scores(torch.tensor([0.1, 0.5]), ("window",), "cross_attn", "score_drop", labels={"window": ["L0-1", "L1-2"]},
               baselines={"clean": 0.9, "corrupt": 0.1})  # fmt: skip
    r = LocoGenResult(s, torch.rand(4, 1, 2, 3, 16, 16), torch.rand(4, 1, 2), [(0, 1), (1, 2)],
                      ["<script>alert(1)</script> in a box"], ["plain & simple"], [0, 1], ["a", "b", "c"])  # fmt: skip
    page = locogen_report(r, tmp_path, "style=<b>boxed</b>")
    text = page.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "plain &amp; simple" in text and "<b>boxed" not in text
    assert r.best_window() == (1, 2)
    for png in ("scores.png", "grid.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # the page's policy: no script at all, its one stylesheet allowed by hash (computed here from the page itself)
    import base64
    import hashlib
    import re

    csp = re.search(r"http-equiv='Content-Security-Policy' content=\"([^\"]+)\"", text)
    assert csp is not None and "'unsafe-inline'" not in csp.group(1) and "default-src 'none'" in csp.group(1)
    (style,) = re.findall(r"<style>(.*?)</style>", text, flags=re.S)
    want = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{want}'" in csp.group(1) and "script-src" not in csp.group(1)
    assert text.index("Content-Security-Policy") < text.index("<style>")
