"""Top tables rank by importance for the direction and metric (issue: silent wrong results, item 2).

Hand-built Scores whose important site is known: denoising ranks the largest recovery first; noising
the largest damage (most negative effect); KL flips both. The CLI tables and the HTML say the order.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from patchtrace.results import ResultsError, Scores
from patchtrace.sites import Site


def _scores(direction: str, metric: str = "logit_diff") -> Scores:
    # head 0: +0.09 (irrelevant or harmful), head 1: -0.91, head 2: +0.5
    return Scores(
        torch.tensor([[0.09, -0.91, 0.5]]), ("layer", "head"), "head", metric=metric,
        labels={"layer_index": ["7"], "fixed_pos": ["-1"]},
        provenance={"direction": direction, "config": {"direction": direction}},
    )


@pytest.mark.parametrize(
    ("direction", "metric", "first"),
    [
        ("denoise", "logit_diff", 2),  # largest recovery
        ("noise", "logit_diff", 1),  # largest damage: the -0.91 head
        ("noise", "logprob", 1),
        ("denoise", "kl", 1),  # denoising reduces KL to the clean run
        ("noise", "kl", 2),  # noising raises it
    ],
)
def test_importance_order(direction, metric, first):
    s = _scores(direction, metric)
    assert s.top_k(1)[0][0] == Site("head", 7, first, -1)
    assert s.top_k(1, by="value")[0][0] == Site("head", 7, 2, -1)  # the raw order is still available


def test_bad_by_and_k():
    s = _scores("noise")
    with pytest.raises(ResultsError, match="'sideways'"):
        s.top_k(3, by="sideways")
    with pytest.raises(ResultsError, match="at least 1"):
        s.top_k(-3)


def test_masks_rank_largest_first():
    s = Scores(torch.tensor([[0.1, 0.9]]), ("layer", "head"), "head", value_name="mask")
    assert s.top_k(1)[0][0].unit == 1


def test_tables_say_the_order(tmp_path):
    from patchtrace.cli import build_app
    from patchtrace.report import write_report

    s = _scores("noise")
    s.save(tmp_path / "r")
    res = CliRunner().invoke(build_app(), ["show", str(tmp_path / "r"), "--top", "1"])
    assert res.exit_code == 0, res.output
    assert "largest damage first" in res.output
    assert "head[7].h1@-1" in res.output and "head[7].h0@-1" not in res.output
    res = CliRunner().invoke(build_app(), ["show", str(tmp_path / "r"), "--top", "1", "--by", "value"])
    assert "head[7].h2@-1" in res.output and "largest value first" in res.output
    res = CliRunner().invoke(build_app(), ["show", str(tmp_path / "r"), "--top", "-3"])
    assert res.exit_code == 2 and "--top -3" in res.output and "Traceback" not in res.output
    html = write_report(tmp_path / "r", top=1)[-1].read_text()
    assert "largest damage first" in html
    top_table = html.split("<table class=top>")[1].split("</table>")[0]
    assert "head[7].h1@-1" in top_table and "head[7].h0@-1" not in top_table
