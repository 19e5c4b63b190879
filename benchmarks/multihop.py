"""Multi-hop benchmarks on the bundled SmolLM2-135M: classification, back-patching (exactness and time vs
naive HF hooks, oracle fix rate), bridge readout, recall vs reasoning.

Stages write ``runs/multihop/bench-<stage>.json`` (and the classified queries to
``runs/multihop/classified.jsonl``), so each can run on its own and ``--render`` turns the JSON into the
BENCHMARKS.md section::

    nice -n 10 .venv/bin/python benchmarks/multihop.py --stages classify exact fix bridge rr
    .venv/bin/python benchmarks/multihop.py --render            # markdown to stdout

Options: ``--n-cities`` (generator size, default 40), ``--fix-queries`` (cap on queries in the fix-rate
run), ``--max-new`` (tokens generated per back-patch), ``--naive-pairs`` (pairs per query timed with the
naive reference), ``--model`` (default smollm2-135m), ``--dtype``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import torch

OUT = Path("runs/multihop")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "multihop"))


def _save(stage: str, data: dict, tag: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"bench-{stage}{tag}.json").write_text(json.dumps(data, indent=1, default=str))


def _load(stage: str, tag: str = "") -> dict | None:
    p = OUT / f"bench-{stage}{tag}.json"
    return json.loads(p.read_text()) if p.exists() else None


def classify_stage(m, args) -> None:
    from patchtrace.multihop.generate import classify
    from patchtrace.multihop.kb import generate
    from patchtrace.multihop.queries import save_jsonl

    qs = generate(n_cities=args.n_cities)
    t0 = time.perf_counter()
    out, comp, counts = classify(m, qs)
    dt = time.perf_counter() - t0
    save_jsonl(out, OUT / f"classified{args.tag}.jsonl")
    by_rel: dict[str, dict[str, int]] = {}
    for q, c in zip(out, comp, strict=True):
        r = by_rel.setdefault(q.relation, {"total": 0, "both_hops": 0, "composition": 0, "both_wrong_comp": 0})
        r["total"] += 1
        r["both_hops"] += q.both_hops_ok
        r["composition"] += c
        r["both_wrong_comp"] += q.both_hops_ok and not c
    _save("classify", {"counts": counts, "by_relation": by_rel, "composed": comp, "seconds": dt}, args.tag)
    print(counts, by_rel, f"{dt:.0f}s")


def _queries(args):
    from patchtrace.multihop.queries import load_jsonl

    qs = load_jsonl(OUT / f"classified{args.tag}.jsonl")
    comp = _load("classify", args.tag)["composed"]  # type: ignore[index]
    return qs, comp


def exact_stage(m, args) -> None:
    from multihop_naive import decoder_layers, layer_outputs

    from patchtrace.multihop.backpatch import BackpatchConfig, backpatch

    qs, comp = _queries(args)
    pick = [q for q, c in zip(qs, comp, strict=True) if q.both_hops_ok and not c][: args.exact_queries]
    rng = random.Random(0)
    rows = []
    L = m.dims.n_layers
    for q in pick:
        t0 = time.perf_counter()
        s = backpatch(m, [q], BackpatchConfig(generate=False))
        fast = time.perf_counter() - t0
        ids = torch.tensor([m.tokenizer(q.prompt).input_ids])
        tok = m.tokenizer(" " + q.target).input_ids[0]
        pos = ids.shape[1] - 1
        pairs = rng.sample([(j, i) for j in range(L) for i in range(L)], args.naive_pairs)
        t0 = time.perf_counter()
        outs = layer_outputs(m.hf, ids)
        layers = decoder_layers(m.hf)
        diffs = []
        for j, i in pairs:
            val = outs[j][:, pos]

            def hook(mod, a, o, val=val, pos=pos):
                x = (o[0] if isinstance(o, tuple) else o).clone()
                x[:, pos] = val
                return (x, *o[1:]) if isinstance(o, tuple) else x

            h = layers[i].register_forward_hook(hook)
            try:
                with torch.no_grad():
                    lp = torch.log_softmax(m.hf(ids).logits[0, -1].float(), -1)[tok]
            finally:
                h.remove()
            assert s.per_example is not None, "the sweep keeps per-example effects"
            diffs.append(abs(float(lp) - float(s.per_example[0, j, i])))
        naive = (time.perf_counter() - t0) / len(pairs) * L * L
        rows.append({"query": q.name, "tokens": ids.shape[1], "fast_s": fast, "naive_s_extrapolated": naive,
                     "naive_pairs": len(pairs), "max_abs_diff": max(diffs), "speedup": naive / fast,
                     "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "dtype": args.dtype})
        print(rows[-1])
    _save("exact", {"rows": rows, "layers": L}, args.tag)


def fix_stage(m, args) -> None:
    from patchtrace.multihop.backpatch import BackpatchConfig, backpatch, fix_rate

    qs, comp = _queries(args)
    pick = [q for q, c in zip(qs, comp, strict=True) if q.both_hops_ok and not c][: args.fix_queries]
    cfg = BackpatchConfig(max_new=args.max_new, gen_pairs="upper")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    s = backpatch(m, pick, cfg, out_dir=args.fix_out or str(OUT / f"fix{args.tag}"), overwrite=True)
    dt = time.perf_counter() - t0
    rates = fix_rate(s)
    succ = s.extras["success"].mean(0)
    _plot(succ, OUT / f"backpatch-success{args.tag}.png", f"{m.name}: back-patch success (j > i), {len(pick)} queries")
    L = succ.shape[1]
    upper = succ * torch.tril(torch.ones_like(succ), -1)
    best = [(int(k) // L, int(k) % L, float(upper.flatten()[k])) for k in upper.flatten().topk(5).indices]
    _save("fix", {"rates": rates, "queries": len(pick), "seconds": dt, "max_new": args.max_new,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss0_mb": rss0 / 1024,
                  "base_correct": float(s.extras["base_correct"].sum()), "best": best,
                  "success_by_target_layer": succ.sum(0).tolist(), "success_by_source_layer": succ.sum(1).tolist()},
          args.tag)
    print(rates, f"{dt:.0f}s")


def control_stage(m, args) -> None:
    """Chance fixes: the same queries with every pair decoded; fixed by some j > i vs by some j < i patch."""
    from patchtrace.multihop.backpatch import BackpatchConfig, backpatch

    qs, comp = _queries(args)
    pick = [q for q, c in zip(qs, comp, strict=True) if q.both_hops_ok and not c][: args.fix_queries]
    t0 = time.perf_counter()
    s = backpatch(m, pick, BackpatchConfig(max_new=args.max_new, gen_pairs="all"),
                  out_dir=str(OUT / f"control{args.tag}"), overwrite=True)
    succ = s.extras["success"].bool() & ~s.extras["base_correct"].bool()[:, None, None]
    L = succ.shape[1]
    lower = torch.tril(torch.ones(L, L, dtype=torch.bool), -1)  # [j, i] with j > i
    d = {"queries": len(pick), "seconds": time.perf_counter() - t0, "max_new": args.max_new,
         "fixed_j_above_i": int((succ & lower).flatten(1).any(1).sum()),
         "fixed_j_below_i": int((succ & lower.T).flatten(1).any(1).sum()),
         "cells_j_above_i": float((succ & lower).float().sum() / (lower.sum() * len(pick))),
         "cells_j_below_i": float((succ & lower.T).float().sum() / (lower.sum() * len(pick)))}
    _save("control", d, args.tag)
    print(d)


def _plot(grid: torch.Tensor, path: Path, title: str) -> None:
    from patchtrace.cli.multihop import _heatmap

    _heatmap(grid, path, title, "fraction of queries fixed")


def bridge_stage(m, args) -> None:
    from patchtrace.multihop.bridge import BridgeConfig, bridge_readout

    qs, comp = _queries(args)
    out = {}
    for name, want in (("correct", True), ("incorrect", False)):
        pick = [q for q, c in zip(qs, comp, strict=True) if q.both_hops_ok and c == want][: args.bridge_queries]
        if not pick:
            continue
        t0 = time.perf_counter()
        s = bridge_readout(m, pick, BridgeConfig(max_new=args.bridge_max_new))
        ex = s.extras
        first = lambda t: [int(x) for x in t.tolist()]  # noqa: E731
        out[name] = {"n": len(pick), "seconds": time.perf_counter() - t0, "bridge_rate": s.values.tolist(),
                     "answer_rate": ex["answer_hits"].mean(0).tolist(), "lens_rate": ex["lens_hits"].mean(0).tolist(),
                     "bridge_layer": first(ex["bridge_layer"]), "answer_layer": first(ex["answer_layer"]),
                     "lens_layer": first(ex["lens_layer"])}
        print(name, out[name]["bridge_rate"])
    _save("bridge", out, args.tag)


def rr_stage(m, args) -> None:
    from patchtrace.multihop.recall_reasoning import RRConfig, recall_reasoning

    qs, _ = _queries(args)
    t0 = time.perf_counter()
    r = recall_reasoning(m, qs, RRConfig(n_random=args.rr_random, max_items=args.rr_items))
    d = r.summary()
    d["seconds"] = time.perf_counter() - t0
    _save("rr", d, args.tag)
    print(json.dumps(d, indent=1)[:3000])


def _median(xs: list[int]) -> str:
    xs = sorted(x for x in xs if x >= 0)
    return "–" if not xs else str(xs[len(xs) // 2])


def render(tag: str = "") -> str:
    """The BENCHMARKS.md tables from the stages' JSON files."""
    out: list[str] = []
    c = _load("classify", tag)
    if c:
        out += ["Classification (greedy 10 tokens, alias substring match; " f"{c['seconds']:.0f} s):", "",
                "| relation | queries | both hops right | composition right | both hops right, composition wrong |",
                "|---|---|---|---|---|"]
        for r, v in sorted(c["by_relation"].items()):
            out.append(f"| {r} | {v['total']} | {v['both_hops']} | {v['composition']} | {v['both_wrong_comp']} |")
        k = c["counts"]
        out += [f"| **all** | {k['total']} | {k['both_hops']} | {k['composition']} | {k['both_hops_composition_wrong']} |", ""]
    e = _load("exact", tag)
    if e:
        out += [f"Log-probability grid ({e['layers']}×{e['layers']}, position `last`), fast path vs naive HF hooks "
                "(one full forward per pair; timed on a random sample of pairs in the same run and scaled to the grid):", "",
                "| query | dtype | tokens | fast (s) | naive (s, scaled) | speed-up | max abs diff (sampled pairs) "
                "| peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
        for r in e["rows"]:
            out.append(f"| {Path(r['query']).name} | {r.get('dtype', 'float32')} | {r['tokens']} | {r['fast_s']:.2f} | "
                       f"{r['naive_s_extrapolated']:.1f} ({r['naive_pairs']} pairs) | {r['speedup']:.0f}× | "
                       f"{r['max_abs_diff']:.1e} | {r.get('peak_rss_mb', float('nan')):.0f} |")
        out.append("")
    f = _load("fix", tag)
    if f:
        out += [f"Oracle fix rate (queries with both hops right and the composition wrong; a query is fixed when some "
                f"back-patch with j > i makes the greedy {f['max_new']}-token generation contain an alias): "
                f"{f['seconds']:.0f} s for {f['queries']} queries, peak RSS {f['peak_rss_mb']:.0f} MB.", "",
                "| relation | incorrect | fixed by ≥ 1 back-patch | rate | paper (LLaMA-2/3) |", "|---|---|---|---|---|"]
        for r, v in sorted(f["rates"].items(), key=lambda kv: kv[0] != "all"):
            out.append(f"| {r} | {v['incorrect']} | {v['fixed']} | {v['rate']:.0%} | {'57–66%' if r == 'all' else ''} |")
        out += ["", "Most successful (j, i) pairs (fraction of these queries fixed): "
                + ", ".join(f"({j}, {i}) {v:.2f}" for j, i, v in f["best"]), ""]
    k = _load("control", tag)
    if k:
        out += [f"Chance-fix control ({k['queries']} queries, every pair decoded, {k['max_new']} tokens, "
                f"{k['seconds']:.0f} s): fixed by some j > i patch {k['fixed_j_above_i']}, by some j < i patch "
                f"{k['fixed_j_below_i']}; fixing cells {k['cells_j_above_i']:.1%} (j > i) vs {k['cells_j_below_i']:.1%} (j < i).", ""]
    b = _load("bridge", tag)
    if b:
        keys = list(b)
        L = len(b[keys[0]]["bridge_rate"])
        layers = list(range(0, L, 3)) + ([L - 1] if (L - 1) % 3 else [])
        out += ["Bridge readout (both hops right; patchscope of the e1 state into the identity prompt, bridge "
                "decoded; the last position's state decoded to the answer; logit lens top-1 = answer):", "",
                "| layer | " + " | ".join(f"{k}: bridge | {k}: answer | {k}: lens" for k in keys) + " |",
                "|---|" + "---|" * (3 * len(keys))]
        for li in layers:
            out.append(f"| {li} | " + " | ".join(f"{b[k]['bridge_rate'][li]:.2f} | {b[k]['answer_rate'][li]:.2f} | "
                                                 f"{b[k]['lens_rate'][li]:.2f}" for k in keys) + " |")
        out += ["", "Median first layer (queries with a hit): " + "; ".join(
            f"{k} (n={b[k]['n']}): bridge {_median(b[k]['bridge_layer'])}, answer {_median(b[k]['answer_layer'])}, "
            f"lens {_median(b[k]['lens_layer'])}" for k in keys), ""]
    r = _load("rr", tag)
    if r:
        out += [f"Recall vs reasoning ({r['n_items']['recall']} recall, {r['n_items']['reasoning']} reasoning items; "
                f"clean first-token accuracy recall {r['clean_accuracy'].get('recall', float('nan')):.2f}, reasoning "
                f"{r['clean_accuracy'].get('reasoning', float('nan')):.2f}; {r['seconds']:.0f} s):", "",
                "| level | recall-specialized | reasoning-specialized | tested |", "|---|---|---|---|"]
        for lv, v in r["counts"].items():
            out.append(f"| {lv} | {v['recall']} | {v['reasoning']} | {v['total']} |")
        out += ["", "| ablated head group | size | recall acc. drop | reasoning acc. drop | selectivity |", "|---|---|---|---|---|"]
        for g, v in r["ablation"].items():
            out.append(f"| {g} | {v['size']:.0f} | {v['recall_drop']:+.3f} | {v['reasoning_drop']:+.3f} | {v['selectivity']:+.3f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", nargs="*", default=["classify", "exact", "fix", "bridge", "rr"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. -qwen)")
    ap.add_argument("--n-cities", type=int, default=40)
    ap.add_argument("--exact-queries", type=int, default=2)
    ap.add_argument("--naive-pairs", type=int, default=40)
    ap.add_argument("--fix-queries", type=int, default=1000)
    ap.add_argument("--bridge-queries", type=int, default=20)
    ap.add_argument("--max-new", type=int, default=10)
    ap.add_argument("--fix-out", default=None, help="checkpoint folder of the fix-rate run")
    ap.add_argument("--rr-random", type=int, default=5)
    ap.add_argument("--rr-items", type=int, default=60)
    ap.add_argument("--bridge-max-new", type=int, default=6)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        print(render(args.tag))
        return
    from patchtrace.models.load import load_model

    m = load_model(args.model, dtype=args.dtype)
    for st in args.stages:
        globals()[f"{st}_stage"](m, args)


if __name__ == "__main__":
    main()
