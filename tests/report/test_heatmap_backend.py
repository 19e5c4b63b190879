"""Drawing a heatmap leaves matplotlib's global state alone (the caller's backend, pyplot's figures)."""

from __future__ import annotations

import torch

from patchtrace.report.heatmap import heatmap_png
from patchtrace.results import Scores


def test_heatmap_keeps_the_callers_backend(tmp_path):
    import matplotlib

    matplotlib.use("svg")  # a caller's choice (a notebook would have its inline backend)
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    s = Scores(torch.tensor([[0.5, -1.0], [2.0, 0.0]]), ("layer", "head"), "head")
    out = heatmap_png(s, tmp_path / "h.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend().lower() == "svg"
    assert plt.get_fignums() == before
