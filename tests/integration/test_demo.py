"""`patchtrace demo` end to end on the bundled SmolLM2-135M-Instruct.

IOI name movers sit late in this model (the peer baseline's top heads are L23.H3, L20.H0, L29.H1),
so the demo's top head must be a head of layer ≥ 15 with a positive effect. Run with 4 examples to
keep the test short; the ranking of the top heads is the same as with 16.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from patchtrace.cli import build_app
from patchtrace.results import Scores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.smollm2
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(build_app(), ["demo", "--out", str(out), "--n", "4", "--top", "5", "-q"])
    assert res.exit_code == 0, res.output
    for f in ("head/scores.json", "head/scores.safetensors", "head/heatmap.png",
              "resid_pre/scores.json", "resid_pre/heatmap.png", "report.html"):
        assert (out / f).is_file(), f
    assert (out / "head" / "heatmap.png").read_bytes()[:8] == PNG_MAGIC

    heads = Scores.load(out / "head")
    assert heads.shape == (30, 9)
    site, value = heads.top_k(1)[0]
    assert site.kind == "head" and site.layer is not None and site.layer >= 15, site
    assert value > 0
    assert heads.baselines["clean"] > 0 > heads.baselines["corrupt"]  # the model does IOI
    assert str(site) in res.output and "total wall time" in res.output

    resid = Scores.load(out / "resid_pre")
    assert resid.axes == ("layer", "pos") and resid.shape == (30, 14)
    # clean and corrupt differ in one token (the S name). Restoring the stream entering layer 0 at that
    # position reproduces the clean run exactly (effect = gap); at any other position it changes nothing.
    gap = resid.baselines["clean"] - resid.baselines["corrupt"]
    layer0 = resid.values[0]
    hit = [p for p in range(14) if abs(float(layer0[p]) - gap) < 1e-3]
    assert len(hit) == 1, layer0
    assert all(abs(float(layer0[p])) < 1e-3 for p in range(14) if p != hit[0]), layer0
    html = (out / "report.html").read_text()
    assert str(site) in html and "head" in html and "resid_pre" in html
