"""Extractive-QA benchmark on SmolLM2: circuit, ATTNATTRIB vs baselines, steering (issue 6).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qa.py --n 12 --write

Steps (all on CPU, float32):

1. Data: ``qa_dataset`` (agree / conflict / nomemory, filtered on the closed-book answer); counts kept.
2. Circuit: ``qa_patching_task`` (conflict vs same-length distractor) → head and MLP context/memory
   effects at the last position (``methods.qa_circuit.extract``), saved under ``runs/qa/circuit``.
3. Heads: the documented rule (``apply.attnattrib.select_heads``) on separate probe items.
4. Attribution: top-1 / top-3 sentence accuracy against the gold source per kind, and seconds per
   example, for ATTNATTRIB, leave-one-out (exact, S+1 passes), gradient × input, mean attention
   over all heads, and random heads. Accuracy is over the examples whose generated answer is the
   context answer (the gold source is only the source of *that* answer); counts are printed.
5. Steering: strength picked on a dev split (largest context-faithful gain with an agree-accuracy
   drop ≤ 2 points), then reported on the test conflict and agree sets, before and after.

Wall times are on a shared 2-core box and inflated by other jobs; the cost ratio to ATTNATTRIB is
measured in the same process and is the number to read.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def log(*a: object) -> None:
    print(*a, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12, help="test items per kind")
    ap.add_argument("--n-circuit", type=int, default=8, help="examples for circuit patching")
    ap.add_argument("--n-heads", type=int, default=1, help="ATTNATTRIB heads")
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    ap.add_argument("--out", default="runs/qa")
    ap.add_argument("--circuit", default=None, help="reuse a saved QA circuit folder (heads/, mlps/) instead of recomputing")
    ap.add_argument("--circuit-seed", type=int, default=0, help="seed of the circuit task (data seed is 5, dev 7)")
    args = ap.parse_args()

    from patchtrace import load_model
    from patchtrace.apply.attnattrib import AttnAttribConfig, attribute, select_heads
    from patchtrace.apply.baselines import grad_x_input, leave_one_out, mean_attention, random_heads
    from patchtrace.apply.steering import SteeringConfig, steer
    from patchtrace.methods.qa_circuit import QACircuit, extract
    from patchtrace.report.qa_html import write_html
    from patchtrace.tasks.extractive_qa import KINDS, make_qa_items, qa_dataset, qa_patching_task

    torch.manual_seed(0)
    t_all = time.perf_counter()
    m = load_model()
    tok = m.tokenizer
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)

    # 1. data
    ds = qa_dataset(args.n, seed=5, model=m)
    log("counts", ds.counts)

    # 2. circuit
    t0 = time.perf_counter()
    if args.circuit:
        circ = QACircuit.load(args.circuit)
        task_params = circ.heads.provenance.get("task", {}).get("params", {})
        t_circ = float("nan")
    else:
        task = qa_patching_task(args.n_circuit, seed=args.circuit_seed, model=m)
        task_params = task.params
        circ = extract(m, task)
        t_circ = time.perf_counter() - t0
        circ.save(str(out / "circuit"))
    ctx_top = circ.heads.top_k(8)
    mem = circ.heads.extras["memory_effect"]
    H = mem.shape[1]
    mem_top = [((int(i) // H, int(i) % H), float(mem.flatten()[i])) for i in torch.topk(mem.flatten(), 5).indices]
    mlp_ctx = circ.mlps.values.flatten()
    mlp_mem = circ.mlps.extras["memory_effect"].flatten()
    log("circuit", task_params, f"{t_circ:.1f}s", "ctx heads", [(str(s), round(v, 2)) for s, v in ctx_top])
    log("mem heads", mem_top)

    # 3. heads
    probe = make_qa_items("conflict", 8, 1000, tok)
    heads, info = select_heads(m, circ.heads, probe, n_heads=args.n_heads)
    log("heads", heads, info)

    # 4. attribution
    methods = {
        "ATTNATTRIB": lambda it, i: attribute(m, it, AttnAttribConfig(heads)),
        "leave-one-out": lambda it, i: leave_one_out(m, it),
        "grad x input": lambda it, i: grad_x_input(m, it),
        "mean attention (all heads)": lambda it, i: mean_attention(m, it),
        "random heads": lambda it, i: random_heads(m, it, len(heads), seed=i),
    }
    ans_id = {it.answer: tok(it.answer, add_special_tokens=False).input_ids[0] for it in ds.items}
    rows: dict[str, dict[str, dict[str, float]]] = {name: {} for name in methods}
    secs: dict[str, list[float]] = {name: [] for name in methods}
    used: dict[str, int] = {}
    html_pairs = []
    for kind in KINDS:
        items = ds.of_kind(kind)
        for fn in methods.values():
            fn(items[0], 0)  # warm-up
        res = {name: [fn(it, i) for i, it in enumerate(items)] for name, fn in methods.items()}
        ok = [i for i, it in enumerate(items) if res["ATTNATTRIB"][i].answer_tokens[0] == ans_id[it.answer]]
        used[kind] = len(ok)
        for name in methods:
            r = res[name]
            secs[name] += [x.seconds for x in r]
            rows[name][kind] = {
                "top1": sum(r[i].hit(items[i].gold, 1) for i in ok) / max(1, len(ok)),
                "top3": sum(r[i].hit(items[i].gold, 3) for i in ok) / max(1, len(ok)),
            }
        html_pairs += [(items[i], res["ATTNATTRIB"][i]) for i in ok[:3]]
        log(kind, "context-answered", len(ok), "/", len(items), {k: v[kind] for k, v in rows.items()})
    write_html(html_pairs, out / "attnattrib.html", info={"heads": heads})
    tsec = {k: statistics.median(v) for k, v in secs.items()}
    overall = {
        name: sum(rows[name][k]["top1"] * used[k] for k in KINDS) / max(1, sum(used.values())) for name in methods
    }

    # 5. steering: steering heads = the attribution heads + the top context-effect heads at or after their layer
    la = min(layer for layer, _ in heads)
    ctx_heads = [(s.layer, s.unit) for s, v in circ.heads.top_k(30) if s.layer is not None and s.layer >= la and v > 0]
    steer_heads = tuple(dict.fromkeys(list(heads) + ctx_heads[:4]))  # type: ignore[arg-type]
    dev = qa_dataset(args.n, seed=7, model=m, kinds=("agree", "conflict"))

    def rates(items: list, strength: float) -> float:
        r = [steer(m, it, SteeringConfig(heads, steer_heads, strength)) for it in items]
        return sum(x.answer_tokens[0] == ans_id.setdefault(it.answer, tok(it.answer, add_special_tokens=False).input_ids[0])
                   for x, it in zip(r, items, strict=True)) / len(items)

    dev_c, dev_a = dev.of_kind("conflict"), dev.of_kind("agree")
    base_c, base_a = rates(dev_c, 0.0), rates(dev_a, 0.0)
    best = (0.0, 0.0)
    dev_log = []
    for s in (2.0, 4.0, 8.0):
        c, a = rates(dev_c, s), rates(dev_a, s)
        dev_log.append((s, c, a))
        if a >= base_a - 0.02 and c - base_c > best[1]:
            best = (s, c - base_c)
    # no strength met the agree constraint on dev → fall back to 4.0 and say so in the report
    strength = best[0] or 4.0
    picked = "chosen on a dev split" if best[0] else "fallback: no dev strength kept the agree drop ≤ 2 points"
    log("steer dev", base_c, base_a, dev_log, "→ strength", strength)
    test_c, test_a = ds.of_kind("conflict"), ds.of_kind("agree")
    before_c, after_c = rates(test_c, 0.0), rates(test_c, strength)
    before_a, after_a = rates(test_a, 0.0), rates(test_a, strength)
    log("steer test conflict", before_c, "→", after_c, "agree", before_a, "→", after_a)
    total = time.perf_counter() - t_all

    # report
    lines = [
        "## Extractive QA: ATTNATTRIB and steering (issue 6)",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qa.py {' '.join(sys.argv[1:])}` (SmolLM2-135M-Instruct, "
        "CPU float32, shared 2-core box: absolute seconds are inflated by other jobs; ratios are measured in the same "
        f"process). Total run {total:.0f} s.",
        "",
        "Data (prompt: chat template + system line 'Answer the question using only the context.' + prefilled "
        "'The capital of X is'; 3-5 one-sentence facts). Kept per kind (closed-book filter): "
        + ", ".join(f"{k} {v['kept']}/{v['generated']}" for k, v in ds.counts.items())
        + ". Attribution accuracy is over the examples whose generated answer is the context answer: "
        + ", ".join(f"{k} {used[k]}" for k in KINDS) + ".",
        "",
        f"Circuit ({task_params.get('kept')} conflict examples of {task_params.get('candidates')} candidates, seed "
        f"{task_params.get('seed')}, heads + MLPs at the last position, context and memory directions"
        + (f", {t_circ:.0f} s" if t_circ == t_circ else f", loaded from `{args.circuit}`") + "): top context-use heads "
        + ", ".join(f"L{s.layer}.H{s.unit} ({v:+.2f})" for s, v in ctx_top[:5])
        + "; top memory-use heads " + ", ".join(f"L{a}.H{b} ({v:+.2f})" for (a, b), v in mem_top[:3])
        + f"; strongest MLPs: context L{int(mlp_ctx.argmax())} ({float(mlp_ctx.max()):+.2f}), memory L{int(mlp_mem.argmax())} "
        f"({float(mlp_mem.max()):+.2f}) (logit diff context − memory answer; clean {circ.heads.baselines.get('clean', 0):.2f}, "
        f"corrupt {circ.heads.baselines.get('corrupt', 0):.2f}).",
        "",
        f"ATTNATTRIB heads (rule: {info['rule']}): {', '.join(f'L{a}.H{b}' for a, b in heads)}.",
        "",
        "| method | agree top-1 | agree top-3 | conflict top-1 | conflict top-3 | nomemory top-1 | nomemory top-3 | all top-1 | s/example (median) | cost vs ATTNATTRIB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in methods:
        r = rows[name]
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * r[k]['top1']:.0f}% | {100 * r[k]['top3']:.0f}%" for k in KINDS)
            + f" | {100 * overall[name]:.0f}% | {tsec[name]:.3f} | {tsec[name] / tsec['ATTNATTRIB']:.1f}× |"
        )
    gap = 100 * (overall["leave-one-out"] - overall["ATTNATTRIB"])
    ratio = tsec["leave-one-out"] / tsec["ATTNATTRIB"]
    lines += [
        "",
        f"Target 'ATTNATTRIB top-1 within 5 points of leave-one-out at ≥ 10× lower cost': gap {gap:+.1f} points, "
        f"cost ratio {ratio:.1f}× → {'MET' if gap <= 5 and ratio >= 10 else 'NOT MET'}.",
        "",
        f"Steering (attention-logit bias toward the attributed sentence in heads {', '.join(f'L{a}.H{b}' for a, b in steer_heads)} "
        f"at the answer query, same forward; strength {strength:g} ({picked}): "
        + "; ".join(f"s={s:g}: conflict {100 * c:.0f}%, agree {100 * a:.0f}%" for s, c, a in dev_log)
        + f"; dev base conflict {100 * base_c:.0f}%, agree {100 * base_a:.0f}%):",
        "",
        "| set | before | after |",
        "|---|---|---|",
        f"| conflict: context-faithful rate (n={len(test_c)}) | {100 * before_c:.0f}% | {100 * after_c:.0f}% |",
        f"| agree: accuracy (n={len(test_a)}) | {100 * before_a:.0f}% | {100 * after_a:.0f}% |",
        "",
        f"Target 'steering raises the context-faithful rate on conflicts by ≥ 10 points' (agree drop ≤ 2): "
        f"{100 * (after_c - before_c):+.0f} points, agree {100 * (after_a - before_a):+.0f} → "
        f"{'MET' if after_c - before_c >= 0.10 and after_a >= before_a - 0.02 else 'NOT MET'}.",
    ]
    text = "\n".join(lines)
    log(text)
    (out / "summary.json").write_text(json.dumps({
        "rows": rows, "seconds": tsec, "used": used, "counts": ds.counts, "heads": heads, "steer_heads": steer_heads,
        "strength": strength, "steer": {"conflict": [before_c, after_c], "agree": [before_a, after_a]}, "dev": dev_log,
    }, indent=1))
    if args.write:
        bm = ROOT / "BENCHMARKS.md"
        cur = bm.read_text() if bm.exists() else "# Benchmarks\n"
        block = f"<!-- BEGIN qa -->\n{text}\n<!-- END qa -->"
        if "<!-- BEGIN qa -->" in cur:
            cur = re.sub(r"<!-- BEGIN qa -->.*?<!-- END qa -->", lambda _: block, cur, flags=re.S)
        else:
            cur = cur.rstrip("\n") + "\n\n" + block + "\n"
        bm.write_text(cur)
        log("wrote", bm)


if __name__ == "__main__":
    sys.exit(main())
