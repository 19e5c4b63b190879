"""Reports: PNG heatmaps, the offline HTML page and its escaping of prompt-derived text.

The escaping test puts script-injection payloads into every prompt-derived string a report shows
(tokens, task name, task params) and checks that no raw tag survives while the escaped form is
present (so the test is not passing because the text was simply dropped).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from patchtrace.report import find_results, heatmap_png, html_report, write_report
from patchtrace.report.html import script_json
from patchtrace.report.summary import as_matrix, top_rows
from patchtrace.results import ResultsError, Scores
from patchtrace.tokens import display_tokens

PAYLOAD_SCRIPT = "</script><script>alert(1)</script>"
PAYLOAD_IMG = '<img src=x onerror="alert(2)">'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def layer_pos_scores(tokens: list[str], task_name: str = "toy", note: str = PAYLOAD_IMG) -> Scores:
    L, T = 3, len(tokens)
    values = torch.arange(L * T, dtype=torch.float32).reshape(L, T) - 4.0
    clean, corrupt = 2.0, -1.0
    return Scores(
        values=values,
        axes=("layer", "pos"),
        site_kind="resid_pre",
        metric="logit_diff",
        baselines={"clean": clean, "corrupt": corrupt},
        labels={"pos": tokens, "pos_index": [str(i) for i in range(T)]},
        extras={"patched": values + corrupt},
        provenance={"method": "activation_patching", "direction": "denoise",
                    "task": {"name": task_name, "n": 1, "params": {"note": note}}},
    )


def extract_data(doc: str) -> list[dict]:
    m = re.search(r'<script type="application/json" id="pt-data">(.*?)</script>', doc, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_html_escapes_prompt_derived_strings(tmp_path):
    tokens = ["Hello", PAYLOAD_SCRIPT, PAYLOAD_IMG, "&amp;", "end"]
    s = layer_pos_scores(tokens, task_name=PAYLOAD_SCRIPT)
    doc = html_report({PAYLOAD_IMG: s}, tmp_path / "r.html", title=PAYLOAD_SCRIPT, top=50).read_text()

    # no raw injected markup anywhere
    assert "<script>alert(1)" not in doc
    assert "<img" not in doc
    assert doc.count("<script") == 2  # our data block and our code, nothing else
    assert doc.count("</script>") == 2
    # non-vacuity: the payloads are there, escaped, in the HTML text and in the JSON block
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in doc
    assert "\\u003c/script\\u003e\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in doc
    assert "&amp;amp;" in doc  # an ampersand token is escaped, not interpreted
    # the JSON decodes back to exactly the original strings and values
    data = extract_data(doc)
    assert data[0]["name"] == PAYLOAD_IMG
    panel = data[0]["panels"][0]
    assert panel["cols"][1] == "1:" + PAYLOAD_SCRIPT
    assert [panel["tokens"][0][j] for j in range(5)] == display_tokens(tokens)
    assert display_tokens(tokens)[2] == PAYLOAD_IMG.replace(" ", "␣")  # decoded for display, not sanitised away
    assert panel["values"] == s.values.tolist()
    assert panel["recovery"][0][0] == pytest.approx((float(s.values[0, 0])) / 3.0)


def test_html_is_offline(tmp_path):
    doc = html_report(layer_pos_scores(["a", "b"], note="plain"), tmp_path / "r.html").read_text()
    assert "http://" not in doc and "https://" not in doc
    assert not re.search(r"\b(src|href)\s*=", doc)
    assert "default-src 'none'" in doc
    assert "innerHTML" not in doc


def test_script_json_handles_nan_and_separators():
    text = script_json({"v": [float("nan"), float("inf"), 1.5], "s": "a\u2028b</x>&"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"v": [None, None, 1.5], "s": "a\u2028b</x>&"}


def test_heatmap_png_with_token_labels(tmp_path):
    # '$' would start matplotlib mathtext; the labels must be drawn literally
    s = layer_pos_scores(["When", " $x$", PAYLOAD_SCRIPT, "Ġto", "$"])
    p = heatmap_png(s, tmp_path / "sub" / "h.png")
    assert p.read_bytes()[:8] == PNG_MAGIC
    q = heatmap_png(s, tmp_path / "n.png", values=s.normalized(), normalized=True)
    assert q.read_bytes()[:8] == PNG_MAGIC


def test_heatmap_colours_centred_at_zero(tmp_path):
    """A zero cell is drawn (near) white even when the values are lopsided (max 9, min -1)."""
    import matplotlib.image as mpimg

    s = Scores(torch.tensor([[9.0, 0.0, -1.0]]), ("layer", "head"), "head")
    p = heatmap_png(s, tmp_path / "c.png", title="")
    img = mpimg.imread(p)[..., :3]
    # locate the three cells by colour: strongly red, near-white, light blue must all appear
    px = img.reshape(-1, 3)
    red = ((px[:, 0] > 0.35) & (px[:, 1] < 0.1) & (px[:, 2] < 0.15)).any()
    white = ((px > 0.95).all(1)).any()
    light_blue = ((px[:, 2] > px[:, 0] + 0.02) & (px[:, 2] > 0.9) & (px[:, 0] > 0.8)).any()
    assert red and white and light_blue


def test_importing_report_does_not_import_matplotlib():
    code = "import sys, patchtrace.report, patchtrace.cli; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_as_matrix_flattens_trailing_axes():
    v = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    s = Scores(v, ("layer", "head", "pos"), "head", labels={"pos": list("abcd")})
    m = as_matrix(s)
    assert m.values.shape == (2, 12)
    for layer in range(2):
        for h in range(3):
            for t in range(4):
                assert m.values[layer, h * 4 + t] == v[layer, h, t]
                assert m.cells[layer][h * 4 + t] == (layer, h, t)
    assert m.rows == ["L0", "L1"] and m.cols[5] == "H1@1:b"


def test_top_rows_against_sort():
    torch.manual_seed(0)
    v = torch.randn(4, 5)
    s = Scores(v, ("layer", "head"), "head")
    rows = top_rows(s, 6)
    ref = sorted(((float(v[i, j]), f"head[{i}].h{j}") for i in range(4) for j in range(5)), reverse=True)[:6]
    assert [(r["value"], r["site"]) for r in rows] == [(pytest.approx(a), b) for a, b in ref]
    neg = top_rows(s, 1, by="neg")[0]
    assert neg["value"] == pytest.approx(float(v.min()))


def test_write_report_on_folder_of_results(tmp_path):
    a = layer_pos_scores(["x", "y"])
    b = Scores(torch.tensor([[1.0, -2.0], [0.5, 0.0]]), ("layer", "head"), "head", baselines={"clean": 1.0, "corrupt": 0.0})
    a.save(tmp_path / "resid_pre")
    b.save(tmp_path / "head")
    assert set(find_results(tmp_path)) == {"resid_pre", "head"}
    files = write_report(tmp_path, note="took 1 s")
    assert [f.name for f in files] == ["heatmap.png", "heatmap.png", "report.html"]
    assert all(f.is_file() for f in files)
    data = extract_data(files[-1].read_text())
    assert {d["kind"] for d in data} == {"resid_pre", "head"}
    assert next(d for d in data if d["kind"] == "head")["panels"][0]["values"] == [[1.0, -2.0], [0.5, 0.0]]
    with pytest.raises(ResultsError, match="no such folder"):
        write_report(tmp_path / "head" / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="no patchtrace results"):
        write_report(tmp_path / "empty")
