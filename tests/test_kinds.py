"""The kind table says what each kind's tensor really looks like (checked on recorded runs)."""

from __future__ import annotations

import pytest

from patchtrace.engine.cache import collect
from patchtrace.kinds import KINDS, KindError, available, kind_info
from patchtrace.sites import SITE_KINDS, HookPoint


def test_one_row_per_kind_of_the_vocabulary():
    assert tuple(KINDS) == SITE_KINDS
    with pytest.raises(KindError, match="'logits'"):
        kind_info("logits")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layout_and_unit_counts_match_the_recorded_tensors(family, smol_tokenizer):
    from conftest import make_tiny

    model = make_tiny(family, seed=0, tokenizer=smol_tokenizer)
    ids = model.tokenizer(["one two three four five"], return_tensors="pt").input_ids
    T = ids.shape[1]
    pts = [HookPoint(k, None if not i.has_layer else 1) for k, i in KINDS.items()
           if not (i.sequential_only and model.dims.parallel_residual) and available(k, model.dims)]
    run = collect(model, ids, pts)
    for hp in pts:
        info = kind_info(hp.kind)
        x = run.acts[hp]
        assert x.shape[info.pos_dim] == T, hp
        if info.has_units:
            assert info.unit_dim is not None and x.shape[info.unit_dim] == info.units(model.dims), hp
        else:
            assert x.dim() == 3 and x.shape[2] == model.dims.d_model, hp
