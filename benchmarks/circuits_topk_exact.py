"""Exact scores where a circuit needs them: EAP-IG ranks all edges, exact path patching re-scores the top k.

The full exact edge grid of SmolLM2 IOI is FLOP-bound at ~96 TFLOP (``circuits_fullgrid.py``), far more
than any first-order method. A circuit of a few hundred edges needs exact numbers only for its
candidates: this script times EAP (or EAP-IG inputs, m=5) over all 70,651 edges plus ``edge_grid``
on the top ``k`` of them, on the same 4 IOI prompts as ``circuits_peers.py`` (one torch thread), and
says how many of the top ``k`` by exact effect keep their place among the first-order top ``k``.

Usage::

    nice -n 10 .venv/bin/python benchmarks/circuits_topk_exact.py --k 200 500 1000
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--k", type=int, nargs="+", default=[200, 500, 1000])
    ap.add_argument("--method", default="eap", choices=("eap", "eap-ig"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = load_model()
    tok = make_task("ioi", n=args.n, seed=0).tokenize(m.tokenizer)
    t0 = time.perf_counter()
    p = prepare(m, tok)  # the clean, corrupt and base runs (counted, as in circuits_peers.py)
    t_prep = time.perf_counter() - t0
    G = p.graph
    res: dict = {"n": args.n, "edges": G.n_edges, "method": args.method,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "load_before": open("/proc/loadavg").read().split()[:3], "k": {}}
    t0 = time.perf_counter()
    s = scores(p, args.method, steps=5)  # type: ignore[arg-type]
    res["prepare_seconds"] = t_prep
    res["rank_seconds"] = t_prep + time.perf_counter() - t0
    flat = s.masked_fill(~G.mask, float("nan")).abs().nan_to_num(-1.0).flatten()
    order = flat.argsort(descending=True)
    for k in sorted(args.k):
        mask = torch.zeros(G.mask.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        mask = mask.view_as(G.mask)
        t0 = time.perf_counter()
        eff = edge_grid(p, edges=mask)
        dt = time.perf_counter() - t0
        ex, ap_ = eff[mask], s[mask]
        res["k"][k] = {"exact_seconds": dt, "total_seconds": res["rank_seconds"] + dt,
                       "pearson": pearson(ex, ap_), "spearman": spearman(ex, ap_),
                       "sign_agreement": float((ex.sign() == ap_.sign()).float().mean())}
        print(k, res["k"][k], flush=True)
    res["load_after"] = open("/proc/loadavg").read().split()[:3]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"topk_exact_{args.method}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
