"""The full exact edge grid of IOI on SmolLM2-135M, measured layer by layer, against its FLOP lower bound.

Every one of the 70,651 edges is patched alone (``edge_grid``), receiver layer by receiver layer
(the logits first, layer 0 last), each layer timed and saved as it finishes (a stopped run keeps
what it measured). The same process times a plain ``[rows, d_model] x [d_model, d_mlp]`` matmul
at the batch's shape before and after, so the grid's arithmetic can be set against what this CPU
thread does at best at that moment (a ratio, not an absolute, on a shared machine).

The FLOP lower bound of one-edge-at-a-time exact patching: an edge into a receiver at layer ``l``
must re-run layers ``l .. L−1`` for the ``N`` examples at the ``n = T − p0`` positions from the first
clean/corrupt difference on (nothing before ``p0`` or before layer ``l`` can change), i.e.
``2 · (N · n) · P_layer`` FLOPs per layer, ``P_layer`` being the layer's matrix parameters (q, k, v,
o, gate, up, down) — except the last layer, where only the keys and values are needed at every
position and the rest at the last one. Attention scores and norms are left out (under 1 % here),
the unembedding is 2 columns, and the first layer is counted in full (a lower bound could shave
part of it). Summed over all edges. At the end EAP, EAP-IG (inputs) and — unless ``--skip-act`` —
EAP-IG (activations) run in the same process and are correlated with the full exact grid.

Usage::

    nice -n 10 .venv/bin/python benchmarks/circuits_fullgrid.py --n 4          # runs/bench-circuits/fullgrid.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from patchtrace import load_model, make_task
from patchtrace.circuits.eap import scores
from patchtrace.circuits.exact import edge_grid, prepare
from patchtrace.methods.compare import pearson, spearman

OUT = Path(__file__).resolve().parents[1] / "runs" / "bench-circuits"


def matmul_gflops(rows: int, d: int, f: int, reps: int = 10) -> float:
    a, b = torch.randn(rows, d), torch.randn(d, f)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * rows * d * f * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--layers", type=int, nargs="*", help="receiver layers to run (default: all, and the logits)")
    ap.add_argument("--skip-act", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--versus-dense", type=int, default=0, metavar="E",
                    help="per layer, also time the dense first layer against the sparse one on E of its edges")
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = load_model()
    tok = make_task("ioi", n=args.n, seed=0).tokenize(m.tokenizer)
    p = prepare(m, tok)
    G, d = p.graph, m.dims
    g0 = p.groups[0]
    N, n = len(g0.idx), g0.base_out.shape[1]
    p_kv = d.d_model * (d.n_kv_heads * d.d_head) * 2
    p_layer = d.d_model * (d.n_heads * d.d_head) * 2 + p_kv + 3 * d.d_model * d.d_mlp
    rows = 256 // N * N * n  # token rows of one full batch (edge_grid's max_rows=256)
    res: dict = {"n": args.n, "N": N, "positions_run": n, "first_differing_position": g0.p0, "edges": G.n_edges,
                 "flop_per_token_layer": 2 * p_layer, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "load_before": open("/proc/loadavg").read().split()[:3], "layers": {}}
    res["matmul_gflops_before"] = matmul_gflops(rows, d.d_model, d.d_mlp)
    out = torch.full(G.mask.shape, float("nan"))
    todo = args.layers if args.layers else list(range(G.n_layers, -1, -1))
    tag = args.tag or ("" if not args.layers else "-layers")
    for li in todo:
        recs = [r for r in range(G.n_receivers) if int(G.receiver_layer[r]) == li]
        t0 = time.perf_counter()
        eff = edge_grid(p, receivers=recs)
        dt = time.perf_counter() - t0
        sel = G.mask.clone()
        sel[:, [r for r in range(G.n_receivers) if r not in set(recs)]] = False
        out[sel] = eff[sel]
        ne = int(sel.sum())
        left = G.n_layers - li
        flop = ne * N * 2 * ((left - 1) * n * p_layer + n * p_kv + (p_layer - p_kv)) if left else 0
        res["layers"][li] = {"edges": ne, "layers_run": left, "s": dt, "s_per_edge": dt / ne, "gflop": flop / 1e9,
                             "gflops_achieved": flop / dt / 1e9 if left else None}
        if args.versus_dense and li < G.n_layers:
            sub = torch.zeros_like(G.mask)
            idx = sel.nonzero()[torch.randperm(ne, generator=torch.Generator().manual_seed(li))[:args.versus_dense]]
            sub[idx[:, 0], idx[:, 1]] = True
            t: dict[str, list[float]] = {}
            for mode in (False, True, False, True):  # dense, sparse, alternated
                t0 = time.perf_counter()
                e2 = edge_grid(p, edges=sub, sparse=mode)
                t.setdefault("sparse" if mode else "dense", []).append(time.perf_counter() - t0)
            dmax = float((e2[sub] - eff[sub]).abs().max())
            res["layers"][li]["versus_dense"] = {"edges": int(sub.sum()), "dense_s": min(t["dense"]), "sparse_s": min(t["sparse"]),
                                                 "speedup": min(t["dense"]) / min(t["sparse"]), "max_abs_diff": dmax}
        print(li, res["layers"][li], flush=True)
        (OUT / f"fullgrid{tag}.json").write_text(json.dumps(res, indent=2))
    res["matmul_gflops_after"] = matmul_gflops(rows, d.d_model, d.d_mlp)
    L = res["layers"].values()
    total_s = sum(v["s"] for v in L)
    total_gflop = sum(v["gflop"] for v in L)
    peak = (res["matmul_gflops_before"] + res["matmul_gflops_after"]) / 2
    res["total"] = {"edges": sum(v["edges"] for v in L), "s": total_s, "gflop": total_gflop,
                    "edge_layers": sum(v["edges"] * v["layers_run"] for v in L),
                    "gflops_achieved": total_gflop / total_s, "matmul_gflops_mean": peak,
                    "lower_bound_s_at_matmul_rate": total_gflop / peak, "x_over_bound": total_s / (total_gflop / peak)}
    from safetensors.torch import save_file

    save_file({"exact": out}, str(OUT / f"fullgrid{tag}.safetensors"))
    if not args.layers:
        real = ~torch.isnan(out)
        for name in ("eap", "eap-ig") + (() if args.skip_act else ("eap-ig-act",)):
            t0 = time.perf_counter()
            v = scores(p, name, steps=5)  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
            res[name] = {"seconds": dt, "pearson": pearson(out[real], v[real]), "spearman": spearman(out[real], v[real])}
            save_file({"scores": v}, str(OUT / f"fullgrid_{name}.safetensors"))
            (OUT / f"fullgrid{tag}.json").write_text(json.dumps(res, indent=2))
    res["load_after"] = open("/proc/loadavg").read().split()[:3]
    (OUT / f"fullgrid{tag}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res["total"], indent=2))


if __name__ == "__main__":
    main()
