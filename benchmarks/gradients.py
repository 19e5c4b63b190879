"""Gradient-based estimators (AtP, AtP*, IG, RelP) against exact patching on SmolLM2 IOI.

Task: IOI, n=16, seed 0 (all prompts 14 tokens). Sites: resid_pre, attn_out, mlp_out per
(layer × position); heads at the last position. Exact = :func:`activation_patching.run` (fast
engine, denoising, logit difference). Each method's time is measured in this process, next to one
clean+corrupt forward pair over the same 16 examples, and reported as a ratio (the box is shared, so
absolute seconds are inflated; ratios measured side by side are the comparable numbers).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gradients.py --out BENCHMARKS.md
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gradients.py --graddrop --repeats 5   # AtP* cost only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gradients.py --graddrop --groups 3 5 --repeats 3
        # + coarser GradDrop (grad_drop_groups), its cost and its agreement with per-layer GradDrop and exact
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from patchtrace import SiteSpec, load_model, make_task
from patchtrace.methods import atp_star, compare, relp
from patchtrace.models.runner import LRPRules

BEGIN = "<!-- BEGIN gradients -->"
END = "<!-- END gradients -->"
COMMAND = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} .venv/bin/python benchmarks/gradients.py --out BENCHMARKS.md"
KINDS = ("resid_pre", "attn_out", "mlp_out", "head")


def write_section(path: Path, section: str) -> None:
    """Replace our marked section of ``path`` (or append it), leaving the rest untouched."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        a, z = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + section.rstrip("\n") + text[z:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def graddrop_only(model: Any, task: Any, specs: list[SiteSpec], repeats: int, groups: list[int]) -> int:
    """AtP* with GradDrop, without it, and a clean+corrupt forward pair, timed in turn ``repeats`` times
    (fastest of each counts), so that contention hits all three alike; prints the ratios. With
    ``groups``, also AtP* with ``grad_drop_groups=G`` for each G, and how each agrees with per-layer
    GradDrop and with exact patching's ``E|effect|``."""
    L = model.dims.n_layers
    out: dict[str, list[Any]] = {}

    def keep(name: str, cfg: Any) -> Any:
        return lambda: out.__setitem__(name, atp_star.run_many(model, task, specs, cfg))

    fns = {
        "forward pair": lambda: compare.forward_pair_seconds(model, task, repeats=1),
        "atp* without GradDrop": lambda: atp_star.run_many(model, task, specs, atp_star.AtPStarConfig(grad_drop=False)),
        "atp* with GradDrop": keep("atp* with GradDrop", atp_star.AtPStarConfig(grad_drop_groups=None)),  # per layer
    }
    for g in groups:
        fns[f"atp* with GradDrop, {g} groups"] = keep(f"atp* with GradDrop, {g} groups", atp_star.AtPStarConfig(grad_drop_groups=g))
    best = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))  # process CPU time: what other processes' load barely changes
    for r in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
        print(f"repeat {r + 1}/{repeats}, load {os.getloadavg()[0]:.1f}: "
              + ", ".join(f"{k} {v:.3f} s (cpu {cpu[k]:.3f} s)" for k, v in best.items()), flush=True)
    pair, pair_cpu = best["forward pair"], cpu["forward pair"]
    print(f"\n{COMMAND.replace('--out BENCHMARKS.md', '--graddrop --repeats ' + str(repeats))}; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| | wall s (four grids) | × forward pair | CPU s | × forward pair (CPU) |\n|---|---|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {t:.3f} | {t / pair:.2f} | {cpu[name]:.3f} | {cpu[name] / pair_cpu:.2f} |")
    drop = best["atp* with GradDrop"] - best["atp* without GradDrop"]
    dcpu = cpu["atp* with GradDrop"] - cpu["atp* without GradDrop"]
    print(f"| GradDrop alone (difference) | {drop:.3f} | {drop / pair:.2f} | {dcpu:.3f} | {dcpu / pair_cpu:.2f} |")
    print(f"\nGradDrop work: L(L−1)/2 = {L * (L - 1) // 2} single-stream block VJPs in {L - 1} batched calls; a forward "
          f"pair is 2L = {2 * L} block forwards, so at equal FLOP rates GradDrop alone is ≥ {(L - 1) / 4:.2f} forward pairs.")
    for g in groups:
        vjps = sum(a for a, _ in atp_star.layer_groups(L, g))
        print(f"{g} groups {atp_star.layer_groups(L, g)}: {vjps} block VJPs, ≥ {vjps / (2 * L):.2f} forward pairs.")
    if groups:
        from patchtrace.methods import activation_patching as ap

        exact = [ap.run(model, task, s) for s in specs]
        ref = [compare.reference_for(e, x) for e, x in zip(exact, out["atp* with GradDrop"], strict=True)]
        print("\nSpearman on the cells not zero by causality (the per-layer score or E|effect| non-zero); Pearson on all.\n"
              "| estimator | grid | cells | Pearson with per-layer | Spearman with per-layer | top-10 overlap with per-layer "
              "| Spearman with exact E|effect| |\n|---|---|---|---|---|---|---|")
        for name, scores in out.items():
            for spec, rv, s, p in zip(specs, ref, scores, out["atp* with GradDrop"], strict=True):
                nz = (p.values.abs() > 0) | (rv.abs() > 1e-6)
                print(f"| {name} | {spec.kind} | {int(nz.sum())} | {compare.pearson(s.values, p.values):.4f} | "
                      f"{compare.spearman(s.values[nz], p.values[nz]):.4f} | {compare.top_k_overlap(s.values, p.values, 10):.1f} | "
                      f"{compare.spearman(s.values[nz], rv[nz]):.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="markdown file whose gradients section to (re)write")
    ap.add_argument("--save", type=Path, default=Path("runs/bench-gradients"), help="folder for Scores and plots")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats per gradient method (fastest counts)")
    ap.add_argument("--graddrop", action="store_true",
                    help="only time AtP* with and without GradDrop next to the forward pair (interleaved, fastest of --repeats)")
    ap.add_argument("--groups", type=int, nargs="*", default=[],
                    help="with --graddrop: also AtP* with grad_drop_groups=G for each G (the default is 5), "
                    "and its agreement with per-layer GradDrop and exact")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = load_model()
    task = make_task("ioi", n=args.n, seed=0, model=model).tokenize(model.tokenizer)
    specs = [
        SiteSpec("resid_pre", positions="all"),
        SiteSpec("attn_out", positions="all"),
        SiteSpec("mlp_out", positions="all"),
        SiteSpec("head", per_unit=True, positions="last"),
    ]
    if args.graddrop:
        return graddrop_only(model, task, specs, args.repeats, args.groups)
    cfg = compare.CompareConfig(repeats=args.repeats)
    res = compare.run(model, task, specs, ["atp", "atp_star", "ig", "relp"], cfg, out_dir=args.save)
    report, scores = res.report, res.scores
    pair = report["forward_pair_s"]
    ex = scores["activation_patching"]
    # variants, timed the same way
    variants: dict[str, tuple[float, list[float]]] = {}
    for name, fn in {
        "relp (AH rule: pattern frozen)": lambda: relp.run_many(model, task, specs, relp.RelPConfig(rules=LRPRules())),
        "atp* without GradDrop (signed)": lambda: atp_star.run_many(model, task, specs, atp_star.AtPStarConfig(grad_drop=False)),
    }.items():
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            s = fn()
            best = min(best, time.perf_counter() - t0)
        variants[name] = (best, [compare.pearson(e.values, x.values) for e, x in zip(ex, s, strict=True)])
    head_e, head_a, head_r = ex[3].values, scores["atp"][3].values, scores["relp"][3].values
    l20 = {"exact": float(head_e[20, 0]), "atp": float(head_a[20, 0]), "relp": float(head_r[20, 0]),
           "ig": float(scores["ig"][3].values[20, 0])}
    report["variants"] = {k: {"time_s": t, "pearson": dict(zip(KINDS, p, strict=True))} for k, (t, p) in variants.items()}
    report["L20.H0"] = l20
    (args.save / "report.json").write_text(json.dumps(report, indent=2, default=str))

    k = report["kinds"]
    methods = ["atp", "atp_star", "ig", "relp"]
    lines = [
        BEGIN,
        "## Gradient-based localization vs exact patching (AtP, AtP*, IG, RelP)",
        "",
        f"Command: `{COMMAND}` (script `benchmarks/gradients.py`). SmolLM2-135M-Instruct, float32, CPU; IOI n={len(task)}, "
        "seed 0, denoising, logit difference. Sites: resid_pre / attn_out / mlp_out per layer × position (30 × 14 cells each), "
        "heads at the last position (30 × 9). Exact = `activation_patching.run` (fast engine). AtP* = QK fix + GradDrop: "
        "its scores are magnitudes, so it is correlated with the per-example mean of |effect|. IG = 5 steps along "
        "the embedding interpolation (EAP-IG convention, α = k/5, k = 0..4). RelP = norm + identity + half rules "
        "(authors' default; attention not frozen).",
        "",
        "Pearson with exact patching (Spearman, top-10 overlap in brackets):",
        "",
        "| site kind | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for kind in KINDS:
        row = k[kind]
        lines.append(f"| {kind} | " + " | ".join(
            f"{row[m]['pearson']:.3f} ({row[m]['spearman']:.3f}, {row[m]['top_k_overlap']:.1f})" for m in methods) + " |")
    lines += [
        "",
        f"Time, measured in the same process (box shared with other agents: {os.cpu_count()} cores, load varies). "
        f"Each gradient method ran {args.repeats}× and its fastest run counts; a clean+corrupt forward pair over the "
        f"{len(task)} examples was timed (median of 3) before every run and its fastest = {pair:.3f} s is the unit:",
        "",
        "| method | seconds (all four site kinds) | × forward pair |",
        "|---|---|---|",
    ]
    for m in ["activation_patching", *methods]:
        label = "exact" if m == "activation_patching" else m
        lines.append(f"| {label} | {report['time_s'][m]:.2f} | {report['time_vs_forward_pair'][m]:.1f} |")
    lines += ["", "Variants (Pearson per kind, time):", ""]
    for name, (t, p) in variants.items():
        lines.append(f"- {name}: " + ", ".join(f"{kk} {v:.3f}" for kk, v in zip(KINDS, p, strict=True))
                     + f"; {t:.2f} s = {t / pair:.1f}× pair")
    lines += [
        "",
        f"Head L20.H0 (AtP's known false negative, peer baseline exact +3.14 / AtP +0.51): exact {l20['exact']:+.2f}, "
        f"AtP {l20['atp']:+.2f}, IG {l20['ig']:+.2f}, RelP {l20['relp']:+.2f}.",
        "",
        "Reference (RelP paper, GPT-2 small IOI, Pearson AtP → RelP): resid 0.753 → 0.968, attn 0.979 → 0.962, "
        "MLP 0.195 → 0.992. Peer baseline (SmolLM2 IOI heads, last position): AtP 0.929.",
        "",
        "Targets (issue 4):",
        "",
    ]
    for kind in KINDS:
        r, a = k[kind]["relp"]["pearson"], k[kind]["atp"]["pearson"]
        ok = r >= 0.9 and r >= a
        lines.append(f"- RelP Pearson ≥ 0.9 and ≥ AtP on {kind}: {'met' if ok else 'MISSED'} ({r:.3f} vs AtP {a:.3f}"
                     + ("" if r >= 0.9 else f"; short of 0.9 by {0.9 - r:.3f}") + ")")
    for m in methods:
        x = report["time_vs_forward_pair"][m]
        why = ""
        if x >= 5 and m == "atp_star":
            why = (" — GradDrop is L = 30 extra vector–Jacobian products, each from layer l down (≈ L/2 full "
                   "backward passes on top of AtP); the QK fix alone costs nothing extra (see the variant above)")
        elif x >= 5 and m == "ig":
            why = " — IG is m = 5 forward+backward passes by construction (batched as one 5×-wide pass)"
        lines.append(f"- {m} < 5× a forward pair: {'met' if x < 5 else 'MISSED'} ({x:.1f}×){why}")
    lines += [
        "",
        "Spearman is lower for IG and RelP than for AtP on the position grids: most of the 420 cells per kind "
        "have near-zero effects (positions that carry no name information), and their order is noise; Pearson "
        "and the top-10 overlap are carried by the few large cells. AtP*'s scores are GradDrop magnitudes, "
        "compared with E|effect| rather than the signed effect, so its row is not directly comparable.",
        END,
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out:
        write_section(args.out, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
