"""Ray executor scaling on this machine: local vs 1 Ray worker vs 2 Ray workers, per-block cost,
and an estimate for the full 46,080-neuron sweep and a 7B model on 8 GPUs.

The sweep is a slice of the 46,080-neuron sweep of BENCHMARKS.md: the first ``--units`` (512) MLP
neurons of layer 14 of the bundled SmolLM2-135M-Instruct at the last position, 16 IOI pairs
(``make_task("ioi", n=16, seed=0)``), ``logit_diff``. A neuron patch at layer 14 joins the batch at
layer 15 and runs 15 of the 30 layers, close to the average over all 30 layers (14.5), so its
per-cell cost stands for the whole sweep's.
The engine cuts it into blocks of ``ROWS_PER_BLOCK`` = 2,048 rows (128 cells × 16 examples): 4 blocks
(12 with ``--units 1536``).

Modes, in one run, side by side (each sweep repeated ``--reps`` times, the fastest kept):

* ``local``: :class:`LocalExecutor` in this process, torch threads = cores (and once with 1 thread);
* ``ray ×1``: one Ray worker with as many torch threads;
* ``ray ×2``: two Ray workers, one thread each.

Every Ray result is checked bit for bit (``torch.equal``) against the local one. Ray start-up (the
local instance, and a worker importing torch and loading the model) is timed separately: it is paid
once per run, not per block.

Usage (from the repository root)::

    nice -n 10 .venv/bin/python benchmarks/ray_scale.py            # prints a markdown section
    nice -n 10 .venv/bin/python benchmarks/ray_scale.py --quick    # 2 blocks, 1 rep (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import torch


def _sweep(model: Any, tok: Any, spec: Any, executor: Any = None) -> tuple[float, Any]:
    from patchtrace.methods.activation_patching import PatchingConfig, run

    t0 = time.perf_counter()
    s = run(model, tok, spec, PatchingConfig(sanity_check=False), executor=executor)
    return time.perf_counter() - t0, s


def _flops_per_row(model: Any, layer: int) -> float:
    """FLOPs of one neuron-patch row: one token through layers ``layer+1..L-1`` (a neuron patch joins
    at the next layer; attention projections and MLP, the attention over ~15 cached positions is
    negligible) plus 2 unembedding columns."""
    d = model.dims
    head_dim = d.d_model // d.n_heads
    attn = d.d_model * head_dim * (2 * d.n_heads + 2 * d.n_kv_heads)  # q, o and k, v projections
    mlp = 3 * d.d_model * d.d_mlp  # gate, up, down
    return 2.0 * ((d.n_layers - layer - 1) * (attn + mlp) + 2 * d.d_model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 blocks, one repetition")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--units", type=int, default=512, help="neurons of the layer to sweep (1536: all)")
    args = ap.parse_args()

    import ray

    from patchtrace import SiteSpec, load_model, make_task
    from patchtrace.engine.executors.ray_executor import RayExecutor

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    model = load_model()
    tok = make_task("ioi", n=16, seed=0).tokenize(model.tokenizer)
    units = tuple(range(256 if args.quick else args.units))
    spec = SiteSpec("neuron", per_unit=True, positions="last", layers=(args.layer,), units=units)
    reps = 1 if args.quick else args.reps
    rows: list[dict[str, Any]] = []

    times = []
    for _ in range(reps):
        t, ref = _sweep(model, tok, spec)
        times.append(t)
    n_cells = ref.values.numel()
    n_blocks = -(-n_cells * len(tok) // 2048)
    rows.append({"mode": "local (this process)", "workers": 1, "threads": cores, "sweep_s": min(times), "equal": True,
                 "start_s": 0.0})
    if cores > 1:  # the same process with one thread: separates "more processes" from "fewer threads each"
        torch.set_num_threads(1)
        t, s1 = _sweep(model, tok, spec)
        torch.set_num_threads(cores)
        rows.append({"mode": "local, 1 thread", "workers": 1, "threads": 1, "sweep_s": t, "start_s": 0.0,
                     "equal": torch.equal(s1.values, ref.values) and torch.equal(s1.per_example, ref.per_example)})

    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t0
    try:
        for workers, threads in ((1, cores), (2, max(1, cores // 2))):
            ex = RayExecutor(workers=workers, threads=threads)  # joins the instance started above
            try:
                t0 = time.perf_counter()
                ex.start(model)
                start_s = time.perf_counter() - t0
                times = []
                for _ in range(reps):
                    t, s = _sweep(model, tok, spec, ex)
                    times.append(t)
                    equal = torch.equal(s.values, ref.values) and torch.equal(s.per_example, ref.per_example)
                rows.append({"mode": f"ray ×{workers}", "workers": workers, "threads": threads, "sweep_s": min(times),
                             "equal": equal, "start_s": start_s})
            finally:
                ex.close()
    finally:
        ray.shutdown()

    local = rows[0]["sweep_s"]
    per_block = local / n_blocks
    rows_per_s = n_cells * len(tok) / local
    flops = _flops_per_row(model, args.layer) * n_cells * len(tok)
    gflops = flops / local / 1e9
    print(json.dumps({"rows": rows, "init_s": init_s, "cells": n_cells, "blocks": n_blocks}, indent=1))
    print()
    print(f"Machine: {platform.processor() or platform.machine()}, {cores} cores; torch {torch.__version__}; "
          f"Ray {ray.__version__}. Sweep: {n_cells} neurons of layer {args.layer}, 16 IOI pairs, {n_blocks} blocks "
          f"of ≤ 2,048 rows. Ray local instance start: {init_s:.1f} s.")
    print()
    print("| executor | workers × threads | worker start (model load) | sweep | per block | vs local | bit-identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} × {r['threads']} | {r['start_s']:.1f} s | {r['sweep_s']:.1f} s | "
              f"{r['sweep_s'] / n_blocks:.2f} s | {r['sweep_s'] / local:.2f}× | {'yes' if r['equal'] else '**no**'} |")
    print()
    full_blocks = 46080 * 16 // 2048
    print(f"Per-block cost (local): {per_block:.2f} s = {rows_per_s:.0f} patched rows/s "
          f"≈ {gflops:.1f} GFLOP/s effective. Full 46,080-neuron sweep = {full_blocks} blocks "
          f"→ {full_blocks * per_block:.0f} s on this box.")


if __name__ == "__main__":
    main()
