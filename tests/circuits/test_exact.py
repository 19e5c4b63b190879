"""Exact edge patching against the naive HF-hook reference (circuit_reference.py), per family.

Families: llama (GQA: 4 query heads over 2 KV heads), qwen2 (q/k/v biases, GQA), gpt2 (fused Conv1D
q/k/v, learned positions), gpt_neox (parallel blocks: the MLP reads resid_pre). Tolerance 1e-4.
"""

from __future__ import annotations

import circuit_reference as ref
import pytest
import torch

from conftest import make_tiny
from patchtrace import make_task
from patchtrace.circuits.exact import edge_grid, evaluate_sets, prepare
from patchtrace.circuits.graph import CircuitError, EdgeGraph

FAMILIES = ("llama", "qwen2", "gpt2", "gpt_neox")


@pytest.fixture(scope="module", params=FAMILIES)
def fam_model(request, smol_tokenizer):
    return make_tiny(request.param, tokenizer=smol_tokenizer)


def _task(tok, n=2):
    return make_task("ioi", n=n, seed=1).tokenize(tok)


class RefRuns:
    """The reference's base run and source senders, recorded once per test."""

    def __init__(self, m, t, direction="noise"):
        clean, corrupt = t.ids("clean", range(len(t))), t.ids("corrupt", range(len(t)))
        self.base, src_ids = (clean, corrupt) if direction == "noise" else (corrupt, clean)
        self.m, self.t = m, t
        self.src = ref.senders(m.hf, src_ids)
        self.m0 = ref.logit_diff(ref.patched_logits(m.hf, self.base, self.src, []), t.answer, t.wrong)

    def metric(self, edges):
        return float(ref.logit_diff(ref.patched_logits(self.m.hf, self.base, self.src, edges), self.t.answer, self.t.wrong).mean())

    def effect(self, edges):
        return self.metric(edges) - float(self.m0.mean())


def test_graph_counts_match_the_published_figure():
    # EAP-IG's GPT-2 small graph: 157 senders, 445 receivers, 32,491 edges (methods.md §4)
    g = EdgeGraph(12, 12, 12)
    assert (g.n_senders, g.n_receivers, g.n_edges) == (157, 445, 32491)
    # by hand, 2 layers x 2 heads x 1 KV head (sequential): layer 0 q,q,k,v read input (4 edges),
    # m0 reads input + 2 heads (3); layer 1 q,q,k,v read input + a0.h0 a0.h1 m0 (16), m1 (6); logits 7
    assert EdgeGraph(2, 2, 1).n_edges == 4 + 3 + 16 + 6 + 7
    # parallel blocks: m1 no longer reads its own layer's heads (6 -> 4), m0 reads only input (3 -> 1)
    assert EdgeGraph(2, 2, 1, parallel=True).n_edges == 36 - 2 - 2


def test_edge_grid_matches_reference(fam_model, smol_tokenizer):
    _check_grid(fam_model, _task(smol_tokenizer), "noise")


def test_denoising_edge_grid_matches_reference(smol_tokenizer):
    # one family suffices: the direction only swaps which recorded run is the base
    _check_grid(make_tiny("llama", seed=1, tokenizer=smol_tokenizer), _task(smol_tokenizer), "denoise")


def _check_grid(m, t, direction):
    rr = RefRuns(m, t, direction)
    p = prepare(m, t, direction=direction)
    G = p.graph
    # a q (head 3 of layer 2, KV group 1 under GQA), a k and a v of KV head 1, an MLP, the logits
    recs = [G.receiver_index(x) for x in ("a2.h3<q>", "a1.kv1<k>", "a2.kv1<v>", "m1", "logits")]
    eff = edge_grid(p, receivers=recs, max_rows=7)  # small batches: edges of one receiver span batches
    assert torch.isnan(eff[:, [r for r in range(G.n_receivers) if r not in recs]]).all()
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for r in recs:
        senders = G.mask[:, r].nonzero().flatten()
        for s in senders[torch.randperm(len(senders), generator=gen)[:2]].tolist():
            want = rr.effect([(G.sender_names[s], G.receiver_names[r])])
            assert eff[s, r].item() == pytest.approx(want, abs=1e-4), G.edge_name(s, r)
            checked += 1
    assert checked >= 8
    real = eff[G.mask[:, recs].nonzero()[:, 0], torch.tensor(recs)[G.mask[:, recs].nonzero()[:, 1]]]
    assert real.abs().max() > 1e-3  # the edges do something: the check above is not vacuous


def test_sparse_first_layer_equals_dense(smol_tokenizer):
    # the edge grid's default first layer projects only each row's changed receiver from the base
    # rows (OneReceiverPerRow); the dense path normalises every receiver's copy of every row. qwen2:
    # GQA and q/k/v biases, made non-zero here (a tiny model's are zero) so a dropped bias shows.
    # Batches of 11 rows mix q/k/v/MLP/logit receivers and straddle receivers.
    m = make_tiny("qwen2", seed=2, tokenizer=smol_tokenizer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.hf.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.5)
    p = prepare(m, _task(smol_tokenizer))
    G = p.graph
    recs = [r for r in range(G.n_receivers) if int(G.receiver_layer[r]) in (1, G.n_layers)]
    sparse, dense = edge_grid(p, receivers=recs, max_rows=11), edge_grid(p, receivers=recs, max_rows=11, sparse=False)
    want = G.mask.clone()
    want[:, [r for r in range(G.n_receivers) if r not in recs]] = False
    assert torch.equal(~torch.isnan(sparse), want)
    assert torch.allclose(sparse[want], dense[want], atol=1e-5, rtol=0)
    assert sparse[want].abs().max() > 1e-3


def test_edge_sets_match_reference(fam_model, smol_tokenizer):
    m, t = fam_model, _task(smol_tokenizer)
    p = prepare(m, t)
    G = p.graph
    gen = torch.Generator().manual_seed(1)
    masks = (torch.rand(3, G.n_senders, G.n_receivers, generator=gen) < torch.tensor([0.1, 0.5, 1.0])[:, None, None])
    masks &= G.mask
    got = evaluate_sets(p, masks)
    rr = RefRuns(m, t)
    for k in range(3):
        edges = [(G.sender_names[s], G.receiver_names[r]) for s, r in masks[k].nonzero().tolist()]
        want = rr.metric(edges)
        assert got[k].item() == pytest.approx(want, abs=1e-4)
    # every edge patched = the corrupt run (each receiver sees every sender's corrupt value)
    assert got[2].item() == pytest.approx(p.baselines["corrupt"], abs=1e-4)
    assert abs(p.baselines["corrupt"] - p.baselines["clean"]) > 1e-3


def test_bad_edges_and_post_norm_are_refused(smol_tokenizer):
    g = EdgeGraph(3, 4, 2)
    with pytest.raises(CircuitError, match="does not exist"):
        g.parse_edge("a2.h0 -> a1.h0<q>")  # the receiver reads before the sender writes
    with pytest.raises(CircuitError, match="does not exist"):
        g.parse_edge("m1 -> m1")
    with pytest.raises(CircuitError, match="unknown receiver"):
        g.parse_edge("a0.h0 -> a1.kv2<k>")  # 2 KV heads only
    gemma3 = make_tiny("gemma3", tokenizer=smol_tokenizer)
    with pytest.raises(CircuitError, match="post-norm"):
        prepare(gemma3, _task(smol_tokenizer))
