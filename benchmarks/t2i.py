"""Benchmarks of issue 12 on the small trained text-to-image model (CPU, single thread).

    nice -n 10 .venv/bin/python benchmarks/t2i.py --out runs/t2i/bench [--weights PATH]

Writes ``bench.md`` (the tables for BENCHMARKS.md), ``bench.json`` and image grids (``--img``,
default ``docs/img/diffusion``). Sections: generation accuracy per attribute (training and held-out
combinations), LocoGen per attribute (best window, drop), batched vs naive speed (side by side in one
run), LocoEdit efficacy/specificity (localized window vs all layers vs a non-localized window), the
neuron-level variant, text-encoder tracing next to LocoGen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from patchtrace.diffusion.adapters import T2IAdapter
from patchtrace.diffusion.edit_eval import evaluate_edit
from patchtrace.diffusion.locoedit import locoedit
from patchtrace.diffusion.locogen import locogen
from patchtrace.diffusion.neurons import neuron_ablation
from patchtrace.diffusion.report import image_grid_png, locogen_report
from patchtrace.diffusion.small.data import GLYPH_WORDS, all_specs
from patchtrace.diffusion.small.evaluate import accuracy
from patchtrace.diffusion.small.pipeline import build_small
from patchtrace.diffusion.small.prompts import attribute_prompts
from patchtrace.diffusion.small.scorer import load_scorer
from patchtrace.diffusion.te_trace import trace_text_encoder

ATTRS = [("style", "boxed"), ("color", "red"), ("glyph", "seven"), ("background", "black"), ("position", "left")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("runs/t2i/bench"))
    p.add_argument("--img", type=Path, default=Path("docs/img/diffusion"))
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    a.img.mkdir(parents=True, exist_ok=True)
    pipe = build_small(a.weights)
    sc = load_scorer()
    ad = T2IAdapter(pipe, steps=a.steps, guidance=3.0)
    md, js = [], {}

    def score_of(attr: str, val: str):
        return lambda im, pi: sc.prob(im * 2 - 1, attr, val)

    # 1. accuracy
    rng = np.random.default_rng(0)
    tr, ho = all_specs(False), all_specs(True)
    n = 24 if a.quick else 64
    st = [tr[i] for i in rng.choice(len(tr), n, replace=False)]
    sh = list(ho) if n >= len(ho) else [ho[i] for i in rng.choice(len(ho), n, replace=False)]
    t = time.time()
    acc_t, acc_h = accuracy(ad, sc, st, [0, 1]), accuracy(ad, sc, sh, [0, 1])
    js["accuracy"] = {"train": acc_t, "held_out": acc_h, "seconds": time.time() - t}
    md += ["### Generation accuracy (classifier agrees with the prompt)", "",
           f"{n} random training combinations and {len(sh)} held-out ones (all of them), × 2 seeds each, {a.steps} DDIM steps, guidance 3.0.", "",
           "| attribute | training combinations | held-out (glyph, colour) combinations |", "|---|---|---|"]
    md += [f"| {k} | {acc_t[k]:.3f} | {acc_h[k]:.3f} |" for k in acc_t] + [""]
    print(md[-8:], flush=True)

    # 2. LocoGen per attribute + 3. speed on the first
    seeds = [0, 1]
    md += ["### LocoGen per attribute (window of 2 cross-attention layers of 7, 4 prompts × 2 seeds)", "",
           "| attribute | unintervened score | all layers altered | best window | its drop | drops per window |",
           "|---|---|---|---|---|---|"]
    js["locogen"] = {}
    best = {}
    for attr, val in ATTRS:
        ps, alts, _ = attribute_prompts(attr, val, 4)
        r = locogen(ad, ps, alts, score_of(attr, val), window=2, seeds=seeds)
        s = r.scores
        best[attr] = r
        locogen_report(r, a.out / f"locogen_{attr}", f"{attr}={val}")
        image_grid_png(r.images.flatten(1, 2)[:, :8], r.condition_labels, a.img / f"locogen_{attr}.png")
        drops = " ".join(f"{v:+.2f}" for v in s.values.tolist())
        md.append(f"| {attr}={val} | {s.baselines['clean']:.3f} | {s.baselines['corrupt']:.3f} | "
                  f"{list(r.best_window())} | {float(s.values.max()):+.3f} | {drops} |")
        js["locogen"][attr] = {"drops": s.values.tolist(), "best": list(r.best_window()), **s.baselines}
        print(md[-1], flush=True)
    md.append("")
    ps, alts, _ = attribute_prompts("style", "boxed", 4)
    t0 = time.time()
    fast = locogen(ad, ps, alts, score_of("style", "boxed"), window=2, seeds=seeds, batched=True)
    t1 = time.time()
    slow = locogen(ad, ps, alts, score_of("style", "boxed"), window=2, seeds=seeds, batched=False)
    t2 = time.time()
    diff = float((fast.images - slow.images).abs().max())
    js["speed"] = {"batched_s": t1 - t0, "naive_s": t2 - t1, "max_abs_image_diff": diff}
    md += ["### LocoGen speed: batched rows vs the paper's loop (same run, side by side)", "",
           "| path | pipeline calls | seconds | ratio |", "|---|---|---|---|",
           f"| naive (one call per condition × prompt × seed) | {len(slow.condition_labels) * 8} | {t2 - t1:.1f} | 1.0 |",
           f"| batched (rows of ≤ 64 in one call) | 1 | {t1 - t0:.1f} | {(t2 - t1) / (t1 - t0):.1f}× |", "",
           f"Largest image difference between the paths: {diff:.1e} (float reordering in batched matmuls).", ""]
    print(md[-6:], flush=True)

    # 4. LocoEdit on style=boxed: localized window vs all layers vs the least-localized window
    r = best["style"]
    loc = list(r.best_window())
    disjoint = [i for i, w in enumerate(r.windows) if not set(w) & set(loc)]  # a control sharing no layer
    worst = list(r.windows[min(disjoint, key=lambda i: float(r.scores.values[i]))])
    concept, anchors, _ = attribute_prompts("style", "boxed", 8, seed=5)
    md += ["### LocoEdit on style=boxed (concept: 8 boxed prompts → anchors: the same without the box; λ = 0.01)", "",
           "Efficacy: share of fresh boxed prompts (all paraphrases) still drawn boxed, before → after. Specificity: "
           "other attributes on those prompts, and all attributes on unrelated (plain) prompts, before → after.", "",
           "| edited layers | still boxed | other attributes (concept prompts) | all attributes (unrelated prompts) |",
           "|---|---|---|---|"]
    js["locoedit"] = {}
    for name, layers in [("localized " + str(loc), loc), ("all 7 layers", list(range(ad.n_layers))),
                         ("non-localized " + str(worst), worst)]:
        patch = locoedit(ad, layers, concept, anchors)
        rep = evaluate_edit(ad, sc, patch, "style", "boxed", seeds)
        js["locoedit"][name] = rep
        md.append(f"| {name} | {rep['concept_shows_attribute_before']:.2f} → {rep['concept_shows_attribute_after']:.2f} | "
                  f"{rep['concept_other_attributes_before']:.2f} → {rep['concept_other_attributes_after']:.2f} | "
                  f"{rep['unrelated_all_attributes_before']:.2f} → {rep['unrelated_all_attributes_after']:.2f} |")
        print(md[-1], flush=True)
    md.append("")

    # neuron-level variant
    neutral = attribute_prompts("style", "boxed", 4, seed=1)[1]
    nr = {}
    for k in (4, 16):
        res = neuron_ablation(ad, ps, neutral, loc, k, score_of("style", "boxed"), seeds)
        nr[k] = {x: res[x] for x in ("score", "ablated_score", "drop")}
    js["neurons"] = nr
    md += ["### Neuron-level LocoGen (style=boxed, top-k K/V neurons of the localized window set to the neutral mean)",
           "", "| k per projection | score | ablated | drop |", "|---|---|---|---|"]
    md += [f"| {k} | {v['score']:.3f} | {v['ablated_score']:.3f} | {v['drop']:+.3f} |" for k, v in nr.items()] + [""]

    # 5. text-encoder tracing vs LocoGen
    md += ["### Text-encoder causal tracing next to LocoGen (noise 3σ on the attribute's words; restore one layer)", "",
           "| attribute | clean | corrupted | restored effect per text-encoder layer 0, 1, 2 | LocoGen best UNet window |",
           "|---|---|---|---|---|"]
    js["te_trace"] = {}
    for attr, val in [("color", "red"), ("glyph", "seven"), ("background", "black")]:
        ps2, _, _ = attribute_prompts(attr, val, 4)
        words = [GLYPH_WORDS.get(val, val)] * len(ps2)
        s, _, _ = trace_text_encoder(ad, ps2, words, score_of(attr, val), seeds)
        eff = " ".join(f"{v:+.2f}" for v in s.values.tolist())
        md.append(f"| {attr}={val} | {s.baselines['clean']:.3f} | {s.baselines['corrupt']:.3f} | {eff} | "
                  f"{js['locogen'][attr]['best']} |")
        js["te_trace"][attr] = {"effects": s.values.tolist(), **s.baselines}
        print(md[-1], flush=True)
    md.append("")
    (a.out / "bench.md").write_text("\n".join(md))
    (a.out / "bench.json").write_text(json.dumps(js, indent=1, default=float))
    print("\n".join(md))


if __name__ == "__main__":
    main()
