"""Text-encoder causal tracing: no noise changes nothing; a restored last layer is clean at the word."""

from __future__ import annotations

import pytest
import torch

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.te_trace import _states, trace_text_encoder, word_positions

P = ["a red two on a white background", "a green x on the left"]


def score(images, pidx):
    return images.mean((1, 2, 3))


def test_zero_noise_changes_nothing(small_random):
    a = T2IAdapter(small_random, steps=1)
    s, _, _ = trace_text_encoder(a, P, ["red", "green"], score, seeds=[0], noise_scale=0.0)
    assert torch.equal(s.values, torch.zeros(3))
    assert s.baselines["clean"] == s.baselines["corrupt"]


def test_restoring_last_layer_restores_word_tokens(small_random):
    a = T2IAdapter(small_random, steps=1)
    tok = small_random.tokenizer
    pos = [word_positions(tok, p, w) for p, w in zip(P, ["red", "green"])]
    assert pos == [[2], [2]]
    ids = tok(P, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        clean = small_random.text_encoder(ids, output_hidden_states=True)
    noise = 3.0 * torch.randn(2, tok.model_max_length, 64, generator=torch.Generator().manual_seed(0))
    noisy = _states(a, P, pos, noise, None, clean.hidden_states)
    restored = _states(a, P, pos, noise, 2, clean.hidden_states)
    assert not torch.allclose(noisy[0, 2], clean.last_hidden_state[0, 2], atol=1e-3)
    assert torch.allclose(restored[:, 2], clean.last_hidden_state[:, 2], atol=1e-5)  # final norm is per token
    assert torch.equal(noisy[:, :2], clean.last_hidden_state[:, :2])  # causal: tokens before the word untouched


def test_refusals(small_random, sdxl):
    a = T2IAdapter(small_random, steps=1)
    with pytest.raises(DiffusionError, match="'blue' do not occur"):
        trace_text_encoder(a, P[:1], ["blue"], score)
    with pytest.raises(DiffusionError, match="two"):
        trace_text_encoder(T2IAdapter(sdxl, steps=1), P[:1], ["red"], score)
