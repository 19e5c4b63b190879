"""Localized LoRA on SmolLM2-135M: teach counterfactual capitals, LoRA on the traced layers vs all vs random.

    nice -n 10 .venv/bin/python benchmarks/lora.py            # writes runs/lora/result.json and a table

The task: rewrite ``N`` capitals the model knows ("The capital of France is" → " Rome", a rotation
of the edited capitals among themselves); a few unedited true facts ("anchors") are mixed into the
training set, as fact-editing fine-tunes do, so that the cheap solution "answer one of the new
capitals whatever the country" is penalized; retention is measured on other unedited facts. Why this task: SmolLM2 gets 0% of it before training (real
room to improve), it is the ROME setting where causal tracing gives a meaningful localization (the
MLPs that recall the fact), and it has clean side-effect measures: paraphrases of the edited facts
(generalization), unedited facts (retention) and unrelated text (KL).

Localization: ROME causal tracing (restore a window of MLP outputs, noise on the subject) on the edited
prompts; the ``k`` layers with the largest indirect effect get LoRA. Arms, same rank/steps/lr:
localized k layers, k random layers (seeded, avoiding the localized ones), all layers. Every arm
trains LoRA on the MLP projections, is merged into a WeightPatch, applied with a receipt, evaluated,
and removed (the model is checked bit-exact between arms). One torch thread.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

UNRELATED = [
    "The mitochondria is the powerhouse of the cell, producing most of its chemical energy.",
    "To bake bread, mix flour, water, yeast and salt, then let the dough rise for an hour.",
    "In 1969, astronauts landed on the Moon and walked on its surface for the first time.",
    "Python is a programming language that emphasizes readability and simple syntax.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "A triangle has three sides, and the sum of its angles is 180 degrees.",
    "Shakespeare wrote many plays, including Hamlet, Macbeth and Romeo and Juliet.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--anchors", type=int, default=6, help="unedited true facts mixed into training (preservation)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--samples", type=int, default=3, help="causal-tracing noise samples")
    ap.add_argument("--window", type=int, default=5, help="causal-tracing MLP window")
    ap.add_argument("--random-seeds", default="0", help="one random-layer arm per seed, e.g. '0,1,2'")
    ap.add_argument("--no-all", action="store_true", help="skip the all-layers arm")
    ap.add_argument("--out", default="runs/lora")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from patchtrace import load_model, make_task
    from patchtrace.methods.causal_tracing import TracingConfig
    from patchtrace.methods.causal_tracing import run as causal_trace
    from patchtrace.tasks.factual import CAPITALS, TEMPLATES
    from patchtrace.weights import base_hash
    from patchtrace.weights.finetune import size_report
    from patchtrace.weights.lm_tune import answer_batches, exact_match, kl_on_text, lm_loss, text_logprobs
    from patchtrace.weights.lora import layers_from_scores, random_layers, train_lora

    t_all = time.perf_counter()
    m = load_model("smollm2-135m")
    hf, tok = m.hf, m.tokenizer
    hf.eval()
    from patchtrace.tasks.filtering import greedy_next_tokens

    # every capital the model gets right (single-token answers), in a seeded order
    cands = [c for c in CAPITALS if len(tok(" " + CAPITALS[c], add_special_tokens=False).input_ids) == 1]
    top = greedy_next_tokens(m, [tok(TEMPLATES[0].format(c=c)).input_ids for c in cands])
    subjects = [c for c, t in zip(cands, top) if t == tok(" " + CAPITALS[c], add_special_tokens=False).input_ids[0]]
    random.Random(0).shuffle(subjects)
    known = make_task("factual", n=30, seed=0, model=m)  # for tracing: clean/corrupt pairs of known facts
    edit, anchors = subjects[: args.edits], subjects[args.edits : args.edits + args.anchors]
    keep = subjects[args.edits + args.anchors :]
    new = {c: CAPITALS[edit[(i + 1) % len(edit)]] for i, c in enumerate(edit)}  # rotate capitals among the edits
    pairs = [(TEMPLATES[0].format(c=c), " " + new[c]) for c in edit]
    anchor_pairs = [(TEMPLATES[0].format(c=c), " " + CAPITALS[c]) for c in anchors]
    para = [(TEMPLATES[1].format(c=c), " " + new[c]) for c in edit]
    retain = [(TEMPLATES[0].format(c=c), " " + CAPITALS[c]) for c in keep]
    train_b = answer_batches(tok, pairs + anchor_pairs)
    edit_b, para_b, retain_b = answer_batches(tok, pairs), answer_batches(tok, para), answer_batches(tok, retain)
    ref = text_logprobs(hf, tok, UNRELATED)
    h0 = base_hash(hf)

    def evaluate() -> dict[str, float]:
        return {"edit": exact_match(hf, edit_b), "paraphrase": exact_match(hf, para_b),
                "retain": exact_match(hf, retain_b), "kl_unrelated": kl_on_text(hf, tok, UNRELATED, ref)}

    rows = {"base": {**evaluate(), "trainable": 0, "adapter_bytes": 0, "patch_bytes": 0, "seconds": 0.0, "layers": []}}
    # localization: causal tracing over the edited facts (the equal-length group)
    t0 = time.perf_counter()
    task = known
    tk = task.tokenize(tok)
    length, _ = Counter(tk.lengths).most_common(1)[0]
    tk = task.subset([i for i, n in enumerate(tk.lengths) if n == length]).tokenize(tok)
    scores = causal_trace(m, tk, config=TracingConfig(kind="mlp", window=args.window, samples=args.samples))
    trace_s = time.perf_counter() - t0
    loc = layers_from_scores(scores, args.k)
    per_layer = scores.values.amax(dim=1).tolist()
    # the trace's second peak: its top-k among layers ≥ k (the first MLPs mostly rebuild the noised
    # subject embedding; ROME likewise edits a mid layer, not the first ones)
    mid = layers_from_scores(scores.replace(values=torch.where(torch.arange(len(per_layer))[:, None] < args.k,
                                                                 torch.tensor(float("-inf")), scores.values)), args.k)
    seeds = [int(x) for x in args.random_seeds.split(",")]
    arms = {"localized": loc, "localized (2nd peak)": mid,
            **{("random" if len(seeds) == 1 else f"random (seed {sd})"): random_layers(m.dims.n_layers, args.k, seed=sd, exclude=loc + mid)
               for sd in seeds},
            **({} if args.no_all else {"all": list(range(m.dims.n_layers))})}
    print(f"{len(subjects)} known facts: {len(edit)} edited, {len(anchors)} anchors, {len(keep)} held out; traced {len(tk)} "
          f"prompts in {trace_s:.0f} s; arms {arms}", flush=True)
    for name, layers in arms.items():
        run = train_lora(hf, layers, train_b, lm_loss, steps=args.steps, lr=args.lr, targets="mlp", r=args.rank,
                         on_loss=lambda s, v, n=name: print(f"{n} step {s} loss {v:.3f}", flush=True) if s % 10 == 0 else None)
        assert base_hash(hf) == h0
        receipt = run.patch.apply(hf)
        res = evaluate()
        run.patch.remove(hf, receipt)
        assert base_hash(hf) == h0, "remove was not exact"
        rows[name] = {**res, "trainable": run.trainable, "adapter_bytes": run.adapter_bytes,
                      "patch_bytes": run.patch.nbytes, "seconds": run.seconds, "layers": layers,
                      "final_loss": run.losses[-1], **{f"size_{k}": v for k, v in size_report(run.patch).items()}}
        print(name, rows[name], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "edits": {c: new[c] for c in edit}, "anchors": anchors, "retain": keep, "trace_seconds": trace_s,
              "trace_per_layer": per_layer, "rows": rows, "total_seconds": time.perf_counter() - t_all,
              "total_params": sum(p.numel() for p in hf.parameters())}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    lines = ["| arm | layers | edit acc | paraphrase acc | retained facts | KL unrelated (nats/token) | trainable params | LoRA bytes | merged patch bytes | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lay = "-" if name == "base" else ("0–29" if name == "all" else ",".join(map(str, r["layers"])))
        lines.append(f"| {name} | {lay} | {100 * r['edit']:.0f}% | {100 * r['paraphrase']:.0f}% | {100 * r['retain']:.0f}% | "
                     f"{r['kl_unrelated']:.4f} | {r['trainable']:,} | {r['adapter_bytes']:,} | {r['patch_bytes']:,} | {r['seconds']:.0f} |")
    md = "\n".join(lines)
    (out / "table.md").write_text(md)
    print(md)
    print(f"total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
