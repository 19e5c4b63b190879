"""Circuits side by side with the peers on IOI / SmolLM2-135M: same weights, tokens, metric and CPU thread.

Peers: EAP-IG (hannamw/EAP-IG, its ``attribute`` with EAP, EAP-IG-inputs, EAP-IG-activations and
its exact ``evaluate_graph`` loop) and auto-circuit (where it builds). Both need TransformerLens 2.x's
``HookedTransformer``, so they run in ``.venv-peers`` (``bash benchmarks/setup_peers.sh``) through
``benchmarks/circuits_peers_tl.py``; patchtrace runs here in ``.venv``. One driver process alternates
the two sides method by method (ours, theirs, ours, theirs ...), each in a fresh 1-thread process,
so load on the shared machine hits both alike. Times exclude loading the model on both sides and
include every forward/backward each method needs (ours: ``prepare`` — the clean, corrupt and base
runs — plus the scoring; theirs: ``attribute``).

Usage (from the repository root)::

    nice -n 10 .venv/bin/python benchmarks/circuits_peers.py --n 4 --sample 300 --rounds 2

Writes ``runs/bench-circuits/peers/`` (exchange files, per-run JSON) and ``runs/bench-circuits/peers.json``:
load check (TL logits vs patchtrace's), times per method and side, and the Pearson/Spearman of
every score set with every other over all 70,651 edges and with patchtrace's exact edge effects on
``--sample`` uniformly drawn edges.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DIR = ROOT / "runs" / "bench-circuits" / "peers"
PEER_PY = ROOT / ".venv-peers" / "bin" / "python"
METHODS = {"EAP": "eap", "EAP-IG-inputs": "eap-ig", "EAP-IG-activations": "eap-ig-act"}
# peer runs and the method of ours each is compared with (auto-circuit's edge scores are EAP's)
PEER_OF = {"EAP": "EAP", "EAP-IG-inputs": "EAP-IG-inputs", "EAP-IG-activations": "EAP-IG-activations", "auto-circuit": "EAP"}


def _setup(n: int, model: str | None = None):
    from patchtrace import load_model, make_task

    torch.set_num_threads(1)
    m = load_model(model) if model else load_model()
    tok = make_task("ioi", n=n, seed=0).tokenize(m.tokenizer)
    return m, tok


def export(n: int, sample: int, model: str | None) -> None:
    """Weights, tokens, reference logits, names; and our exact effects on the sampled edges."""
    from safetensors.torch import save_file

    from patchtrace.circuits.exact import edge_grid, prepare

    m, tok = _setup(n, model)
    DIR.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(m.hf.config, "tie_word_embeddings", False))
    sd = {k: v.detach().contiguous().clone() for k, v in m.hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(sd, str(DIR / "model.safetensors"))
    c, d = m.hf.config, m.dims
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
    (DIR / "model.json").write_text(json.dumps({
        "vocab_size": d.vocab, "d_model": d.d_model, "d_mlp": d.d_mlp, "n_layers": d.n_layers, "n_heads": d.n_heads,
        "n_kv_heads": d.n_kv_heads, "d_head": d.d_head, "eps": float(c.rms_norm_eps), "rope_theta": float(rope["rope_theta"]),
        "tied": tied,
    }))
    clean, corrupt = tok.ids("clean", range(n)), tok.ids("corrupt", range(n))
    with torch.no_grad():
        ref = m.hf(clean).logits[:, -1].float()
    save_file({"clean": clean.contiguous(), "corrupt": corrupt.contiguous(), "answer": tok.answer.contiguous(),
               "wrong": tok.wrong.contiguous(), "ref_logits": ref.contiguous()}, str(DIR / "data.safetensors"))
    p = prepare(m, tok)
    G = p.graph
    (DIR / "names.json").write_text(json.dumps({"senders": list(G.sender_names), "receivers": list(G.receiver_names),
                                                "n_heads": G.n_heads, "n_kv_heads": G.n_kv_heads}))
    edges = random.Random(0).sample(G.edge_list(G.mask), sample)
    mask = torch.zeros_like(G.mask)
    for s, r in edges:
        mask[s, r] = True
    t0 = time.perf_counter()
    ex = edge_grid(p, edges=mask)
    save_file({"exact": ex, "mask": mask}, str(DIR / "exact_sample.safetensors"))
    (DIR / "exact_sample.json").write_text(json.dumps({"edges": sample, "seconds": time.perf_counter() - t0}))


def ours(what: str, n: int, steps: int, model: str | None) -> None:
    """One method on our side, timed like the peer's (model load excluded, prepare included)."""
    from safetensors.torch import save_file

    from patchtrace.circuits.eap import scores
    from patchtrace.circuits.exact import prepare

    m, tok = _setup(n, model)
    t0 = time.perf_counter()
    p = prepare(m, tok)
    t1 = time.perf_counter()
    s = scores(p, METHODS[what], steps=steps)  # type: ignore[arg-type]
    t2 = time.perf_counter()
    save_file({"scores": s.contiguous()}, str(DIR / f"ours_{what}.safetensors"))
    res = {"what": what, "seconds": t2 - t0, "prepare_s": t1 - t0, "scores_s": t2 - t1}
    (DIR / f"ours_{what}.json").write_text(json.dumps(res))
    print(json.dumps(res))


