"""The batched model-answer helper against one greedy Hugging Face forward per prompt, on tiny models.

Prompts of several lengths (so several batches), with and without a shared prefix (the prefix then
runs once and the suffixes attend to its cached keys/values), on a rotary family and on GPT-2
(absolute positions, where a wrong position offset would show)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_tiny
from patchtrace.tasks.base import TaskError
from patchtrace.tasks.filtering import common_prefix, greedy_next_tokens, logit_differences


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, smol_tokenizer):
    return make_tiny(request.param, seed=2, tokenizer=smol_tokenizer)


def _prompts(seed: int, prefix: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [prefix + [rng.randrange(100, 5000) for _ in range(rng.choice((3, 4, 6)))] for _ in range(11)]


def _one_at_a_time(model, prompts):
    with torch.no_grad():
        return [model.hf(input_ids=torch.tensor([p])).logits[0, -1].float() for p in prompts]


@pytest.mark.parametrize("prefix", [[], [17, 923, 4001, 88, 2]])
def test_greedy_next_tokens_equals_one_forward_per_prompt(model, prefix):
    prompts = _prompts(1, prefix)
    assert common_prefix(prompts) >= len(prefix) and len({len(p) for p in prompts}) == 3
    ref = _one_at_a_time(model, prompts)
    want = [int(r.argmax()) for r in ref]
    assert len(set(want)) > 1  # non-vacuous: the prompts do not all get the same answer
    assert greedy_next_tokens(model, prompts, batch_size=4) == want  # several chunks per length too


def test_logit_differences_equal_one_forward_per_prompt(model):
    prompts = _prompts(3, [5, 6, 7])
    ref = _one_at_a_time(model, prompts)
    plus = [int(r.argmax()) for r in ref]
    minus = [(t + 7) % 1000 for t in plus]
    got = logit_differences(model, prompts, plus, minus)
    want = [float(r[a] - r[b]) for r, a, b in zip(ref, plus, minus, strict=True)]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(g > 0 for g in got)  # the argmax beats any other token


def test_common_prefix_leaves_every_prompt_a_token():
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3, 4], [1, 2, 9]]) == 2
    assert common_prefix([[5], [5, 6]]) == 0 and common_prefix([]) == 0


def test_bad_input(model):
    with pytest.raises(TaskError, match="empty"):
        greedy_next_tokens(model, [[1, 2], []])
    with pytest.raises(TaskError, match="one plus and one minus"):
        logit_differences(model, [[1, 2]], [3], [])
