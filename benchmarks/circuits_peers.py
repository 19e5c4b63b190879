"""Peers for circuits on IOI / SmolLM2-135M: EAP-IG (hannamw/EAP-IG) and auto-circuit, where they run.

Both peers are built on TransformerLens's ``HookedTransformer``, which TransformerLens 4.x (what
``.venv-bench`` has) no longer ships, so this script runs in an environment with TransformerLens 2.x
(``python -m venv /work/venv-tl2 && /work/venv-tl2/bin/pip install "torch==2.13.0" "transformer-lens<3"
auto-circuit``; EAP-IG from its repository, ``pip install --no-deps <checkout>``). SmolLM2 is not one
of TransformerLens's named models, so the HookedTransformer is built from its config and the Hugging
Face weights converted with TransformerLens's own Llama converter; the logits are checked against
the HF forward before anything is timed.

Usage::

    /work/venv-tl2/bin/python benchmarks/circuits_peers.py --model ~/.cache/patchtrace/smollm2-135m --n 4

Prints one JSON object: what loaded, what failed and why, and the times of what ran.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

TEMPLATE = "When {A} and {B} went to the {place}, {S} gave a {obj} to"


def ioi(n: int) -> list[tuple[str, str, str, str]]:
    """The same prompts as patchtrace's ``make_task("ioi", n, seed=0)`` (same generator, re-stated)."""
    import random

    names = ("Mary John Tom James Dan Sarah Paul Mike Kate Anna Lisa David Emma Alice Bob Jack Sam Ben Max "
             "Tim Amy Rose Jim Joe Mark Ryan Adam Alex Eric Lucy Jane Carl").split()
    places = "store park school house office market station garden restaurant hospital beach library".split()
    objects = "drink book ring bag ball pen apple letter gift card cake".split()
    rng = random.Random(0)
    out = []
    for i in range(n):
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        a, b = (io, s) if i % 2 == 0 else (s, io)
        out.append((TEMPLATE.format(A=a, B=b, place=place, S=s, obj=obj), TEMPLATE.format(A=a, B=b, place=place, S=io, obj=obj),
                    " " + io, " " + s))
    return out


def hooked(path: str) -> tuple[object, object, dict]:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=2048, d_vocab=c.vocab_size, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=c.hidden_size // c.num_attention_heads, rotary_base=int(getattr(c, "rope_theta", 10000)),
        final_rms=True, gated_mlp=True, eps=c.rms_norm_eps, original_architecture="LlamaForCausalLM",
        default_prepend_bos=False, device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    model.set_tokenizer(tok, default_padding_side="left")
    ids = tok(ioi(1)[0][0], return_tensors="pt").input_ids
    with torch.no_grad():
        err = float((model(ids)[:, -1] - hf(ids).logits[:, -1]).abs().max())
    return model, tok, {"max_logit_error_vs_hf": err}


def run_eap_ig(model, tok, n: int, steps: int) -> dict:
    from eap.attribute import attribute
    from eap.graph import Graph

    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    g = Graph.from_model(model)
    data = ioi(n)
    lab = [(tok(a).input_ids[0], tok(w).input_ids[0]) for _, _, a, w in data]
    loader = [([d[0] for d in data], [d[1] for d in data], torch.tensor(lab))]

    def metric(logits, clean_logits, input_lengths, labels, loss=True, mean=True):
        last = logits[torch.arange(len(logits)), input_lengths - 1]
        ld = last.gather(1, labels[:, :1]).squeeze(1) - last.gather(1, labels[:, 1:]).squeeze(1)
        ld = -ld if loss else ld
        return ld.mean() if mean else ld

    out = {"graph_edges": int(g.real_edge_mask.sum()) if hasattr(g, "real_edge_mask") else None}
    for method, kw in (("EAP", {}), ("EAP-IG-inputs", {"ig_steps": steps})):
        t0 = time.perf_counter()
        try:
            attribute(model, g, loader, metric, method=method, **kw)
            out[method] = {"seconds": time.perf_counter() - t0}
        except Exception as e:  # record why
            out[method] = {"error": f"{type(e).__name__}: {e}"[:400], "where": traceback.format_exc().splitlines()[-3:]}
    return out


def run_auto_circuit(model, tok, n: int) -> dict:
    from auto_circuit.utils.graph_utils import patchable_model

    t0 = time.perf_counter()
    try:
        data = ioi(n)
        seq = len(tok(data[0][0]).input_ids)
        pm = patchable_model(model, factorized=True, slice_output="last_seq", seq_len=seq, separate_qkv=True, device=torch.device("cpu"))
        return {"patchable_model_s": time.perf_counter() - t0, "n_edges": len(pm.edges)}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:400], "where": traceback.format_exc().splitlines()[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    res: dict = {}
    try:
        model, tok, info = hooked(args.model)
        res["hooked_transformer"] = info
    except Exception as e:
        res["hooked_transformer"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        print(json.dumps(res, indent=2))
        return
    for name, fn in (("eap_ig", lambda: run_eap_ig(model, tok, args.n, args.steps)), ("auto_circuit", lambda: run_auto_circuit(model, tok, args.n))):
        try:
            res[name] = fn()
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"[:400], "where": traceback.format_exc().splitlines()[-3:]}
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