def peer_rule_act(n: int, steps: int, model: str | None) -> None:
    """EAP-IG on activations with EAP-IG's own aggregation, from our gradients: EAP-IG's code adds every
    pass's receiver gradients (whichever node group is interpolated) to *every* edge and divides by
    ``(2L+1)·m``; ours gives an edge only the passes that interpolate its own sender's group (÷ m).
    Computing the peer's rule from our ``_grads`` shows whether the two differ only in that rule."""
    from safetensors.torch import save_file

    from patchtrace.circuits.eap import _grads, _sender_groups
    from patchtrace.circuits.exact import prepare

    m, tok = _setup(n, model)
    p = prepare(m, tok)
    G = p.graph
    acc = torch.zeros(G.n_senders, G.n_receivers, dtype=torch.float64)
    groups = _sender_groups(p)
    for g in p.groups:
        diff = (g.src_out - g.base_out).float()
        for grp in groups:
            adds = []
            for k in range(1, steps + 1):
                w = 1 - k / steps  # noising: base = clean, the group's output at α·clean + (1−α)·corrupt
                adds.append({s: w * (g.src_out[:, :, s] - g.base_out[:, :, s]) for s in grp})
            gr = _grads(p, g, adds).sum(0)
            acc += torch.einsum("itsd,itrd->sr", diff, gr.float()).double()
    out = (acc / p.n / (steps * len(groups))).float()
    out[~G.mask] = float("nan")
    save_file({"scores": out.contiguous()}, str(DIR / "ours_EAP-IG-activations-peer-rule.safetensors"))


def _sub(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        return {"error": out.stderr[-1500:]}
    return {"ok": True}


def drive(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    from patchtrace.methods.compare import pearson, spearman

    me = [sys.executable, __file__, "--n", str(args.n), "--steps", str(args.steps), "--dir", str(DIR)]
    if args.model:
        me += ["--model", args.model]
    peer = [str(PEER_PY), str(ROOT / "benchmarks" / "circuits_peers_tl.py"), "--dir", str(DIR), "--steps", str(args.steps)]
    res: dict = {"n": args.n, "steps": args.steps, "sample": args.sample, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "rounds": args.rounds, "times": {}, "load": None}
    if not args.skip_export:
        t0 = time.perf_counter()
        res["export"] = _sub([*me, "--side", "export", "--sample", str(args.sample)])
        res["export_s"] = time.perf_counter() - t0
    res["load_before"] = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    methods = [w for w in PEER_OF if w not in args.skip]
    for rnd in range(args.rounds):
        for what in methods:
            order: tuple = () if what in args.ours_only else (("peer", [*peer, "--what", what]),)
            if what in METHODS:
                order = (("ours", [*me, "--side", "ours", "--what", what]), *order)
            for side, cmd in (order if rnd % 2 == 0 else order[::-1]):
                r = _sub(cmd)
                f = DIR / f"{side}_{what}.json"
                rec = json.loads(f.read_text()) if r.get("ok") and f.exists() else r
                res["times"].setdefault(what, {}).setdefault(side, []).append(rec.get("seconds", rec.get("error")))
                if side == "peer" and "load" in rec:
                    res["load"] = rec["load"]
                if "error" in rec:
                    res.setdefault("errors", {})[f"{side} {what}"] = rec["error"]
                print(side, what, res["times"][what][side][-1], flush=True)
    if "exact" not in args.skip:
        _sub([*peer, "--what", "exact", "--exact-edges", str(args.exact_edges)])
        f = DIR / "peer_exact.json"
        res["peer_exact"] = json.loads(f.read_text()) if f.exists() else "no output"
    if "auto-circuit" in methods and "auto-circuit" not in args.ours_only:
        res["auto_circuit"] = json.loads((DIR / "peer_auto-circuit.json").read_text())
    res["load_after"] = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    # agreement
    ex = load_file(str(DIR / "exact_sample.safetensors"))
    mask, exact = ex["mask"], ex["exact"]
    res["exact_sample"] = json.loads((DIR / "exact_sample.json").read_text())
    sets = {}
    for what in methods:
        for side in ("ours", "peer"):
            f = DIR / f"{side}_{what}.safetensors"
            if f.exists():
                sets[f"{side} {what}"] = load_file(str(f))["scores"]
    real = ~torch.isnan(next(v for k, v in sets.items() if k.startswith("ours")))
    agree: dict = {}
    for a, va in sets.items():
        row = {"exact (sample)": {"pearson": pearson(exact[mask], va[mask]), "spearman": spearman(exact[mask], va[mask])}}
        side, what = a.split(" ", 1)
        b = f"ours {PEER_OF[what]}"
        if side == "peer" and b in sets:
            vb = sets[b]
            d = (va[real] - vb[real]).abs()
            row[b] = {"pearson": pearson(va[real], vb[real]), "spearman": spearman(va[real], vb[real]),
                      "max_abs_diff": float(d.max()), "max_abs_score": float(vb[real].abs().max())}
        agree[a] = row
    res["agreement"] = agree
    (DIR.parent / args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def main() -> None:
    global DIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=("drive", "export", "ours", "peer-rule"), default="drive")
    ap.add_argument("--what", choices=tuple(METHODS))
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--exact-edges", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], help="methods (or exact, auto-circuit) to leave out")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--ours-only", nargs="*", default=[], help="methods timed on our side only")
    ap.add_argument("--out", default="peers.json", help="result file name under runs/bench-circuits/")
    ap.add_argument("--model", help="a local checkpoint instead of SmolLM2 (e.g. a saved tiny Llama)")
    ap.add_argument("--dir", type=Path, default=DIR, help="exchange folder")
    args = ap.parse_args()
    DIR = args.dir
    if args.side == "export":
        export(args.n, args.sample, args.model)
    elif args.side == "ours":
        ours(args.what, args.n, args.steps, args.model)
    elif args.side == "peer-rule":
        peer_rule_act(args.n, args.steps, args.model)
    else:
        drive(args)


if __name__ == "__main__":
    main()
