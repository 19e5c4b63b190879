"""Shared fixtures: tiny random-init models of every supported family, and the bundled SmolLM2.

Tiers: tests mirror ``src/patchtrace`` (``tests/engine`` for ``engine/`` ...) and run on tiny random models in seconds; tests marked ``smollm2``
(``tests/integration``) load the real SmolLM2-135M-Instruct weights.
"""

from __future__ import annotations

import pytest
import torch

from patchtrace.models.load import Model, load_model, wrap_model


def pytest_configure(config):
    """Under pytest-xdist each worker gets one torch thread: two workers with two threads each on a
    2-core machine oversubscribe the cores and every tensor op slows down many times over."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


TINY_VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary, so tiny models can run real tasks


def tiny_config(family: str, vocab: int = TINY_VOCAB):
    """A 3-layer config of ``family`` with GQA where the family has it."""
    from transformers import (
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=vocab)
    if family == "gpt2":
        return GPT2Config(n_layer=3, n_embd=64, n_head=4, n_inner=96, vocab_size=vocab, n_positions=128)
    if family == "gpt_neox":
        return GPTNeoXConfig(**common, max_position_embeddings=128)
    if family == "gpt_neox_seq":
        return GPTNeoXConfig(**common, max_position_embeddings=128, use_parallel_residual=False)
    if family == "llama":
        return LlamaConfig(**common, num_key_value_heads=2)
    if family == "mistral":
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2)
    if family == "qwen3":
        return Qwen3Config(**common, num_key_value_heads=2, head_dim=16)
    if family == "gemma":
        return GemmaConfig(**common, num_key_value_heads=1, head_dim=16)
    if family == "gemma3":
        # sandwich norms, q/k-norm, a local window (6) shorter than the test prompts on layers 0 and 2,
        # different rotary tables for local/global layers, a query scale that is not 1/sqrt(head_dim),
        # and a final logit soft-cap small enough to bend the logits
        rope = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        }
        return Gemma3TextConfig(
            **common, num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_parameters=rope,
            final_logit_softcapping=10.0,
        )
    raise KeyError(family)


TINY_FAMILIES = ("gpt2", "gpt_neox", "gpt_neox_seq", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3")


def make_tiny(family: str, seed: int = 0, vocab: int = TINY_VOCAB, tokenizer=None) -> Model:
    """A random-init model of ``family``; weights scaled up so activations are not near-uniform."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab)
    cfg.initializer_range = 0.2
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    if family == "gemma3":  # its (1 + w) norms start at w = 0: give every norm a weight that matters
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
    return wrap_model(hf, tokenizer, name=f"tiny-{family}")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer (from the de-quantized cache; first use materializes it)."""
    from transformers import AutoTokenizer

    from patchtrace.models.load import _materialize_bundled

    return AutoTokenizer.from_pretrained(str(_materialize_bundled("smollm2-135m")))


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def tiny_model(request, smol_tokenizer) -> Model:
    """Each tiny family in turn, with the SmolLM2 tokenizer attached."""
    return make_tiny(request.param, tokenizer=smol_tokenizer)


@pytest.fixture(scope="session")
def smollm2() -> Model:
    """The real SmolLM2-135M-Instruct, float32 on CPU."""
    return load_model("smollm2-135m")


# Tiny diffusion pipelines (tests/diffusion), one per module, built from configs in a fraction of a second.
# They live here rather than in tests/diffusion/conftest.py: a second module named `conftest` would shadow this one
# for every test file that does `from conftest import make_tiny`.
@pytest.fixture(scope="module")
def sd():
    from patchtrace.diffusion.tiny import tiny_sd

    p = tiny_sd()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def sdxl():
    from patchtrace.diffusion.tiny import tiny_sdxl

    p = tiny_sdxl()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def small_random():
    from patchtrace.diffusion.small.pipeline import random_small

    return random_small()
