"""A recorded run that drops its keys/values still knows its prompt length (trimmed runs included)."""

from __future__ import annotations

import torch

from conftest import make_tiny
from patchtrace.engine.cache import collect
from patchtrace.sites import HookPoint


def test_dropped_kv_keeps_the_length_of_a_trimmed_run(smol_tokenizer):
    model = make_tiny("llama", seed=0, tokenizer=smol_tokenizer)
    ids = torch.randint(5, 500, (2, 9))
    run = collect(model, ids, {HookPoint("pattern", 1), HookPoint("head", 0)}, from_pos=6)
    assert run.kv and run.length == 9
    run.drop_kv()
    assert run.kv == [] and run.length == 9  # not the 3 kept positions, nor the 4 heads of `pattern`
    assert run.acts[HookPoint("head", 0)].shape[1] == 3
