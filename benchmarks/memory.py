"""Where the exact head sweep's peak memory goes, stage by stage (issue 3, peak-RSS target).

Prints the process's resident set (VmRSS) and high-water mark (VmHWM) from /proc after each stage:
import, model load, touching every weight (the weights hash), one plain HF forward of the 16 IOI
prompts, one recorded run (the engine's cache), and the full 270-head sweep at the last position.
Run it under different allocator settings to separate working set from allocator high-water::

    .venv/bin/python benchmarks/memory.py                         # default budget
    .venv/bin/python benchmarks/memory.py --budget-mib 16
    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --neuron-blocks 6      # the 46,080-neuron job, last 6 blocks
    .venv/bin/python benchmarks/memory.py --budgets 16 64 --units 384   # neuron-sweep time per budget
    .venv/bin/python benchmarks/memory.py --job                  # the 46,080-neuron job: size, build time

Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import time


def mem() -> tuple[int, int]:
    """(VmRSS, VmHWM) in MiB."""
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                d[line.split(":")[0]] = int(line.split()[1]) // 1024
    return d["VmRSS"], d["VmHWM"]


def job_size(repeats: int) -> None:
    """Build the all-neurons last-position job as ``activation_patching.run`` does; fastest of ``repeats``."""
    import tracemalloc

    from patchtrace import PatchingConfig, SiteSpec, load_model, make_task
    from patchtrace.methods.activation_patching import PatchingJob

    model = load_model()
    tok = make_task("ioi", n=16, seed=0).tokenize(model.tokenizer)
    spec, cfg = SiteSpec("neuron", per_unit=True, positions="last"), PatchingConfig()
    tracemalloc.start()
    job = PatchingJob(model, tok, spec, cfg)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    build = read = group = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        job = PatchingJob(model, tok, spec, cfg)
        build = min(build, time.process_time() - t)
        t = time.process_time()
        n = sum(1 for _ in job.patches[0])
        read = min(read, time.process_time() - t)
        t = time.process_time()
        job._group(0)
        group = min(group, time.process_time() - t)
    print(f"job of {n} patches: holds {held / 1e6:.2f} MB (peak while built {peak / 1e6:.2f} MB); CPU s, fastest of "
          f"{repeats}: build {build:.2f}, read every patch {read:.2f}, record the group (2 forwards + scan) {group:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mib", type=int, default=None, help="engine working-memory budget (default: library default)")
    ap.add_argument("--neuron-blocks", type=int, default=0,
                    help="instead: build the all-neuron last-position job and run its last N checkpoint blocks")
    ap.add_argument("--budgets", type=int, nargs="+", default=None, metavar="MIB",
                    help="instead: time a neuron sweep (every neuron of --layers, last position) at each budget, in turn")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 29], help="layers of the --budgets sweep (%(default)s)")
    ap.add_argument("--units", type=int, default=1536, help="first N neurons per layer in the --budgets sweep (%(default)s)")
    ap.add_argument("--job", action="store_true",
                    help="the 46,080-neuron activation-patching job: Python memory it holds (tracemalloc), CPU time "
                         "to build it, to read every patch once, and to record its group's runs")
    ap.add_argument("--repeats", type=int, default=3, help="--budgets: runs per budget, fastest counts (%(default)s)")
    args = ap.parse_args()
    if args.job:
        job_size(args.repeats)
        return
    if args.budgets:
        budgets(args.budgets, args.layers, args.units, args.repeats)
        return
    if args.neuron_blocks:
        neuron_blocks(args.neuron_blocks)
        return
    import torch

    from patchtrace import PatchingConfig, SiteSpec, activation_patching, load_model, make_task
    from patchtrace.engine.sweep import collect
    from patchtrace.sites import HookPoint

    rows = [("import", *mem())]
    model = load_model()
    rows.append(("load (safetensors, memory-mapped)", *mem()))
    model.weights_hash()
    rows.append(("touch every weight (hash)", *mem()))
    tok = make_task("ioi", n=16, seed=0).tokenize(model.tokenizer)
    ids = tok.ids("clean", range(len(tok)))
    with torch.no_grad():
        model.hf(ids)
    rows.append(("one HF forward, 16×14", *mem()))
    L = model.dims.n_layers
    collect(model, ids, {HookPoint(k, layer) for k in ("head", "attn_out") for layer in range(L)})
    rows.append(("one recorded run (engine cache)", *mem()))
    budget = None if args.budget_mib is None else args.budget_mib << 20
    t = time.perf_counter()
    activation_patching(
        model, tok, SiteSpec("head", per_unit=True, positions="last"), PatchingConfig(sanity_check=False, max_memory=budget)
    )
    dt = time.perf_counter() - t
    rows.append((f"270-head sweep ({dt:.2f} s)", *mem()))
    print("| stage | VmRSS MiB | VmHWM MiB |\n|---|---|---|")
    for name, rss, hwm in rows:
        print(f"| {name} | {rss} | {hwm} |")


def budgets(mibs: list[int], layers: list[int], units: int, repeats: int) -> None:
    """Wall time of one neuron sweep (last position) at each working-memory budget, the budgets taking
    turns ``repeats`` times (fastest counts), so that contention hits them alike. The grid's cost per cell
    grows with the layers after it: layers (0, 29) have the full grid's mean remaining depth."""
    import os

    from patchtrace import PatchingConfig, SiteSpec, activation_patching, load_model, make_task

    model = load_model()
    tok = make_task("ioi", n=16, seed=0).tokenize(model.tokenizer)
    spec = SiteSpec("neuron", per_unit=True, positions="last", layers=tuple(layers), units=tuple(range(units)))
    best = dict.fromkeys(mibs, float("inf"))
    cpu = dict.fromkeys(mibs, float("inf"))  # process CPU time: what other processes' load barely changes
    plans: dict[int, str] = {}
    ref = None
    for r in range(repeats):
        for b in mibs:
            t, c = time.perf_counter(), time.process_time()
            s = activation_patching(model, tok, spec, PatchingConfig(sanity_check=False, max_memory=b << 20))
            best[b] = min(best[b], time.perf_counter() - t)
            cpu[b] = min(cpu[b], time.process_time() - c)
            plans[b] = str(s.provenance["plan"][0])
            if ref is None:
                ref = s.values
            assert bool((s.values == ref).all()), "budgets must not change the result"
        print(f"repeat {r + 1}: " + ", ".join(f"{b} MiB {t:.2f} s (cpu {cpu[b]:.2f} s)" for b, t in best.items())
              + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    n = len(layers) * units
    print(f"| budget | {n} neurons (layers {layers}): wall s, fastest of {repeats} | × {mibs[0]} MiB | CPU s | "
          f"× {mibs[0]} MiB (CPU) | plan |\n|---|---|---|---|---|---|")
    for b, t in best.items():
        print(f"| {b} MiB | {t:.2f} | {t / best[mibs[0]]:.2f} | {cpu[b]:.2f} | {cpu[b] / cpu[mibs[0]]:.2f} | {plans[b]} |")


def neuron_blocks(n: int) -> None:
    """VmRSS/VmHWM after building the 46,080-neuron activation-patching job and after each of its
    last ``n`` blocks (layer 29: cheap to run, same caches and batch sizes as the whole sweep)."""
    from patchtrace import PatchingConfig, SiteSpec, load_model, make_task
    from patchtrace.methods import activation_patching as apm

    model = load_model()
    tok = make_task("ioi", n=16, seed=0).tokenize(model.tokenizer)
    print(f"| loaded | {' | '.join(map(str, mem()))} |")
    job_cls = next(v for v in vars(apm).values() if isinstance(v, type) and hasattr(v, "run_block"))
    job = job_cls(model, tok, SiteSpec("neuron", per_unit=True, positions="last"), PatchingConfig())
    blocks = job.blocks()
    print(f"| job built ({len(blocks)} blocks) | {' | '.join(map(str, mem()))} |")
    for b in blocks[-n:]:
        job.run_block(b)
        print(f"| block {b.index} | {' | '.join(map(str, mem()))} |")


if __name__ == "__main__":
    main()
