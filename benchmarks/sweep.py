"""Side-by-side exact patching sweeps: patchtrace vs naive hooks vs TransformerLens vs nnsight vs pyvene.

SmolLM2-135M-Instruct, 16 IOI pairs (patchtrace's ``make_task("ioi", n=16, seed=0)``, so every tool
gets the same token ids), metric = mean logit(IO) − logit(S) at the last position. Four sweeps:
(i) all 270 heads at the last position, (ii) all heads × all positions, (iii) resid_pre per
layer × position, (iv) all 46,080 MLP neurons at the last position; plus one AtP pass for scale.

Each (tool, sweep) runs in its own subprocess, so its peak RSS (``os.wait4`` rusage) is its own.
The child loads the model through ``patchtrace.load_model()``, runs the tool, and prints one JSON
line: the time of the sweep loop only (excluding load and set-up), and the path of a safetensors
file holding the patched-metric matrix. The parent checks every matrix against patchtrace's
(max abs difference, must be < 1e-4), extrapolates peers measured on a subset of the cells
(each peer patch is one full forward, so time is linear in the number of cells), computes the
ratios and writes the markdown section of BENCHMARKS.md.

Usage (from the repository root, in the environment made by ``benchmarks/setup_peers.sh``)::

    .venv-bench/bin/python benchmarks/sweep.py --out BENCHMARKS.md     # the full run (make bench)
    .venv-bench/bin/python benchmarks/sweep.py --quick                  # a few cells per tool
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import TOOLS  # noqa: E402
from peers.common import CONFIGS  # noqa: E402

BEGIN, END = "<!-- BEGIN sweep -->", "<!-- END sweep -->"
TOL = 1e-4
PEERS = ["hooks", "transformer_lens", "nnsight", "pyvene"]
LABEL = {
    "patchtrace": "**patchtrace** `fast=True`",
    "patchtrace_plain": "patchtrace `fast=False` (plain path)",
    "hooks": "(a) naive torch pre-hooks",
    "transformer_lens": "(b) TransformerLens 4.3 bridge",
    "nnsight": "(c) nnsight 0.8.1",
    "pyvene": "(d) pyvene 0.1.8",
    "atp": "(e) AtP, one pass (torch hooks)",
}


# ---------------------------------------------------------------- child --


def child(tool: str, config: str, subset: str, result: str) -> None:
    """Run one tool on one sweep; print a JSON line; save the matrix to ``result``."""
    import importlib

    import torch
    from peers.common import cells, load_bench, n_full
    from safetensors.torch import save_file

    out: dict[str, Any] = {"tool": tool, "config": config, "subset": subset, "threads": torch.get_num_threads()}
    try:
        b = load_bench()
        cs = cells(config, subset, b)
        mod = importlib.import_module(f"peers.{TOOLS[tool]}")
        if tool.startswith("patchtrace"):
            r = mod.run(b, config, cs, fast=(tool == "patchtrace"), subset=subset)
        else:
            r = mod.run(b, config, cs)
        save_file({"matrix": r.pop("matrix").contiguous()}, result)
        out.update(r, load_s=b.load_s, n_cells=len(cs), n_full=n_full(config, b), result=result)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-3000:]
    print("BENCH-JSON " + json.dumps(out), flush=True)


# --------------------------------------------------------------- parent --


def spawn(tool: str, config: str, subset: str, tmp: Path, log: Any) -> dict[str, Any]:
    """Run a child process; return its JSON plus its own peak RSS and wall time."""
    res = tmp / f"{tool}-{config}-{subset}-{time.monotonic_ns()}.safetensors"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", tool, config, subset, str(res)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fout:
        p = subprocess.Popen(cmd, stdout=fout, stderr=subprocess.STDOUT, cwd=os.getcwd())
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fout.seek(0)
        text = fout.read()
    lines = [ln for ln in text.splitlines() if ln.startswith("BENCH-JSON ")]
    if lines:
        out = json.loads(lines[-1][len("BENCH-JSON ") :])
    else:
        out = {"tool": tool, "config": config, "error": f"child exited {p.returncode} without a result", "traceback": text[-3000:]}
    out["peak_rss_mib"] = ru.ru_maxrss / 1024  # KiB on Linux
    out["process_s"] = wall
    msg = (
        f"[{time.strftime('%H:%M:%S')}] {tool:17s} {config:13s} {subset:5s} "
        + (f"ERROR {out['error']}" if "error" in out else f"sweep {out['sweep_s']:8.2f} s  cells {out['n_cells']:5d}")
        + f"  rss {out['peak_rss_mib']:.0f} MiB  wall {wall:.0f} s"
    )
    print(msg, file=log, flush=True)
    if "error" in out:
        print(out.get("traceback", ""), file=log, flush=True)
    return out


def load_matrix(path: str) -> Any:
    from safetensors.torch import load_file

    return load_file(path)["matrix"]


def compare(ref: Any, other: Any) -> tuple[float, int]:
    """Max abs difference over the cells ``other`` measured, and how many cells that is."""
    import torch

    mask = ~torch.isnan(other)
    n = int(mask.sum())
    if n == 0:
        return float("nan"), 0
    return float((ref[mask] - other[mask]).abs().max()), n


def pearson(a: Any, b: Any) -> float:
    import torch

    x, y = a.flatten().double(), b.flatten().double()
    keep = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[keep], y[keep]
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def versions() -> str:
    out = []
    for p in ("torch", "transformers", "transformer-lens", "nnsight", "pyvene", "patchtrace"):
        try:
            out.append(f"{p} {version(p)}")
        except PackageNotFoundError:
            out.append(f"{p} (not installed)")
    return ", ".join(out)


def threads(data: dict[str, Any]) -> str:
    ts = sorted({r.get("threads") for rs in data["runs"].values() for runs in rs.values() for r in runs} - {None})
    return ", ".join(str(t) for t in ts) or "?"


def fmt_s(x: float) -> str:
    if x != x:
        return "–"
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 600:
        return f"{x / 60:.1f} min"
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    subset_peer = "quick" if args.quick else args.peer_subset
    subset_ours = "quick" if args.quick else "full"
    tmp = Path(tempfile.mkdtemp(prefix="patchtrace-bench-"))
    log = sys.stderr
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    load0 = os.getloadavg()
    t_start = time.perf_counter()

    def raw() -> dict[str, Any]:
        return {
            "runs": runs,
            "total_s": time.perf_counter() - t_start,
            "load_before": load0,
            "load_after": os.getloadavg(),
            "subset_peer": subset_peer,
            "subset_ours": subset_ours,
            "argv": sys.argv[1:],
        }

    def save_raw() -> None:  # after every child, so an interrupted run can still be rendered
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw(), indent=1, default=str))

    for config in args.configs:
        runs[config] = {}
        reps = args.repeats if config != "neurons_last" else args.neuron_repeats
        sub_ours = "pair" if config in args.ours_pair and not args.quick else subset_ours
        runs[config]["patchtrace"] = []
        for _ in range(reps):
            runs[config]["patchtrace"].append(spawn("patchtrace", config, sub_ours, tmp, log))
            save_raw()
        tools = [t for t in args.tools if t != "patchtrace"]
        for tool in tools:
            if tool == "atp" and config != "heads_last":
                continue
            sub = "full" if tool == "atp" else subset_peer  # one AtP pass covers every head
            runs[config][tool] = []
            for _ in range(args.peer_repeats):
                runs[config][tool].append(spawn(tool, config, sub, tmp, log))
                save_raw()
    return raw()


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Median times, extrapolations, agreement, ratios per (config, tool)."""
    summary: dict[str, Any] = {}
    for config, tools in data["runs"].items():
        ours_ok = [r for r in tools.get("patchtrace", []) if "error" not in r]
        ref = load_matrix(ours_ok[0]["result"]) if ours_ok else None
        rows: dict[str, Any] = {}
        for tool, rs in tools.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                rows[tool] = {"error": rs[0].get("error", "failed") if rs else "not run"}
                continue
            sweep = statistics.median(r["sweep_s"] for r in ok)
            r0 = ok[0]
            est = sweep * r0["n_full"] / r0["n_cells"]
            row: dict[str, Any] = {
                "sweep_s": sweep,
                "all_s": [r["sweep_s"] for r in ok],
                "n_cells": r0["n_cells"],
                "n_full": r0["n_full"],
                "full_s": est,
                "extrapolated": r0["n_cells"] != r0["n_full"],
                "setup_s": statistics.median(r.get("setup_s", 0.0) for r in ok),
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok),
                "process_s": statistics.median(r["process_s"] for r in ok),
                "threads": r0.get("threads"),
            }
            for k in ("plan", "sanity_max_abs", "patchtrace_atp_s", "patchtrace_atp_error", "patchtrace_atp_max_abs_diff"):
                if k in r0:
                    row[k] = r0[k]
            if ref is not None:
                m = load_matrix(r0["result"])
                row["max_abs_diff"], row["n_compared"] = compare(ref, m)
                if tool == "atp":
                    row["pearson"] = pearson(ref, m)
            rows[tool] = row
        ours = rows.get("patchtrace", {})
        for row in rows.values():
            if "full_s" in row and "full_s" in ours:
                row["ratio"] = row["full_s"] / ours["full_s"]
        summary[config] = rows
    return summary


