"""Back-patching: the fast grid against naive full forwards with hooks on the HF decoder layers (two
families), generation against HF ``generate`` with the prefill-only hook, checkpoint/resume, the fix rate."""

from __future__ import annotations

import pytest
import torch
from multihop_naive import naive_generate, naive_logprob_grid

from conftest import make_tiny
from patchtrace.engine.checkpoint import CheckpointError
from patchtrace.multihop.backpatch import BackpatchConfig, backpatch, fix_rate
from patchtrace.multihop.queries import MultihopError, TwoHopQuery, entity_last_token

Q = [
    TwoHopQuery(prompt="The capital of the country where Lyon is located is", target="Paris", aliases=("Paris",),
                entity="Lyon", bridge="France", relation="capital", hop1_ok=True, hop2_ok=True, name="q0"),
    TwoHopQuery(prompt="The currency of the country where the Colosseum is located is the", target="Euro",
                aliases=("EUR",), entity="Colosseum", bridge="Italy", relation="currency", name="q1"),
]


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def tiny(request, smol_tokenizer):
    return make_tiny(request.param, tokenizer=smol_tokenizer)


@pytest.mark.parametrize("position", ["last", "e1"])
def test_grid_matches_naive_hooks(tiny, position):
    s = backpatch(tiny, Q, BackpatchConfig(position=position, generate=False))
    L = tiny.dims.n_layers
    assert s.axes == ("source_layer", "target_layer") and s.per_example.shape == (2, L, L)
    for k, q in enumerate(Q):
        ids = torch.tensor([tiny.tokenizer(q.prompt).input_ids])
        pos = ids.shape[1] - 1 if position == "last" else entity_last_token(tiny.tokenizer, q)
        tok = tiny.tokenizer(" " + q.target).input_ids[0]
        ref = naive_logprob_grid(tiny.hf, ids, pos, tok)
        torch.testing.assert_close(s.per_example[k], ref, atol=1e-4, rtol=0)
        # a patch must matter somewhere, or the comparison proves nothing
        assert (ref - ref.diagonal()[None]).abs().max() > 1e-3
    torch.testing.assert_close(s.values, s.per_example.mean(0))


def test_entity_position_is_the_entitys_last_token(smol_tokenizer):
    ids = smol_tokenizer(Q[1].prompt).input_ids
    p = entity_last_token(smol_tokenizer, Q[1])
    assert "Colosseum".endswith(smol_tokenizer.decode(ids[p]).strip())
    assert not smol_tokenizer.decode(ids[p + 1]).strip().startswith("eum")


def test_generation_matches_hf_generate_with_prefill_hook(smol_tokenizer):
    m = make_tiny("llama", tokenizer=smol_tokenizer)
    s = backpatch(m, Q[:1], BackpatchConfig(position="e1", max_new=4))
    ids = torch.tensor([m.tokenizer(Q[0].prompt).input_ids])
    pos = entity_last_token(m.tokenizer, Q[0])
    gen = s.extras["gen"][0]
    for j, i in [(2, 0), (1, 0), (2, 1), (0, 2)]:
        assert gen[j, i].tolist() == naive_generate(m.hf, ids, pos, j, i, 4), (j, i)
    assert s.extras["success"].shape == (1, 3, 3)
    up = backpatch(m, Q[:1], BackpatchConfig(position="e1", max_new=4, gen_pairs="upper")).extras["gen"][0]
    lower = torch.tril(torch.ones(3, 3, dtype=torch.bool), -1)  # [j, i] with j > i
    assert torch.equal(up[lower], gen[lower]) and bool((up[~lower] == -1).all())


def test_fix_rate_counts_only_j_above_i():
    from patchtrace.results import Scores

    succ = torch.zeros(3, 2, 2)
    succ[0, 1, 0] = 1  # j=1 > i=0: a fix
    succ[1, 0, 1] = 1  # j=0 < i=1: not counted
    s = Scores(torch.zeros(2, 2), ("source_layer", "target_layer"), "resid_post",
               extras={"success": succ, "base_correct": torch.tensor([0.0, 0.0, 1.0])},
               provenance={"relations": ["capital", "currency", "capital"], "both_hops": [True, True, True]})
    r = fix_rate(s)
    assert r["all"] == {"incorrect": 2, "fixed": 1, "rate": 0.5}
    assert r["capital"]["fixed"] == 1 and r["currency"]["fixed"] == 0


def test_checkpoint_resume_equals_uninterrupted(tmp_path, smol_tokenizer):
    m = make_tiny("llama", tokenizer=smol_tokenizer)
    cfg = BackpatchConfig(generate=False)
    full = backpatch(m, Q, cfg)
    calls = []

    def boom(done, total):
        calls.append(done)
        if done >= 9 and len(calls) > 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backpatch(m, Q, cfg, out_dir=str(tmp_path / "r"), on_progress=boom)
    assert list((tmp_path / "r" / ".partial").glob("block-*"))
    resumed = backpatch(m, Q, cfg, out_dir=str(tmp_path / "r"))
    assert torch.equal(resumed.per_example, full.per_example)
    with pytest.raises(CheckpointError):
        backpatch(m, Q[:1], cfg, out_dir=str(tmp_path / "r"))


def test_bad_input_before_compute(smol_tokenizer):
    m = make_tiny("llama", tokenizer=smol_tokenizer)
    with pytest.raises(MultihopError, match=r"q9.*entity"):
        backpatch(m, [TwoHopQuery(prompt="The capital of X is", target="Y", aliases=(), name="q9")],
                  BackpatchConfig(position="e1"))
    with pytest.raises(MultihopError, match="position"):
        BackpatchConfig(position="middle")  # type: ignore[arg-type]
    with pytest.raises(MultihopError, match="no queries"):
        backpatch(m, [])
