"""Robust Weight Signatures reproduced on scikit-learn's digits: tables for BENCHMARKS.md and pictures.

    nice -n 10 .venv/bin/python benchmarks/rws.py              # full configuration (RWSConfig())
    nice -n 10 .venv/bin/python benchmarks/rws.py --tiny       # the test suite's configuration

Trains θ0, the clean fine-tunes and the per-corruption fine-tunes (two splits × two seeds), measures
observations (i)–(vi) (:func:`patchtrace.weights.rws.run_rws`), writes ``runs/rws/result.json``, the
markdown tables to stdout and ``runs/rws/tables.md``, and the pictures to ``docs/img/weights/``:
``rws_layer_norms.png`` (per-layer delta norms), ``rws_similarity.png`` (signature similarity matrix)
and ``rws_alpha.png`` (scaling curves). One torch thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def tables(r: dict) -> str:
    cs = r["config"]["corruptions"]
    a = r["accuracy"]
    q = r["config"]["levels"]
    lines = ["Accuracy (%) on the held-out test digits, clean / under the corruption of the row.", "",
             "| corruption | θ0 | clean model | robust fine-tune | clean + RWS | clean + RWS (Q" + str(q) + ") | clean + composed (w=1/K) | clean + composed (w=1) | transfer: clean_B | clean_B + RWS_A | robust_B |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cs:
        cells = [a["theta0"], a["clean"], a[f"robust:{c}"], a[f"clean+RWS:{c}"], a[f"clean+RWS_q:{c}"],
                 a["clean+composed/K"], a["clean+composed"], a["B:clean"], a[f"B:clean+RWS_A:{c}"], a[f"B:robust:{c}"]]
        lines.append(f"| {c} | " + " | ".join(f"{pct(x['clean'])} / {pct(x[c])}" for x in cells) + " |")
    mean = lambda key: sum(a[key.format(c=c)][c] for c in cs) / len(cs)  # noqa: E731
    lines += ["", f"Mean own-corruption accuracy: clean {pct(mean('clean'))}, robust {pct(mean('robust:{c}'))}, "
              f"clean+RWS {pct(mean('clean+RWS:{c}'))}, clean+RWS on all layers {pct(mean('clean+RWS_all_layers:{c}'))}; "
              f"share of the robust gain recovered by RWS: "
              f"{pct((mean('clean+RWS:{c}') - mean('clean')) / max(mean('robust:{c}') - mean('clean'), 1e-9))}%; "
              + (f"clean model with only {'+'.join(r['config']['keep'])} fine-tuned on the corruption "
                 f"{pct(mean('clean+shallow_ft:{c}'))} (clean acc "
                 f"{pct(sum(a[f'clean+shallow_ft:{c}']['clean'] for c in cs) / len(cs))}); "
                 if f"clean+shallow_ft:{cs[0]}" in a else "")
              + f"transfer (split B): clean {pct(sum(a['B:clean'][c] for c in cs) / len(cs))}, "
              f"+RWS_A {pct(mean('B:clean+RWS_A:{c}'))}, robust_B {pct(mean('B:robust:{c}'))}.", ""]
    lines += ["(i) Per-layer ‖Δ‖/‖θ0‖ (mean over corruptions for the robust rows):", "",
              "| layer | clean fine-tune | robust fine-tune | robust − clean | RWS (projected) |", "|---|---|---|---|---|"]
    for layer, v in r["layer_norms"].items():
        lines.append(f"| {layer} | {v['clean']:.3f} | {v['robust']:.3f} | {v['robust_minus_clean']:.3f} | {v['rws']:.3f} |")
    lines += ["", "Where the signature lives: clean model + RWS restricted to some layers (mean over corruptions):", "",
              "| layers | bytes | clean acc | own-corruption acc |", "|---|---|---|---|"]
    for k, v in r["depth"].items():
        lines.append(f"| {k} | {v['bytes']} | {pct(v['clean'])} | {pct(v['corrupted'])} |")
    s = r["similarity"]
    lines += ["", f"(ii) Cosine similarity of signatures: within a corruption (other split/seed) "
              f"{s['summary']['within']:.3f}, across corruptions {s['summary']['across']:.3f} "
              f"(raw deltas before projection: {s['raw_summary']['within']:.3f} / {s['raw_summary']['across']:.3f}).", "",
              "(iv) Quantized signatures (mean over corruptions; full float32 weight copy = "
              f"{r['bytes']['model']} bytes):", "",
              "| scheme | levels | bytes per signature | full copy / signature | clean acc | own-corruption acc |",
              "|---|---|---|---|---|---|"]
    for row in r["quant"]:
        lines.append(f"| {row['scheme']} | {row['levels'] or '-'} | {row['bytes']} | {row['model_over_patch']:.1f}× | "
                     f"{pct(row['clean'])} | {pct(row['corrupted'])} |")
    lines += ["", "(v) Scaling α (clean acc / own-corruption acc):", "",
              "| corruption | " + " | ".join(f"α={x[0]:g}" for x in next(iter(r["alpha"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(r["alpha"].values())))]
    for c, rows in r["alpha"].items():
        lines.append(f"| {c} | " + " | ".join(f"{pct(x[1])} / {pct(x[2])}" for x in rows) + " |")
    lines += ["", f"Apply all signatures in place, then remove them: bit-exact = {r['removed_exact']}. "
              f"Train {r['seconds']['train']:.0f} s, measure {r['seconds']['measure']:.0f} s (1 thread)."]
    return "\n".join(lines)


def plots(r: dict, img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    layers = list(r["layer_norms"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    keys = [("clean", "clean fine-tune"), ("robust", "robust fine-tune"), ("robust_minus_clean", "robust − clean"), ("rws", "RWS")]
    w = 0.2
    for i, (k, lab) in enumerate(keys):
        ax.bar([j + (i - 1.5) * w for j in range(len(layers))], [r["layer_norms"][x][k] for x in layers], w, label=lab)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_ylabel("‖Δ‖ / ‖θ0‖ per layer")
    ax.set_title("Per-layer weight change (digits CNN, shallow → deep)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "rws_layer_norms.png", dpi=110)
    plt.close(fig)

    s = r["similarity"]
    m = torch.tensor(s["matrix"])
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(m)), s["labels"], rotation=90, fontsize=6)
    ax.set_yticks(range(len(m)), s["labels"], fontsize=6)
    ax.set_title("Cosine similarity of robust weight signatures")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(img / "rws_similarity.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for c, rows in r["alpha"].items():
        ax.plot([x[0] for x in rows], [100 * x[2] for x in rows], marker="o", label=f"{c} (corrupted)")
        ax.plot([x[0] for x in rows], [100 * x[1] for x in rows], ls="--", alpha=0.5, color=ax.lines[-1].get_color())
    ax.set_xlabel("α (clean model + α·RWS_c)")
    ax.set_ylabel("accuracy (%)  — dashed: clean")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "rws_alpha.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="runs/rws")
    ap.add_argument("--img", default="docs/img/weights")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from patchtrace.weights.rws import RWSConfig, run_rws

    cfg = RWSConfig.tiny() if args.tiny else RWSConfig()
    t = time.perf_counter()
    res = run_rws(cfg, on_progress=lambda d, n: print(f"trained {d}/{n}", flush=True)).to_dict()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    md = tables(res)
    (out / "tables.md").write_text(md)
    print(md)
    if not args.tiny:
        plots(res, Path(args.img))
    print(f"total {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
