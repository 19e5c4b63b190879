"""What the command line prints when it is not a terminal, and the --max-memory messages (issue 18 item 6)."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest
from rich.table import Table

from patchtrace.cli import common


def test_piped_tables_never_fold_a_number(monkeypatch):
    """rich's default for a pipe is 80 columns, which folded ``0.912 / -0.483 / 0.70`` over lines."""
    monkeypatch.delenv("COLUMNS", raising=False)
    cell = "0.912 / -0.483 / 0.70"
    t = Table(title="agreement")
    t.add_column("site kind")
    for name in ("atp", "atp_star", "ig", "relp"):
        t.add_column(f"{name}\nPearson / Spearman / top-10", justify="right")
    t.add_row("resid_pre", *[cell] * 4)
    buf = io.StringIO()
    with redirect_stdout(buf):  # a StringIO is not a terminal
        common.console().print(t)
    rows = [line for line in buf.getvalue().splitlines() if "resid_pre" in line]
    assert len(rows) == 1 and rows[0].count(cell) == 4, buf.getvalue()
    assert max(len(line) for line in buf.getvalue().splitlines()) > 80  # wider than rich's pipe default


def test_columns_still_decides_the_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    buf = io.StringIO()
    with redirect_stdout(buf):
        con = common.console()
    assert con.width == 50


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1KB", r"'1KB' is 1000 bytes; the engine needs at least 1 MiB"),
        ("-1GB", r"'-1GB': a memory budget must be positive"),
        ("0", r"'0': a memory budget must be positive"),
        ("1PB", r"'1PB' is .* GiB, more than this machine's"),
        ("4 parsecs", r"unknown unit 'parsecs'"),
        ("GB", r"use a number with a unit"),
    ],
)
def test_max_memory_says_what_is_wrong(text, message):
    with pytest.raises(common.CLIError, match=message):
        common.parse_memory(text)


def test_max_memory_accepts_petabyte_units_below_the_machine(monkeypatch):
    monkeypatch.setattr(common, "machine_memory", lambda: 2 * 10**15)
    assert common.parse_memory("1PB") == 10**15
    assert common.parse_memory("0.5 TiB") == 2**39
    assert re.fullmatch(r"\d+", str(common.parse_memory("1e9")))
