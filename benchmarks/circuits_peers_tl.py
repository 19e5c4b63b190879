"""Peer side of ``benchmarks/circuits_peers.py``: EAP-IG (hannamw/EAP-IG) and auto-circuit on SmolLM2-135M.

Runs in ``.venv-peers`` (TransformerLens 2.x, which still has ``HookedTransformer``; built by
``benchmarks/setup_peers.sh``), never in patchtrace's environment, and imports nothing from
patchtrace. Everything it needs comes from the exchange folder written by the patchtrace side:

* ``model.safetensors`` + ``model.json``: the float32 weights patchtrace loaded (its HF module's
  state dict) and the dimensions, so both sides use the same weights bit for bit;
* ``data.safetensors``: the IOI token ids (clean, corrupt), answer/wrong ids and patchtrace's last
  position logits (all 49,152 columns) on the clean prompts, for the load check;
* ``names.json``: patchtrace's sender and receiver names (the peer's scores are mapped onto them).

How the model is loaded: SmolLM2 is not one of TransformerLens's named models, so the
``HookedTransformerConfig`` is written by hand from the Llama config (RMSNorm, rotary base 1e5,
grouped-query attention with 3 KV heads, gated SiLU MLP, tied embeddings), the weights go into a
``transformers`` ``LlamaForCausalLM`` and through TransformerLens's own ``convert_llama_weights``,
and ``HookedTransformer(cfg)`` takes them with ``load_state_dict`` — no ``from_pretrained``, so no
layer-norm folding, weight centring or logit centring: the model is the unprocessed one. Its logits
are compared with patchtrace's before anything is timed (``max_abs_logit_error``).

EAP-IG allocates its score matrices with ``device='cuda'`` (``eap/attribute.py``, ``utils.py``,
``evaluate.py``): ``_cpu_only`` hands its modules a ``torch`` whose ``zeros`` ignores the device, which
changes nothing else. Its ``tokenize_plus`` (which would prepend a BOS token) is replaced by a lookup
of patchtrace's token ids, so both sides see exactly the same tokens; the attention mask is all ones
(every prompt has the same length).

Usage (normally called by ``circuits_peers.py``)::

    .venv-peers/bin/python benchmarks/circuits_peers_tl.py --dir runs/bench-circuits/peers --what load
    .venv-peers/bin/python benchmarks/circuits_peers_tl.py --dir ... --what EAP|EAP-IG-inputs|EAP-IG-activations|exact|auto-circuit
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import types
from pathlib import Path

import torch

_MODEL = None


def _cpu_only() -> None:
    """EAP-IG hardcodes ``device='cuda'`` for its score tensors: make ``torch.zeros`` there CPU."""
    import eap.attribute
    import eap.evaluate
    import eap.utils

    def zeros(*a, **k):
        k["device"] = "cpu"
        return torch.zeros(*a, **k)

    proxy = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    proxy.zeros = zeros
    for mod in (eap.attribute, eap.utils, eap.evaluate):
        mod.torch = proxy


def load(d: Path):
    """HookedTransformer with patchtrace's weights, unprocessed; returns (model, data, info)."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    c = json.loads((d / "model.json").read_text())
    hcfg = LlamaConfig(  # type: ignore[call-arg]  # transformers<5 (.venv-peers) takes rope_theta
        vocab_size=c["vocab_size"], hidden_size=c["d_model"], intermediate_size=c["d_mlp"],
        num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
        head_dim=c["d_head"], rms_norm_eps=c["eps"], rope_theta=c["rope_theta"], tie_word_embeddings=c.get("tied", True),
        max_position_embeddings=8192, hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    hf = LlamaForCausalLM(hcfg).eval()
    sd = load_file(str(d / "model.safetensors"))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if c.get("tied", True):
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"HF state dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if c.get("tied", True):
        hf.tie_weights()
    cfg = HookedTransformerConfig(
        d_model=c["d_model"], d_head=c["d_head"], n_heads=c["n_heads"], n_key_value_heads=c["n_kv_heads"],
        d_mlp=c["d_mlp"], n_layers=c["n_layers"], n_ctx=2048, d_vocab=c["vocab_size"], act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=c["d_head"],
        rotary_base=c["rope_theta"], rotary_adjacent_pairs=False, final_rms=True, gated_mlp=True, eps=c["eps"],
        original_architecture="LlamaForCausalLM", default_prepend_bos=False, device="cpu", dtype=torch.float32,
    )
    model = HookedTransformer(cfg)
    res = model.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    bad = [k for k in res.missing_keys if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
    if bad or res.unexpected_keys:
        raise RuntimeError(f"TL state dict: missing {bad[:5]}, unexpected {res.unexpected_keys[:5]}")
    model.eval()
    data = load_file(str(d / "data.safetensors"))
    with torch.no_grad():
        tl = model(data["clean"])[:, -1]
        hfl = hf(data["clean"]).logits[:, -1]
    ref = data["ref_logits"]
    info = {"max_abs_logit_error_vs_patchtrace": float((tl - ref).abs().max()),
            "max_abs_logit_error_hf4_vs_patchtrace": float((hfl - ref).abs().max()),
            "logit_scale": float(ref.abs().max()), "tl_missing_buffers": len(res.missing_keys)}
    return model, data, info


def _metric(logits, clean_logits, input_lengths, labels):
    """Logit difference (answer − wrong) at the last position, summed over the batch: EAP-IG then
    divides by the number of examples, so scores are the mean effect, as patchtrace's."""
    last = logits[torch.arange(len(logits)), input_lengths - 1]
    return (last.gather(1, labels[:, :1]) - last.gather(1, labels[:, 1:])).sum()


def _eap_setup(model, data):
    import eap.attribute
    import eap.evaluate
    from eap.graph import Graph

    _cpu_only()
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    model.set_ungroup_grouped_query_attention(True)
    table = {}
    clean_s, corrupt_s = [], []
    for i in range(len(data["clean"])):
        a, b = f"clean{i}", f"corrupt{i}"
        table[a], table[b] = data["clean"][i], data["corrupt"][i]
        clean_s.append(a)
        corrupt_s.append(b)

    def tokenize_plus(model, inputs, max_length=None):
        toks = torch.stack([table[s] for s in inputs])
        mask = torch.ones_like(toks)
        return toks, mask, mask.sum(1), toks.shape[1]

    eap.attribute.tokenize_plus = tokenize_plus
    eap.evaluate.tokenize_plus = tokenize_plus
    labels = torch.stack([data["answer"][:, 0], data["wrong"][:, 0]], 1)
    loader = [(clean_s, corrupt_s, labels)]
    return Graph.from_model(model), loader


def _to_ours(g, names: dict, scores: torch.Tensor) -> torch.Tensor:
    """EAP-IG's ``[forward, backward]`` scores onto patchtrace's ``[sender, receiver]`` grid. EAP-IG
    ungroups grouped-query attention (a key/value input per *query* head); patchtrace has one per KV
    head, shared by its group, so a KV receiver's first-order score is the sum over its group's heads."""
    H, K = names["n_heads"], names["n_kv_heads"]
    rep = H // K
    rows = [g.forward_index(g.nodes[s], attn_slice=False) for s in names["senders"]]
    out = torch.full((len(rows), len(names["receivers"])), float("nan"))
    for j, r in enumerate(names["receivers"]):
        if r == "logits" or "<" not in r:
            cols = [g.backward_index(g.nodes[r], attn_slice=False)]
        else:
            node, letter = r[:-3], r[-2]
            layer = node.split(".")[0]
            if letter == "q":
                cols = [g.backward_index(g.nodes[node], qkv="q", attn_slice=False)]
            else:
                grp = int(node.split(".kv")[1])
                cols = [g.backward_index(g.nodes[f"{layer}.h{grp * rep + i}"], qkv=letter, attn_slice=False) for i in range(rep)]
        out[:, j] = scores[rows][:, cols].sum(1)
    return out


def run_eap(model, data, names, method: str, steps: int) -> dict:
    from eap.attribute import attribute

    g, loader = _eap_setup(model, data)
    kw = {} if method == "EAP" else {"ig_steps": steps}
    t0 = time.perf_counter()
    attribute(model, g, loader, _metric, method=method, quiet=True, **kw)
    dt = time.perf_counter() - t0
    mask = g.real_edge_mask
    return {"seconds": dt, "peer_edges": int(mask.sum()), "scores": _to_ours(g, names, g.scores.float())}


def run_exact(model, data, names, k: int, d: Path) -> dict:
    """EAP-IG's own exact path (``get_scores_exact``'s loop body: one ``evaluate_graph`` per edge, the
    edge removed from an otherwise complete graph), timed on ``k`` edges of patchtrace's exact sample
    whose receiver exists one-to-one in both graphs (a query, an MLP or the logits: EAP-IG's key and
    value inputs are per query head), so the two exact values can be compared too."""
    from eap.evaluate import evaluate_baseline, evaluate_graph
    from safetensors.torch import load_file

    g, loader = _eap_setup(model, data)
    g.in_graph |= g.real_edge_mask
    ex = load_file(str(d / "exact_sample.safetensors"))
    pairs = [(int(s), int(r)) for s, r in ex["mask"].nonzero().tolist()]
    pick = [(s, r) for s, r in pairs if "<k>" not in names["receivers"][r] and "<v>" not in names["receivers"][r]]
    pick = [pick[i] for i in torch.randperm(len(pick), generator=torch.Generator().manual_seed(0))[:k].tolist()]
    N = len(data["clean"])
    t0 = time.perf_counter()
    base = evaluate_baseline(model, loader, _metric).mean().item()
    t_base = time.perf_counter() - t0
    rows = []
    t0 = time.perf_counter()
    for s, r in pick:
        e = g.edges[f"{names['senders'][s]}->{names['receivers'][r]}"]
        e.in_graph = False
        v = evaluate_graph(model, g, loader, _metric, quiet=True, skip_clean=True).mean().item()
        e.in_graph = True
        rows.append({"edge": e.name, "peer": (v - base) / N, "ours": float(ex["exact"][s, r])})
    dt = (time.perf_counter() - t0) / max(1, len(pick))
    n_edges = int(g.real_edge_mask.sum())
    return {"edges_timed": len(pick), "s_per_edge": dt, "baseline_s": t_base, "peer_edges": n_edges,
            "full_grid_s": dt * n_edges, "values": rows,
            "max_abs_diff": max(abs(x["peer"] - x["ours"]) for x in rows) if rows else None}


def run_auto_circuit(model, data, names, ungroup: bool) -> dict:
    """auto-circuit's patchable model and its EAP (``mask_gradient_prune_scores``), where it builds."""
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model

    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    out: dict = {}
    if ungroup:  # auto-circuit's patch wrapper assumes one key/value input per query head
        model.set_ungroup_grouped_query_attention(True)
    t0 = time.perf_counter()
    pm = patchable_model(model, factorized=True, slice_output="last_seq", seq_len=None, separate_qkv=True,
                         device=torch.device("cpu"))
    out["patchable_model_s"] = time.perf_counter() - t0
    out["edges"] = len(pm.edges)
    from auto_circuit.data import PromptDataLoader, PromptDataset

    ds = PromptDataset(data["clean"], data["corrupt"], list(data["answer"][:, :1]), list(data["wrong"][:, :1]))
    dl = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=len(ds), shuffle=False)
    t0 = time.perf_counter()
    ps = mask_gradient_prune_scores(pm, dl, official_edges=None, grad_function="logit", answer_function="avg_diff",
                                    mask_val=0.0)
    out["seconds"] = out["eap_s"] = time.perf_counter() - t0
    if ungroup:
        out["scores"] = _ac_to_ours(pm, ps, names)
    return out


def _ac_to_ours(pm, ps, names: dict) -> torch.Tensor:
    """auto-circuit's scores onto patchtrace's grid. Its score is ∂(−logit diff)/∂mask at mask 0, i.e.
    the negative of EAP's (corrupt − clean)·∇M: the sign is flipped back. Its key/value inputs are per
    query head after TL's ungrouping: summed over the KV group, as for EAP-IG."""
    H, K = names["n_heads"], names["n_kv_heads"]
    rep = H // K
    si = {s: i for i, s in enumerate(names["senders"])}
    ri = {r: j for j, r in enumerate(names["receivers"])}
    out = torch.zeros(len(si), len(ri))

    def src(n: str) -> str:
        if n == "Resid Start":
            return "input"
        if n.startswith("MLP "):
            return f"m{n[4:]}"
        layer, head = n[1:].split(".")
        return f"a{layer}.h{head}"

    def dst(n: str) -> str:
        if n == "Resid End":
            return "logits"
        if n.startswith("MLP "):
            return f"m{n[4:]}"
        layer, head, letter = n[1:].split(".")
        if letter == "Q":
            return f"a{layer}.h{head}<q>"
        return f"a{layer}.kv{int(head) // rep}<{letter.lower()}>"

    for e in pm.edges:
        out[si[src(e.src.name)], ri[dst(e.dest.name)]] += -float(e.prune_score(ps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--what", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--exact-edges", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    res: dict = {"what": args.what}
    t0 = time.perf_counter()
    model, data, info = load(args.dir)
    res["load"] = info
    res["load_s"] = time.perf_counter() - t0
    names = json.loads((args.dir / "names.json").read_text())
    scores = None
    try:
        if args.what in ("EAP", "EAP-IG-inputs", "EAP-IG-activations"):
            r = run_eap(model, data, names, args.what, args.steps)
            scores = r.pop("scores")
            res.update(r)
        elif args.what == "exact":
            res.update(run_exact(model, data, names, args.exact_edges, args.dir))
        elif args.what == "auto-circuit":  # as is (grouped-query attention), then with TL ungrouping it
            try:
                res["as_is"] = run_auto_circuit(model, data, names, ungroup=False)
            except Exception as e:
                res["as_is"] = {"error": f"{type(e).__name__}: {e}"[:400], "where": traceback.format_exc().splitlines()[-4:]}
            model, data, _ = load(args.dir)
            r = run_auto_circuit(model, data, names, ungroup=True)
            scores = r.pop("scores")
            res.update(r)
    except Exception as e:  # a peer that cannot run this model: record exactly why
        res["error"] = f"{type(e).__name__}: {e}"[:600]
        res["where"] = traceback.format_exc().splitlines()[-6:]
    if scores is not None:
        from safetensors.torch import save_file

        save_file({"scores": scores.contiguous()}, str(args.dir / f"peer_{args.what}.safetensors"))
    (args.dir / f"peer_{args.what}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
