"""The README and the command line agree (issue 18 item 4), checked without running a model.

``tests/test_readme.py`` runs every README example; these are the cheap, static agreements: every
option a README command line uses exists on that command, defaults stated in the README and in
``--help`` are the code's, task names are spelled as ``patchtrace tasks`` lists them, and listings
show each thing once and without markup.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from patchtrace.cli import build_app
from patchtrace.cli.common import build_task, parse_sites

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_command_lines() -> list[list[str]]:
    out = []
    for m in re.finditer(r"^```(?:bash|sh)\n(.*?)^```", README, re.S | re.M):
        for line in m.group(1).splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "patchtrace":
                out.append(words[1:])
    return out


def commands() -> dict:
    return get_command(build_app()).commands  # type: ignore[attr-defined]


def test_readme_options_exist():
    cmds = commands()
    for argv in readme_command_lines():
        if not argv or argv[0].startswith("-"):
            continue
        assert argv[0] in cmds, f"README uses `patchtrace {argv[0]}`, which is not a command"
        opts = {o for p in cmds[argv[0]].params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        used = {w.split("=")[0] for w in argv[1:] if w.startswith("--")}
        assert used <= opts, f"`patchtrace {' '.join(argv)}`: unknown options {used - opts}"


def test_task_names_as_listed():
    from patchtrace.tasks import task_generators

    names = {g.name for g in task_generators()}
    for argv in readme_command_lines():
        if "--task" in argv:
            t = argv[argv.index("--task") + 1]
            assert t in names or t.endswith((".jsonl", ".csv")), f"README --task {t}: `patchtrace tasks` lists {names}"
    mask = next(p for p in commands()["mask"].params if p.name == "task")
    assert mask.default in names  # the default is spelled as the listing spells it


def test_max_memory_default_agrees():
    from patchtrace.engine.plan import DEFAULT_BUDGET_CAP

    mib = DEFAULT_BUDGET_CAP >> 20
    phrase = f"default {mib} MiB on CPU, half the free GPU memory on CUDA"
    assert " ".join(README.split()).count(phrase) == 2  # patch options and the engine section
    for name in ("patch", "trace"):
        opt = next(p for p in commands()[name].params if p.name == "max_memory")
        assert f"{mib} MiB on CPU" in opt.help and "quarter" not in opt.help


def test_listings_once_and_plain():
    runner = CliRunner()
    out = runner.invoke(build_app(), ["models"], env={"COLUMNS": "200"}).output
    from patchtrace.models.adapters import FAMILIES

    table = out.split("bundled models")[0]  # the architectures table: "│ family │ types │" rows
    for mt in {t for f in FAMILIES for t in f.model_types}:
        rows = [ln for ln in table.splitlines()
                if ln.count("│") == 3 and re.search(rf"(?<![\w-]){re.escape(mt)}(?![\w-])", ln.split("│")[2])]
        assert len(rows) == 1, (mt, rows)  # each model type under one family: the one that loads it
    tasks = runner.invoke(build_app(), ["tasks"], env={"COLUMNS": "200"}).output
    assert "``" not in tasks and ":func:" not in tasks and ":class:" not in tasks


def test_site_positions_per_item():
    specs = parse_sites("head@last,resid_pre@all", "0")
    assert [(s.kind, s.positions) for s in specs] == [("head", "last"), ("resid_pre", "all")]
    assert parse_sites("head", "all")[0].positions == "all"


@pytest.fixture
def pairs_file(tmp_path):
    rows = [f'{{"clean": "a{i} b", "corrupt": "c{i} d", "answer": " x", "wrong": " y"}}' for i in range(3)]
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(rows) + "\n")
    return p


def test_n_applies_to_task_files(pairs_file, capsys):
    assert len(build_task(str(pairs_file), None, 0)) == 3  # default: the whole file
    two = build_task(str(pairs_file), 2, 0)
    assert [e.clean for e in two.examples] == ["a0 b", "a1 b"]  # the first two, in order
    assert "using the first 2 of the 3 examples" in capsys.readouterr().err
    assert len(build_task(str(pairs_file), 5, 0)) == 3
    assert "has only 3 examples" in capsys.readouterr().err


def test_top_k_comment_matches_repr():
    """The README's `scores.top_k(3)` comment shows a Site the way a Site prints."""
    from patchtrace import Site

    m = re.search(r"scores\.top_k\(3\)\s+# \[\((Site\([^)]*\)), ([-\d.]+)\)", README)
    assert m, "README: the top_k example comment is missing"
    assert m.group(1) == repr(Site("head", 23, 3, -1))
