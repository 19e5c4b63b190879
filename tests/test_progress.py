"""Progress that tells the truth: bars reach their totals, appear only once there is progress, print
plain lines when the output is not a terminal, and third-party bars stay quiet unless asked."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from patchtrace.progress import bar, quiet_third_party, step


def file_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


def test_plain_lines_when_not_a_terminal():
    con, buf = file_console()
    with bar("patching head", con, every=0.0) as b:
        for d in range(1, 4):
            b.update(d, 3)
    lines = buf.getvalue().splitlines()
    assert [ln.split(" · ")[0] for ln in lines] == ["patching head: 1/3 (33%)", "patching head: 2/3 (67%)",
                                                     "patching head: 3/3 (100%)"]


def test_throttled_but_the_last_state_is_printed():
    con, buf = file_console()
    with bar("x", con, every=3600.0) as b:
        for d in range(1, 101):
            b.update(d, 100)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("x: 1/100") and lines[1].startswith("x: 100/100 (100%)")


def test_no_bar_before_an_error():
    """The issue's `0/?` bar printed right before an error: nothing is drawn until the first report."""
    con, buf = file_console()
    with pytest.raises(ValueError), bar("patching head", con) as b:
        raise ValueError("bad input")
    assert buf.getvalue() == "" and b.total == 0


def test_quiet_is_silent():
    con, buf = file_console()
    with bar("x", con, quiet=True) as b:
        b.update(1, 2)
    assert buf.getvalue() == ""


def test_step_lines():
    con, buf = file_console()
    with step("building the task qa", con):
        pass
    first, second = buf.getvalue().splitlines()
    assert first == "building the task qa …" and second.startswith("building the task qa: ") and second.endswith(" s")


def test_third_party_bars_quiet_unless_asked(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("PATCHTRACE_VERBOSE", raising=False)
    assert hf_logging.is_progress_bar_enabled()
    with quiet_third_party():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()  # restored
    monkeypatch.setenv("PATCHTRACE_VERBOSE", "1")
    with quiet_third_party():
        assert hf_logging.is_progress_bar_enabled()


@pytest.fixture(scope="module")
def tiny_llama(smol_tokenizer):
    from conftest import make_tiny

    return make_tiny("llama", tokenizer=smol_tokenizer)


def test_sweep_counts_noop_patches_at_once(tiny_llama):
    """A residual sweep over every position: patches before the first differing token are exact no-ops,
    skipped by the engine. They are reported at once, and the reports add up to every patch."""
    from patchtrace import SiteSpec
    from patchtrace.engine.cache import collect
    from patchtrace.engine.sweep import Patch, Scorer, resolve, run_patches
    from patchtrace.methods.activation_patching import build_grid
    from patchtrace.metrics import Metric
    from patchtrace.tasks.base import Example, Task

    task = Task("t", [Example("When Mary and John went out, John gave it to",
                              "When Mary and John went out, Mary gave it to", " Mary", " John")])
    tt = task.tokenize(tiny_llama.tokenizer)
    grid = build_grid(tiny_llama, SiteSpec("resid_pre", positions="all", layers=(0, 1)), tt)
    ids_c, ids_k = tt.ids("clean", [0]), tt.ids("corrupt", [0])
    T = ids_c.shape[1]
    patches = [Patch((resolve(s, tiny_llama, T),)) for s in grid.sites()]
    clean, corrupt = collect(tiny_llama, ids_c), collect(tiny_llama, ids_k)
    scorer = Scorer(Metric("logit_diff"), tt.answer[[0]], tt.wrong[[0]], None)
    ticks: list[int] = []
    run_patches(tiny_llama, ids_k, corrupt, clean, patches, scorer, on_chunk=ticks.append)
    first_diff = int((ids_c[0] != ids_k[0]).nonzero()[0])  # layer 1: positions before it (causal prefix)
    same_token = int((ids_c[0] == ids_k[0]).sum())  # layer 0 (embeddings): every position with the same token
    assert ticks[0] == same_token + first_diff > 0  # the skipped no-ops, reported first
    assert sum(ticks) == len(patches)


def test_compare_reports_each_method_run(tiny_llama):
    """`compare` was silent for minutes: it now reports the reference sweep and each estimator run."""
    from patchtrace import SiteSpec
    from patchtrace.methods import compare as cmp
    from patchtrace.tasks.base import Example, Task

    task = Task("t", [Example("When Mary and John went out, John gave it to",
                              "When Mary and John went out, Mary gave it to", " Mary", " John")])
    calls: list[tuple[int, int]] = []
    cmp.run(tiny_llama, task, [SiteSpec("head", per_unit=True, layers=(0,))], ["atp", "ig"],
            on_progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_a_bar_closed_early_prints_its_last_state_once():
    """`mask` ends the training bar before the baseline's bar starts (one live bar at a time): closing it again
    when its block ends must not add a plain final line under the finished live bar (nor a second one in a log)."""
    import io

    from rich.console import Console

    from patchtrace.progress import bar

    for terminal in (True, False):
        out = io.StringIO()
        con = Console(file=out, force_terminal=terminal, width=200)
        with bar("training mask", con, every=1e9) as b:
            b.update(1, 2)
            b.update(2, 2)
            b.close()
        plain_final = out.getvalue().count("training mask: 2/2 (100%)")
        assert plain_final == (0 if terminal else 1), out.getvalue()
