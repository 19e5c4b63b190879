"""A run recorded only to be patched *from* (``collect(base=False)``) keeps no keys/values and no
residual stream, yet knows its prompt length (trimmed runs included) and records what it was asked."""

from __future__ import annotations

import torch

from conftest import make_tiny
from patchtrace.engine.cache import collect
from patchtrace.sites import HookPoint


def test_source_run_keeps_points_and_length_without_kv(smol_tokenizer):
    model = make_tiny("llama", seed=0, tokenizer=smol_tokenizer)
    ids = torch.randint(5, 500, (2, 9))
    pts = {HookPoint("pattern", 1), HookPoint("head", 0)}
    base, src = collect(model, ids, pts, from_pos=6), collect(model, ids, pts, from_pos=6, base=False)
    assert base.kv and src.kv == []
    assert HookPoint("resid_pre", 0) in base.acts and HookPoint("resid_pre", 0) not in src.acts
    assert src.length == 9  # not the 3 kept positions, nor the 4 heads of `pattern`
    for hp in pts:
        assert torch.equal(src.acts[hp], base.acts[hp])
    assert torch.equal(src.logits, base.logits)


def test_a_hand_built_trimmed_run_without_kv_knows_its_length():
    """No ``T`` given and no keys/values: the length is ``pos0`` plus the positions an activation
    holds along its kind's position axis (a ``pattern`` is ``[N, H, T − pos0, T]``)."""
    from patchtrace.engine.cache import RunCache

    head = torch.zeros(2, 3, 4, 8)  # [N, T − pos0, H, d]: positions 6..8 of 9
    pattern = torch.zeros(2, 4, 3, 9)  # [N, H, T − pos0, T]
    logits = torch.zeros(2, 5)
    assert RunCache({HookPoint("head", 0): head}, [], logits, 6).length == 9
    assert RunCache({HookPoint("pattern", 1): pattern}, [], logits, 6).length == 9
    assert RunCache({HookPoint("head", 0): head}, [], logits, 0).length == 3
