"""Gradient-based estimators on the real SmolLM2 (IOI), against a reference written on the HF model.

The reference AtP for heads uses only Hugging Face modules and torch hooks: the head output is the
input of ``o_proj``; its gradient comes from a plain HF forward/backward. So the runner, the
kernel's cell reduction and the axis layout are all checked against something independent.
"""

from __future__ import annotations

import pytest
import torch

from patchtrace import SiteSpec, make_task
from patchtrace.methods import atp, relp
from patchtrace.models.runner import LRPRules

pytestmark = pytest.mark.smollm2


def _oproj_inputs(model, ids, grad):
    store = {}
    handles = []
    for li, layer in enumerate(model.hf.model.layers):
        def pre(mod, args, li=li):
            x = args[0]
            if grad:
                x.retain_grad()
            store[li] = x
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        logits = model.hf(ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return store, logits


def test_atp_heads_match_hf_hook_reference(smollm2):
    task = make_task("ioi", n=4, seed=0, model=smollm2)
    tok = task.tokenize(smollm2.tokenizer)
    idx = list(range(len(tok)))
    clean, corrupt = tok.ids("clean", idx), tok.ids("corrupt", idx)
    with torch.no_grad():
        src, _ = _oproj_inputs(smollm2, clean, False)
    emb = smollm2.hf.get_input_embeddings()
    h = emb.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    try:
        base, logits = _oproj_inputs(smollm2, corrupt, True)
    finally:
        h.remove()
    ld = logits.gather(1, tok.answer).mean(1) - logits.gather(1, tok.wrong).mean(1)
    ld.sum().backward()
    d = smollm2.dims
    ref = torch.zeros(d.n_layers, d.n_heads)
    for li in range(d.n_layers):
        diff = (src[li] - base[li].detach())[:, -1].view(len(idx), d.n_heads, d.d_head)
        g = base[li].grad[:, -1].view(len(idx), d.n_heads, d.d_head)
        ref[li] = (diff * g).sum(-1).mean(0)
    got = atp.run(smollm2, tok, SiteSpec("head", per_unit=True, positions="last")).values
    assert float(ref.abs().max()) > 0.5
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-3)


def test_relp_leaves_smollm2_bit_identical(smollm2):
    task = make_task("ioi", n=2, seed=1, model=smollm2).tokenize(smollm2.tokenizer)
    ids = task.ids("clean", [0, 1])
    with torch.no_grad():
        before = smollm2.runner.forward(ids).logits.clone()
        lrp = smollm2.runner.forward(ids, lrp=LRPRules(attention=False)).logits
    relp.run(smollm2, task, SiteSpec("mlp_out", positions="all"))
    with torch.no_grad():
        after = smollm2.runner.forward(ids).logits
    assert torch.equal(before, after)
    assert torch.equal(lrp, before)
