"""DBM on SmolLM2 variable binding: λ sweep (sparsity vs held-out accuracy) against top-k exact patching.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dbm.py --write          # writes the BENCHMARKS.md section
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dbm.py --n 32 --steps 40 --lams 0.05,0.2   # quicker

What it does: generate variable-binding items SmolLM2 solves (reports generated/solved), build the
two desiderata (value dependence, operation invariance), split each 50/50 into train/held-out,
rank components (every head + every MLP output at the last token) by exact activation patching on
the training tuples, train one DBM mask per λ (the training runs are cached once and shared), and
evaluate every binary mask and the top-k exact-patching set at the same k *exactly* (sweep engine)
on the held-out tuples. Writes ``runs/bench-dbm.json`` and the plot ``benchmarks/out/dbm_sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- BEGIN dbm -->", "<!-- END dbm -->"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32, help="items the model solves (split 50/50)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--lams", default="0.01,0.05,0.2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    ap.add_argument("--render", default=None, help="re-render a saved runs/bench-dbm.json (no compute)")
    args = ap.parse_args()
    if args.render:
        r = json.loads(Path(args.render).read_text())
        _emit(_render(r, _plot(r, ROOT / "benchmarks" / "out" / "dbm_sweep.png")), args.write)
        return

    from patchtrace import load_model
    from patchtrace.desiderata import split_desiderata, tokenize_desiderata
    from patchtrace.methods import dbm
    from patchtrace.sites import parse_site
    from patchtrace.tasks.variable_binding import desiderata_from_variable_binding, variable_binding_task

    t_all = time.perf_counter()
    model = load_model()
    t0 = time.perf_counter()
    task = variable_binding_task(args.n, args.seed, model)
    t_task = time.perf_counter() - t0
    ds = desiderata_from_variable_binding(task)
    train, test = split_desiderata(ds, 0.5, args.seed)
    train_t = tokenize_desiderata(train, model.tokenizer)
    test_t = tokenize_desiderata(test, model.tokenizer)
    specs = dbm.parse_specs("head,mlp_out")
    comps = dbm.components(model, specs)
    n_heads_total = model.dims.n_layers * model.dims.n_heads
    print(f"items solved {task.params['n_solved']}/{task.params['n_generated']} ({t_task:.0f} s); "
          f"{len(comps)} components", flush=True)

    t0 = time.perf_counter()
    store = dbm.RunStore()
    points = {c.point for c in comps}
    for td in train_t:  # collect every point once; ranking, training and evaluation reuse the runs
        for idx in td.groups():
            store.get(model, td, "original", idx, points)
            store.get(model, td, "alternate", idx, points)
    ranking = dbm.exact_patching_ranking(model, train_t, specs, runs=store)
    t_rank = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = dbm.prepare(model, train_t, comps, runs=store)
    t_prep = time.perf_counter() - t0

    lams = [float(x) for x in args.lams.split(",")]
    runs = []
    step_times = []
    for lam in lams:
        cfg = dbm.DBMConfig(lam=lam, steps=args.steps, lr=args.lr, seed=args.seed)
        t0 = time.perf_counter()
        tm = dbm.train_mask(model, train_t, comps, cfg, prepared=prepared)
        dt = time.perf_counter() - t0
        step_times.append(dt / max(args.steps, 1))
        k = len(tm.kept)
        runs.append({"lam": lam, "kept": [str(s) for s in tm.kept], "k": k,
                     "n_heads": sum(s.kind == "head" for s in tm.kept),
                     "final_task_loss": tm.history[-1]["task"] if tm.history else None, "train_s": dt})
        print(f"λ={lam}: kept {k} ({dt:.0f} s): {[str(s) for s in tm.kept][:12]}", flush=True)

    ks = sorted({r["k"] for r in runs} | {1, 2, 3, 5, 8, 13, 20, 30})
    sets = [[parse_site(s) for s in r["kept"]] for r in runs] + [[s for s, _ in ranking[:k]] for k in ks] + [[]]
    t0 = time.perf_counter()
    acc = dbm.evaluate_site_sets(model, test_t, sets)
    train_acc = dbm.evaluate_site_sets(model, train_t, sets[: len(runs)], runs=store)
    t_eval = time.perf_counter() - t0
    names = [td.name for td in test_t]
    for i, r in enumerate(runs):
        r["heldout"] = dict(zip(names, acc[i].tolist()))
        r["heldout_mean"] = float(acc[i].mean())
        r["train_mean"] = float(train_acc[i].mean())
        j = len(runs) + ks.index(r["k"])
        r["topk_heldout"] = dict(zip(names, acc[j].tolist()))
        r["topk_mean"] = float(acc[j].mean())
        r["topk_sites"] = [str(s) for s in sets[j]]
    topk_curve = [{"k": k, "heldout": dict(zip(names, acc[len(runs) + i].tolist())),
                   "mean": float(acc[len(runs) + i].mean())} for i, k in enumerate(ks)]
    unpatched = dict(zip(names, acc[-1].tolist()))
    result = {
        "model": model.name, "n_generated": task.params["n_generated"], "n_solved": task.params["n_solved"],
        "format": task.params["format"], "shots": task.params["shots"], "n_vars": task.params["n_vars"],
        "n_train": {td.name: len(td) for td in train_t}, "n_heldout": {td.name: len(td) for td in test_t},
        "n_components": len(comps), "n_heads_total": n_heads_total, "steps": args.steps, "lr": args.lr,
        "runs": runs, "topk_curve": topk_curve, "unpatched": unpatched,
        "top_ranked": [(str(s), v) for s, v in ranking[:10]],
        "times_s": {"task": t_task, "rank": t_rank, "prepare": t_prep, "step_mean": sum(step_times) / len(step_times),
                    "eval": t_eval, "total": time.perf_counter() - t_all},
        "torch_threads": torch.get_num_threads(),
    }
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs" / "bench-dbm.json").write_text(json.dumps(result, indent=2))
    png = _plot(result, ROOT / "benchmarks" / "out" / "dbm_sweep.png")
    _emit(_render(result, png), args.write)


def _emit(text: str, write: bool) -> None:
    print(text)
    if write:
        bm = ROOT / "BENCHMARKS.md"
        cur = bm.read_text() if bm.exists() else "# Benchmarks\n"
        block = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in cur and END in cur:
            cur = cur[: cur.index(BEGIN)] + block + cur[cur.index(END) + len(END):]
        else:
            cur = cur.rstrip("\n") + "\n\n" + block + "\n"
        bm.write_text(cur)


def _plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["k"] for c in r["topk_curve"]], [c["mean"] for c in r["topk_curve"]], "o-", color="grey",
            label="top-k exact activation patching")
    ax.plot([x["k"] for x in r["runs"]], [x["heldout_mean"] for x in r["runs"]], "s", color="C0", ms=8,
            label="DBM binary mask")
    for x in r["runs"]:
        ax.annotate(f"λ={x['lam']:g}", (x["k"], x["heldout_mean"]), textcoords="offset points", xytext=(4, -14 if x["lam"] != r["runs"][0]["lam"] else 6))
    ax.axhline(sum(r["unpatched"].values()) / len(r["unpatched"]), color="k", ls=":", lw=1, label="unpatched")
    ax.set_xscale("log")
    ax.set_xlabel("components patched (k)")
    ax.set_ylabel("held-out desiderata accuracy (mean)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"SmolLM2-135M variable binding ({r['n_components']} components)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _render(r: dict, png: Path) -> str:
    names = list(r["unpatched"])
    ts = r["times_s"]
    lines = [
        "## DBM: desiderata-based masking on SmolLM2 variable binding",
        "",
        "```bash",
        "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dbm.py --write",
        "```",
        "",
        f"Task: `variable_binding` (format `{r['format']}`, {r['n_vars']} variables, {r['shots']}-shot prefix), e.g. "
        "`a = 3\\nb = 7\\nc = a\\nprint(c)  # prints ` → `3`. SmolLM2 solved (original, value alternate and "
        f"operation alternate all correct) **{r['n_solved']} of {r['n_generated']}** generated items; "
        f"train/held-out per desideratum: {r['n_train']} / {r['n_heldout']}. Components: all "
        f"{r['n_heads_total']} heads + {r['n_components'] - r['n_heads_total']} MLP outputs at the last token. "
        f"Mask: clamp parametrization, Adam lr {r['lr']}, {r['steps']} steps, loss 5·CE(value) + 1·CE(invariance) + "
        "λ·Σ(m+0.001)^0.5; binarized at 0.5 and evaluated exactly (one multi-site patch, sweep engine). "
        f"Unpatched held-out accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in r["unpatched"].items()) + ".",
        "",
        "| λ | kept (heads / total) | % of heads | held-out acc (mean) | " + " | ".join(names)
        + " | top-k exact patching, same k (mean) | " + " | ".join(f"top-k {n}" for n in names) + " | train acc |",
        "|---|---|---|---|" + "---|" * len(names) + "---|" + "---|" * len(names) + "---|",
    ]
    for x in r["runs"]:
        lines.append(
            f"| {x['lam']:g} | {x['n_heads']} / {x['k']} | {100 * x['n_heads'] / r['n_heads_total']:.1f}% | "
            f"**{x['heldout_mean']:.2f}** | " + " | ".join(f"{x['heldout'][n]:.2f}" for n in names)
            + f" | {x['topk_mean']:.2f} | " + " | ".join(f"{x['topk_heldout'][n]:.2f}" for n in names)
            + f" | {x['train_mean']:.2f} |"
        )
    lines += [
        "",
        "Top-k exact activation patching alone (held-out mean accuracy): "
        + ", ".join(f"k={c['k']}: {c['mean']:.2f}" for c in r["topk_curve"]) + ".",
        "",
        "Kept components per λ: " + "; ".join(f"λ={x['lam']:g}: " + (", ".join(f"`{s}`" for s in x["kept"][:15])
                                                                  + (" …" if len(x["kept"]) > 15 else "") or "none")
                                            for x in r["runs"]) + ".",
        "",
        _verdict(r),
        "",
        f"Plot: `{png.relative_to(ROOT)}`. Times (2-core box; load average {os.getloadavg()[0]:.1f} at the end): task generation "
        f"{ts['task']:.0f} s, exact-patching ranking {ts['rank']:.0f} s, caching the training runs {ts['prepare']:.0f} s, "
        f"{ts['step_mean']:.2f} s per training step (all training tuples, forward + backward over the last "
        f"token only), exact evaluation {ts['eval']:.0f} s; total {ts['total']:.0f} s.",
    ]
    return "\n".join(lines)


def _verdict(r: dict) -> str:
    """The issue's target, checked against this run, in words."""
    n_test = min(r["n_heldout"].values())
    hits = [x for x in r["runs"] if x["n_heads"] <= 0.02 * r["n_heads_total"] and x["heldout_mean"] >= 0.8]
    better = sum(x["heldout_mean"] > x["topk_mean"] + 1e-9 for x in r["runs"])
    tied = sum(abs(x["heldout_mean"] - x["topk_mean"]) <= 1e-9 for x in r["runs"])
    worse = len(r["runs"]) - better - tied
    common = sorted(set.intersection(*[set(x["kept"]) for x in r["runs"]])) if r["runs"] else []
    s = "**Target** (≤ 2% of heads, ≥ 80% held-out desiderata accuracy, better than top-k exact patching at equal k): "
    if hits:
        s += "sparsity and accuracy met by " + ", ".join(
            f"λ={x['lam']:g} ({x['n_heads']} heads = {100 * x['n_heads'] / r['n_heads_total']:.1f}%, "
            f"+{x['k'] - x['n_heads']} MLP, mean {x['heldout_mean']:.2f}, value {x['heldout']['value_dependence']:.2f})"
            for x in hits) + ". "
    else:
        s += "no λ met sparsity and accuracy together. "
    s += (f"Against top-k exact patching at equal k the mask is better for {better}, tied for {tied} and worse for "
          f"{worse} of {len(r['runs'])} λ values. With {n_test} held-out tuples per desideratum one tuple moves a "
          f"desideratum's accuracy by {1 / n_test:.2f} (the mean by {0.5 / n_test:.2f}), so on this model DBM "
          "*matches* single-component exact patching rather than clearly beating it. Components kept at every λ: "
          + (", ".join(f"`{c}`" for c in common) or "none")
          + "; top of the exact-patching ranking: " + ", ".join(f"`{c}`" for c, _ in r["top_ranked"][:5]) + ".")
    return s


if __name__ == "__main__":
    main()
