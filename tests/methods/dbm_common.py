"""Shared helpers of the DBM tests: random word pairs, and an independent reference for patched logits —
a plain Hugging Face forward with hooks on the HF modules (o_proj input for heads, the MLP output)."""

from __future__ import annotations

import random

import torch

from patchtrace.sites import Site

WORDS = "the cat sat on a mat while dogs ran far away from big red houses near old green trees".split()


def pairs(n: int, seed: int, length: int = 7) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a = rng.choices(WORDS, k=length)
        b = list(a)
        for i in rng.sample(range(length), 3):
            b[i] = rng.choice(WORDS)
        if a != b:
            out.append((" ".join(a), " ".join(b)))
    return out


def naive_patched_logits(model, ids_o: torch.Tensor, ids_a: torch.Tensor, sites: list[Site]) -> torch.Tensor:
    """Last-position logits of the HF forward on ``ids_o`` with ``sites`` (pos -1) replaced by their
    values on ``ids_a``: heads at the o_proj input, mlp_out at the MLP module output."""
    hf = model.hf
    layers = hf.model.layers
    d_head = model.dims.d_head
    rec: dict[tuple[str, int], torch.Tensor] = {}

    def run(ids, mode):
        handles = []
        for s in sites:
            L = s.layer
            if s.kind == "head":
                def pre(mod, args, L=L, u=s.unit):
                    z = args[0]
                    if mode == "rec":
                        rec[("head", L)] = z.detach().clone()
                        return None
                    z = z.clone()
                    sl = slice(u * d_head, (u + 1) * d_head)
                    z[:, -1, sl] = rec[("head", L)][:, -1, sl]
                    return (z,)
                handles.append(layers[L].self_attn.o_proj.register_forward_pre_hook(pre))
            elif s.kind == "mlp_out":
                def post(mod, args, out, L=L):
                    if mode == "rec":
                        rec[("mlp", L)] = out.detach().clone()
                        return None
                    out = out.clone()
                    out[:, -1] = rec[("mlp", L)][:, -1]
                    return out
                handles.append(layers[L].mlp.register_forward_hook(post))
            else:
                raise AssertionError(s.kind)
        try:
            with torch.no_grad():
                return hf(input_ids=ids).logits[:, -1].float()
        finally:
            for h in handles:
                h.remove()

    run(ids_a, "rec")
    return run(ids_o, "patch")
