"""Cross-prompt, cross-layer writes against plain HF forwards with hooks (source and target prompts of
different lengths, explicit positions), and the checks that refuse bad sites before compute."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from patchtrace.engine.cache import collect
from patchtrace.engine.xprompt import CrossPatchError, cross_patch, write_resid_suffix
from patchtrace.interventions import Intervention, Replace, SourceRef, Zero
from patchtrace.sites import HookPoint, Site

SRC, TGT = "The Eiffel Tower is located in the city of", "Syria: Syria; x"


def _layers(hf):
    return hf.model.layers if hasattr(hf, "model") else hf.transformer.h


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _record(hf, ids, module):
    box = {}
    h = module.register_forward_hook(lambda m, a, o: box.__setitem__("x", _out(o).detach().clone()))
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        h.remove()
    return box["x"]


def _write_logits(hf, ids, module, pos, val):
    def hook(m, a, o):
        x = _out(o).clone()
        x[:, pos] = val if val is not None else 0.0
        return (x, *o[1:]) if isinstance(o, tuple) else x

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf(ids).logits[0, -1]
    finally:
        h.remove()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cross_prompt_writes_match_hf_hooks(family, smol_tokenizer):
    m = make_tiny(family, tokenizer=smol_tokenizer)
    src = torch.tensor([smol_tokenizer(SRC).input_ids])
    tgt = torch.tensor([smol_tokenizer(TGT).input_ids])
    assert src.shape[1] != tgt.shape[1]
    layers = _layers(m.hf)
    # resid_post[2]@4 of the source into resid_post[0]@-1 of the target (another layer, position, prompt)
    val = _record(m.hf, src, layers[2])[:, 4]
    ref = _write_logits(m.hf, tgt, layers[0], tgt.shape[1] - 1, val)
    iv = Intervention(Site("resid_post", 0, pos=-1), Replace(), SourceRef("source", Site("resid_post", 2, pos=4)))
    got = cross_patch(m, SRC, TGT, [iv]).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    plain = m.runner.forward(tgt, last_only=True).logits[0, -1]
    assert (plain - ref).abs().max() > 1e-3  # the write changed something
    # mlp_out with a zero write at position 2 (no source)
    mlp = layers[1].mlp
    ref0 = _write_logits(m.hf, tgt, mlp, 2, None)
    got0 = cross_patch(m, SRC, TGT, [Intervention(Site("mlp_out", 1, pos=2), Zero())]).logits[0]
    torch.testing.assert_close(got0, ref0, atol=1e-4, rtol=0)


def test_suffix_write_equals_full_forward(smol_tokenizer):
    m = make_tiny("qwen2", tokenizer=smol_tokenizer)
    tgt = torch.tensor([smol_tokenizer(TGT).input_ids])
    run = collect(m, tgt, [HookPoint("resid_post", 1)])
    post = run.acts[HookPoint("resid_post", 1)]
    vals = torch.randn(3, m.dims.d_model)
    logits, kv = write_resid_suffix(m, run, post, 1, 3, vals, keep_kv=True)
    for r in range(3):
        ref = _write_logits(m.hf, tgt, _layers(m.hf)[1], 3, vals[r])
        torch.testing.assert_close(logits[r], ref, atol=1e-4, rtol=0)
    assert kv is not None and kv[2][0].shape[0] == 3 and kv[2][0].shape[2] == tgt.shape[1]


def test_bad_sites_refused_before_compute(smol_tokenizer):
    m = make_tiny("llama", tokenizer=smol_tokenizer)
    far = Intervention(Site("resid_post", 0, pos=-1), Replace(), SourceRef("source", Site("resid_post", 2, pos=40)))
    with pytest.raises(CrossPatchError, match=r"source site.*position 40"):
        cross_patch(m, "short", TGT, [far])
    deep = Intervention(Site("resid_post", 7, pos=0), Zero())
    with pytest.raises(CrossPatchError, match="layer 7"):
        cross_patch(m, SRC, TGT, [deep])
