"""Bridge readout against HF ``generate`` with a cross-prompt hook; ablations (zero, mean, resample)
against HF forwards with the module output replaced by hand; bad input refused before compute."""

from __future__ import annotations

import pytest
import torch
from multihop_naive import ablated_logits, decoder_layers, naive_cross_generate

from conftest import make_tiny
from patchtrace.errors import PatchtraceError
from patchtrace.multihop.ablation import AblationConfig, ablate
from patchtrace.multihop.bridge import BridgeConfig, bridge_readout
from patchtrace.multihop.queries import MultihopError, TwoHopQuery, entity_last_token
from patchtrace.sites import Site, SiteSpec

QS = [
    TwoHopQuery(prompt="The capital of the country where Lyon is located is", target="Paris", aliases=(),
                entity="Lyon", bridge="France", relation="capital", name="q0"),
    TwoHopQuery(prompt="The country where Osaka is located is on the continent of", target="Asia", aliases=(),
                entity="Osaka", bridge="Japan", relation="continent", name="q1"),
]


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    return make_tiny("llama", tokenizer=smol_tokenizer)


def test_bridge_readout_texts_match_hf_generate(tiny):
    cfg = BridgeConfig(identity_prompt="Syria: Syria; x", max_new=3)
    s = bridge_readout(tiny, QS, cfg)
    tok = tiny.tokenizer
    idt = torch.tensor([tok(cfg.identity_prompt).input_ids])
    for k, q in enumerate(QS):
        src = torch.tensor([tok(q.prompt).input_ids])
        for layer in (0, 2):
            ref = naive_cross_generate(tiny.hf, src, entity_last_token(tok, q), idt, layer, 3)
            assert s.provenance["bridge_texts"][k][layer] == tok.decode(ref, skip_special_tokens=True)
    assert s.axes == ("layer",) and s.extras["lens_hits"].shape == (2, 3)


def test_bridge_needs_entity(tiny):
    with pytest.raises(MultihopError, match="q5"):
        bridge_readout(tiny, [TwoHopQuery(prompt="a b c", target="d", aliases=(), name="q5")])


PROMPTS = ["The capital of France is", "The capital of Spain is", "The capital of Italy is"]
TARGETS = ["Paris", "Madrid", "Rome"]


def _lp(logits, tok, targets):
    t = torch.tensor([tok(" " + x).input_ids[0] for x in targets])
    return torch.log_softmax(logits.float(), -1).gather(1, t[:, None])[:, 0]


def test_ablations_match_hf_hooks(tiny):
    tok = tiny.tokenizer
    ids = torch.tensor([tok(p).input_ids for p in PROMPTS])
    assert len({len(tok(p).input_ids) for p in PROMPTS}) == 1
    clean = _lp(tiny.hf(ids).logits[:, -1], tok, TARGETS)
    layers = decoder_layers(tiny.hf)
    # zero: mlp_out of layer 1, all positions; groups: mlp_out[1] and resid_post[0]@-1 together
    s = ablate(tiny, PROMPTS, TARGETS, {"mlp1": [Site("mlp_out", 1)], "mix": [Site("mlp_out", 1), Site("resid_post", 0, pos=-1)]})
    ref = _lp(ablated_logits(tiny.hf, ids, layers[1].mlp, torch.zeros_like), tok, TARGETS)
    torch.testing.assert_close(s.per_example[:, 0], ref - clean, atol=1e-4, rtol=0)
    assert s.axes == ("group",)
    # mean: resid_post of layer 0 over the prompts themselves, per position
    rec = {}
    h = layers[0].register_forward_hook(lambda m, a, o: rec.__setitem__("x", (o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        tiny.hf(ids)
    h.remove()
    mean = rec["x"].mean(0, keepdim=True)
    s2 = ablate(tiny, PROMPTS, TARGETS, [[Site("resid_post", 0)]], AblationConfig(mode="mean"))
    ref2 = _lp(ablated_logits(tiny.hf, ids, layers[0], lambda x: mean.expand_as(x)), tok, TARGETS)
    torch.testing.assert_close(s2.per_example[:, 0], ref2 - clean, atol=1e-4, rtol=0)
    # resample: example i takes example order[i]'s resid_post[0] (a permutation without fixed points)
    s3 = ablate(tiny, PROMPTS, TARGETS, [[Site("resid_post", 0)]], AblationConfig(mode="resample", seed=3))
    diffs = []
    for order in ([1, 2, 0], [2, 0, 1]):
        r = _lp(ablated_logits(tiny.hf, ids, layers[0], lambda x, o=order: x[o]), tok, TARGETS) - clean
        diffs.append((s3.per_example[:, 0] - r).abs().max())
    assert min(diffs) < 1e-4 and max(diffs) > 1e-3


def test_ablation_grid_axes(tiny):
    s = ablate(tiny, PROMPTS, TARGETS, SiteSpec("head", per_unit=True, positions=None))
    assert s.axes == ("layer", "head") and s.shape == (3, 4)
    assert s.extras["accuracy"].shape == (3, 4)


def test_ablation_bad_input(tiny):
    with pytest.raises(MultihopError, match="example 1: target is empty"):
        ablate(tiny, PROMPTS[:2], ["Paris", " "], [[Site("mlp_out", 0)]])
    with pytest.raises(MultihopError, match="reference prompt 0"):
        ablate(tiny, PROMPTS, TARGETS, [[Site("mlp_out", 0)]], AblationConfig(mode="mean"), reference=["Hello"])
    with pytest.raises(PatchtraceError, match="layer 9"):
        ablate(tiny, PROMPTS, TARGETS, [[Site("mlp_out", 9)]])
    with pytest.raises(PatchtraceError, match="head 7"):
        ablate(tiny, PROMPTS, TARGETS, [[Site("head", 0, unit=7)]])
    with pytest.raises(MultihopError, match="mode"):
        AblationConfig(mode="noise")  # type: ignore[arg-type]


def test_ablated_generation_matches_hf_generate_with_the_hook_at_every_step(tiny):
    tok = tiny.tokenizer
    mlp = decoder_layers(tiny.hf)[1].mlp
    refs = []
    for p in PROMPTS:
        ids = torch.tensor([tok(p).input_ids])
        h = mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
        try:
            with torch.no_grad():
                g = tiny.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                                     do_sample=False, pad_token_id=0)
        finally:
            h.remove()
        refs.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert all(len(r) > 1 for r in refs)
    s = ablate(tiny, PROMPTS, TARGETS, [[Site("mlp_out", 1)]], AblationConfig(max_new=3), aliases=[[r] for r in refs])
    assert s.extras["gen_correct"][:, 0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(MultihopError, match="zero ablation"):
        AblationConfig(mode="mean", max_new=3)
    with pytest.raises(MultihopError, match="without a position"):
        ablate(tiny, PROMPTS, TARGETS, [[Site("mlp_out", 1, pos=-1)]], AblationConfig(max_new=2))