def targets(summary: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """The issue's targets: (what, target, measured, met?)."""
    out: list[tuple[str, str, str, bool | None]] = []

    def fastest_peer(config: str) -> tuple[str, float] | None:
        rows = summary.get(config, {})
        ps = [(t, rows[t]["full_s"]) for t in PEERS if t in rows and "full_s" in rows[t]]
        return min(ps, key=lambda x: x[1]) if ps else None

    for config, goal in (("heads_last", 20.0), ("heads_all", 4.0)):
        rows = summary.get(config, {})
        fp = fastest_peer(config)
        if fp and "full_s" in rows.get("patchtrace", {}):
            r = fp[1] / rows["patchtrace"]["full_s"]
            ex = " (extrap.)" if rows["patchtrace"]["extrapolated"] else ""
            out.append(
                (f"{CONFIGS[config]}: speed-up vs fastest peer ({fp[0]})", f"≥ {goal:.0f}×", f"{r:.1f}×{ex}", r >= goal)
            )
    nr = summary.get("neurons_last", {}).get("patchtrace", {})
    if "full_s" in nr:
        ex = " (extrap.)" if nr["extrapolated"] else ""
        out.append((f"{CONFIGS['neurons_last']}: full exact sweep", "< 10 min", fmt_s(nr["full_s"]) + ex, nr["full_s"] < 600))
    hl = summary.get("heads_last", {})
    if "full_s" in hl.get("patchtrace", {}) and "full_s" in hl.get("atp", {}):
        r = hl["patchtrace"]["full_s"] / hl["atp"]["full_s"]
        out.append((f"{CONFIGS['heads_last']}: time vs one AtP pass", "≤ 3×", f"{r:.1f}×", r <= 3.0))
    for config, rows in summary.items():
        ours = rows.get("patchtrace", {})
        peers = [rows[t]["peak_rss_mib"] for t in PEERS if "peak_rss_mib" in rows.get(t, {})]
        if "peak_rss_mib" in ours and peers:
            best = min(peers)
            out.append(
                (f"{CONFIGS[config]}: peak RSS vs best peer", f"≤ {best:.0f} MiB", f"{ours['peak_rss_mib']:.0f} MiB",
                 ours["peak_rss_mib"] <= best)
            )
    agree = all(
        row.get("max_abs_diff", 0.0) < TOL
        for rows in summary.values()
        for t, row in rows.items()
        if t != "atp" and "max_abs_diff" in row
    )
    out.append(("every exact tool agrees with patchtrace", f"max abs diff < {TOL:g}", "yes" if agree else "NO", agree))
    return out


def markdown(data: dict[str, Any], summary: dict[str, Any], command: str) -> str:
    lines = [
        BEGIN,
        "## Exact patching sweeps side by side (issue 3, item 5)",
        "",
        f"Command: `{command}` (`make bench` builds `.venv-bench` with `benchmarks/setup_peers.sh`, then runs this). "
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} / {os.cpu_count()} CPUs; "
        f"load average before {data['load_before'][0]:.1f}, after {data['load_after'][0]:.1f}; whole run "
        f"{data['total_s'] / 60:.1f} min; torch threads per process: {threads(data)}. Versions: {versions()}.",
        "",
        *([f"**{data['note']}**", ""] if data.get("note") else []),
        "SmolLM2-135M-Instruct (float32, every tool on the same weights from `patchtrace.load_model()`), 16 IOI "
        "pairs of 14 tokens (`make_task('ioi', n=16, seed=0)`, identical token ids for every tool), metric = mean "
        "logit(IO) − logit(S) at the last position. `sweep` = wall time of the sweep only (model load and library "
        "set-up excluded; the clean/corrupt baseline forwards run before it as warm-up; for patchtrace the whole "
        "public `activation_patching.run` call, caches included). Median of the runs listed. Peak RSS is per "
        "process (`os.wait4`), model load included. `max |Δ|` = largest difference of the patched metric from "
        "patchtrace's `fast=True` matrix over every cell the tool measured (must be < 1e-4).",
        "",
        "**Peers on a measured subset, extrapolated:** every peer patch is one full forward of the 16×14 corrupt "
        "batch whatever the cell, so a peer's time is linear in the number of cells; where `cells` is less than "
        "the grid, `full grid` is the measured time scaled by grid/cells (marked *extrap.*). patchtrace "
        "`fast=True` runs the whole grid, except where its row says *extrap.* (`--ours-pair`: every cell of "
        "layers 0 and 29, scaled ×15; its cost per cell grows with the layers after the patch, and that pair "
        "has the grid's mean remaining depth).",
        "",
    ]
    tgt = targets(summary)
    lines += ["### Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for what, goal, got, ok in tgt:
        lines.append(f"| {what} | {goal} | {got} | {'yes' if ok else ('**no**' if ok is False else '–')} |")
    lines.append("")
    for config, rows in summary.items():
        lines += [
            f"### {CONFIGS[config]}",
            "",
            "| tool | cells run | sweep (measured) | full grid | × patchtrace time | peak RSS MiB | max \\|Δ\\| vs patchtrace | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for tool in ["patchtrace", "patchtrace_plain", *PEERS, "atp"]:
            if tool not in rows:
                continue
            row = rows[tool]
            if "error" in row:
                lines.append(f"| {LABEL[tool]} | – | – | – | – | – | – | could not run: `{row['error'][:300]}` |")
                continue
            runs = ", ".join(f"{s:.2f}" for s in row["all_s"])
            full = fmt_s(row["full_s"]) + (" *extrap.*" if row["extrapolated"] else "")
            diff = row.get("max_abs_diff", float("nan"))
            notes = []
            if tool == "patchtrace" and row.get("plan"):
                notes.append(f"plan: {row['plan']}")
            if tool == "atp":
                notes.append(f"approximation: Pearson {row.get('pearson', float('nan')):.3f} with the exact effects")
                if "patchtrace_atp_s" in row:
                    notes.append(f"patchtrace's own `methods.atp.run`: {row['patchtrace_atp_s']:.2f} s")
                if "patchtrace_atp_max_abs_diff" in row:
                    notes.append(f"its estimates differ from these by ≤ {row['patchtrace_atp_max_abs_diff']:.1e}")
                if "patchtrace_atp_error" in row:
                    notes.append(f"patchtrace AtP not timed: {row['patchtrace_atp_error'][:120]}")
            if row.get("setup_s", 0) > 0.01:
                notes.append(f"set-up {row['setup_s']:.2f} s")
            lines.append(
                f"| {LABEL[tool]} | {row['n_cells']:,} / {row['n_full']:,} | {fmt_s(row['sweep_s'])} ({runs}) | {full} "
                f"| {row.get('ratio', float('nan')):.1f}× | {row['peak_rss_mib']:.0f} "
                f"| {'–' if diff != diff else f'{diff:.1e}'} | {'; '.join(notes)} |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace our marked section of ``path`` (or append it), leaving the rest untouched."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        a = text.index(BEGIN)
        z = text.index(END) + len(END)
        text = text[:a] + section.rstrip("\n") + text[z:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "CONFIG", "SUBSET", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="markdown file whose sweep section to (re)write, e.g. BENCHMARKS.md")
    ap.add_argument("--json", type=Path, default=Path("runs/bench-sweep.json"), help="raw results (default %(default)s)")
    ap.add_argument("--render", type=Path, help="only render the markdown from a raw JSON written by an earlier run")
    ap.add_argument("--quick", action="store_true", help="a few cells per tool, one run each (development)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--tools", nargs="+", default=["patchtrace", "patchtrace_plain", *PEERS, "atp"], choices=list(TOOLS))
    ap.add_argument(
        "--peer-subset", default="peer", choices=["peer", "lite"],
        help="cells the peers and the plain path run: 'peer' (all 270 heads for (i); default) or 'lite' (fewer)",
    )
    ap.add_argument(
        "--ours-pair", nargs="*", default=[], choices=list(CONFIGS),
        help="sweeps where patchtrace runs every cell of layers 0 and 29 only, scaled ×15 (same mean remaining "
        "depth as the grid; for a busy machine). Default: none, patchtrace runs every grid whole",
    )
    ap.add_argument("--repeats", type=int, default=3, help="patchtrace runs per sweep, median reported (%(default)s)")
    ap.add_argument("--neuron-repeats", type=int, default=1, help="patchtrace runs of the neuron sweep (%(default)s)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="runs per peer and sweep (%(default)s)")
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.quick:
        args.repeats = args.neuron_repeats = args.peer_repeats = 1
    if args.render:
        data = json.loads(args.render.read_text())
    else:
        data = run_all(args)
    summary = summarize(data)
    data["summary"] = summary
    if not args.render:
        args.json.write_text(json.dumps(data, indent=1, default=str))
    run_argv = data.get("argv", argv if argv is not None else sys.argv[1:])
    command = data.get("command") or ".venv-bench/bin/python " + " ".join(["benchmarks/sweep.py", *run_argv])
    section = markdown(data, summary, command)
    if args.out:
        write_section(args.out, section)
        print(f"wrote the sweep section of {args.out}", file=sys.stderr)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
