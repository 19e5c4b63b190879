"""The model wrapper: it leaves the caller's model alone, its hash follows the weights, and weight
overrides are scoped, validated first and restored bit for bit.

References are plain torch facts (``torch.equal`` on byte views, module flags, the HF forward),
never the wrapper's own output.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny, tiny_config
from patchtrace import PatchtraceError, SiteSpec, make_task
from patchtrace.methods import atp
from patchtrace.models.load import wrap_model
from patchtrace.models.weights import WeightOverrideError

VOCAB = 512
DOWN = "model.layers.1.mlp.down_proj.weight"
NORM = "model.layers.0.post_attention_layernorm.weight"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).clone()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: _bits(v) for k, v in model.hf.state_dict().items()}


def _same(model, snap) -> bool:
    now = model.hf.state_dict()
    return set(now) == set(snap) and all(torch.equal(_bits(now[k]), snap[k]) for k in snap)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def gemma3():
    return make_tiny("gemma3", vocab=VOCAB)


# -- wrap_model leaves the caller's flags -----------------------------------------------------------


def test_wrap_model_leaves_training_and_requires_grad_flags_as_they_were(smol_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("gpt2")
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.5  # dropout would show if anything used it
    hf = AutoModelForCausalLM.from_config(cfg)
    hf.train()
    hf.transformer.h[1].eval()  # a mixed state, so "left as it was" is not "set to a default"
    hf.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    training = {n: m.training for n, m in hf.named_modules()}
    grads = {n: p.requires_grad for n, p in hf.named_parameters()}
    model = wrap_model(hf, smol_tokenizer)
    task = make_task("ioi", n=2, seed=0).tokenize(smol_tokenizer)
    ids = task.ids("clean", [0, 1])
    with torch.no_grad():
        a = model.runner.forward(ids).logits
    b = model.runner.forward(ids).logits  # grad mode on: no graph to the weights, flags restored after
    est = atp.run(model, task, SiteSpec("mlp_out", positions="last", layers=(1,)))
    assert {n: m.training for n, m in hf.named_modules()} == training
    assert {n: p.requires_grad for n, p in hf.named_parameters()} == grads
    assert all(p.grad is None for p in hf.parameters())
    assert not b.requires_grad  # no parameter entered the autograd graph
    assert torch.equal(a, b)  # no dropout despite training=True
    hf.eval()
    with torch.no_grad():
        ref = hf(ids).logits
    assert float((a - ref).abs().max()) < 1e-5  # the eval-mode function
    assert float(est.values.abs().max()) > 0  # the gradient method ran through grad-requiring weights


# -- weights_hash follows the weights ---------------------------------------------------------------


def test_weights_hash_changes_after_an_in_place_edit_and_returns_with_the_values(gemma3):
    h0 = gemma3.weights_hash()
    p = dict(gemma3.hf.named_parameters())[DOWN]
    saved = p.detach().clone()
    with torch.no_grad():
        p[0, 0] += 1.0
    h1 = gemma3.weights_hash()
    assert h1 != h0
    with torch.no_grad():
        p.copy_(saved)
    assert gemma3.weights_hash() == h0  # content hash: the same bytes give the same hash again


def test_weights_hash_follows_a_swapped_tensor(gemma3):
    h0 = gemma3.weights_hash()
    p = dict(gemma3.hf.named_parameters())[NORM]
    old = p.data
    p.data = old + 1.0
    assert gemma3.weights_hash() != h0
    p.data = old
    assert gemma3.weights_hash() == h0


# -- override_weights -------------------------------------------------------------------------------


def test_override_weights_round_trip_is_bit_exact_and_scoped(gemma3):
    ids = _ids()
    snap = _snapshot(gemma3)
    h0 = gemma3.weights_hash()
    with torch.no_grad():
        before = gemma3.runner.forward(ids).logits
    params = dict(gemma3.hf.named_parameters())
    new = {DOWN: torch.randn_like(params[DOWN]), NORM: torch.zeros_like(params[NORM])}
    caller_copy = {k: v.clone() for k, v in new.items()}
    with gemma3.override_weights(new) as m:
        assert m is gemma3
        assert torch.equal(params[DOWN], new[DOWN]) and torch.equal(params[NORM], new[NORM])
        assert gemma3.weights_hash() != h0
        with torch.no_grad():
            inside = gemma3.runner.forward(ids).logits
            params[DOWN].mul_(2.0)  # an edit inside the block must not leak into the caller's tensor
        torch.testing.assert_close(inside, gemma3.hf(ids).logits.detach(), atol=1e-5, rtol=0)
    assert float((inside - before).abs().max()) > 1e-3  # the override reached the forward
    assert _same(gemma3, snap)
    assert gemma3.weights_hash() == h0
    assert all(torch.equal(new[k], caller_copy[k]) for k in new)
    with torch.no_grad():
        assert torch.equal(gemma3.runner.forward(ids).logits, before)


def test_override_weights_restores_on_exception(gemma3):
    snap, h0 = _snapshot(gemma3), gemma3.weights_hash()
    w = dict(gemma3.hf.named_parameters())[DOWN]
    with pytest.raises(RuntimeError, match="boom"), gemma3.override_weights({DOWN: torch.zeros_like(w)}):
        raise RuntimeError("boom")
    assert _same(gemma3, snap) and gemma3.weights_hash() == h0


@pytest.mark.parametrize(
    "bad,named",
    [
        ({"model.layers.9.mlp.down_proj.weight": torch.zeros(64, 96)}, "model.layers.9.mlp.down_proj.weight"),
        ({NORM: torch.zeros(63)}, NORM),
        ({NORM: torch.zeros(64, dtype=torch.float64)}, NORM),
        ({NORM: [0.0] * 64}, NORM),
        ({"lm_head.weight": torch.zeros(VOCAB, 64), "model.embed_tokens.weight": torch.zeros(VOCAB, 64)},
         "tied"),
    ],
)
def test_override_weights_is_all_or_nothing(gemma3, bad, named):
    snap, h0 = _snapshot(gemma3), gemma3.weights_hash()
    values = {DOWN: torch.zeros(64, 96), **bad}  # a valid item first: it must not be applied either
    with pytest.raises(WeightOverrideError, match=named.replace(".", r"\.")) as e:
        with gemma3.override_weights(values):
            pytest.fail("the block must not run")
    assert isinstance(e.value, PatchtraceError)
    assert _same(gemma3, snap) and gemma3.weights_hash() == h0
