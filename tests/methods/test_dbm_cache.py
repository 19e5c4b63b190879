"""One run cache per DBM call: each unpatched batch runs once, however often it is evaluated.

Forwards are counted by wrapping the collect function the cache calls; the missing-contrast rule of
the ranking is checked against logits of the plain Hugging Face forward."""

from __future__ import annotations

import pytest
import torch
from dbm_common import pairs

from conftest import make_tiny
from patchtrace.desiderata import Desideratum, Triple, split_desiderata, tokenize_desiderata
from patchtrace.methods import dbm
from patchtrace.methods.dbm import cache as cache_mod
from patchtrace.methods.dbm.evaluate import contrasts
from patchtrace.sites import Site


@pytest.fixture(scope="module")
def llama(smol_tokenizer):
    return make_tiny("llama", seed=1, tokenizer=smol_tokenizer)


@pytest.fixture
def collects(monkeypatch):
    """Every call of the cache's collect, as ``(n_rows, n_positions)``."""
    calls: list[tuple[int, int]] = []
    real = cache_mod.collect

    def counting(model, ids, points=(), **kw):
        calls.append(tuple(ids.shape))
        return real(model, ids, points, **kw)

    monkeypatch.setattr(cache_mod, "collect", counting)
    return calls


def _two_lengths(n: int, seed: int) -> Desideratum:
    """Tuples of two different lengths, so the desideratum runs as two equal-length groups."""
    short = pairs(n // 2, seed, length=6)
    long = pairs(n - n // 2, seed + 1, length=8)
    return Desideratum("v", [Triple(o, a, " the") for o, a in short + long])


def test_second_evaluation_of_the_same_desideratum_costs_no_forward(llama, collects):
    (td,) = tokenize_desiderata([_two_lengths(6, 0)], llama.tokenizer)
    assert len(td.groups()) == 2
    sets = [[Site("head", 1, 2, -1), Site("mlp_out", 0, None, -1)], []]
    store = dbm.RunStore()
    first = dbm.evaluate_site_sets(llama, [td], sets, runs=store)
    assert len(collects) == 4  # original + alternate of each group
    second = dbm.evaluate_site_sets(llama, [td], sets, runs=store)
    assert len(collects) == 4 and store.n_collected == 4
    torch.testing.assert_close(first, second)
    # a point the cached runs lack re-collects them once, with the union of points
    dbm.evaluate_site_sets(llama, [td], [[Site("attn_out", 2, None, -1)]], runs=store)
    assert len(collects) == 8
    dbm.evaluate_site_sets(llama, [td], [*sets, [Site("attn_out", 2, None, -1)]], runs=store)
    assert len(collects) == 8


def test_a_run_collects_each_batch_once(llama, collects):
    """Training, the exact-patching ranking and both evaluations share one cache."""
    d = _two_lengths(12, 3)
    cfg = dbm.DBMConfig(lam=0.05, steps=2, baseline=True)
    mask = dbm.run(llama, [d], "head,mlp_out", cfg)
    train, test = split_desiderata([d], cfg.train_fraction, cfg.seed)
    groups = sum(len(td.groups()) for part in (train, test) for td in tokenize_desiderata(part, llama.tokenizer))
    assert len(collects) == 2 * groups
    assert "topk_accuracy" in mask.evaluation and len(mask.history["loss"]) == 2


def test_missing_contrasts_follow_the_rule_on_hf_logits(llama):
    prs = pairs(6, 5)
    d = Desideratum("v", [Triple(o, a, " the") for o, a in prs])
    (td,) = tokenize_desiderata([d], llama.tokenizer)
    got = contrasts(llama, td, dbm.RunStore())
    n_runner_up = 0
    for i in range(len(td)):
        with torch.no_grad():
            lo = llama.hf(input_ids=torch.tensor([td.original[i]])).logits[0, -1]
            la = llama.hf(input_ids=torch.tensor([td.alternate[i]])).logits[0, -1]
        t = int(td.target[i])
        top2 = lo.topk(2).indices.tolist()
        want = top2[0] if top2[0] != t else int(la.argmax()) if int(la.argmax()) != t else top2[1]
        n_runner_up += top2[0] == t
        assert int(got[i]) == want and want != t
    # given contrasts are kept as they are
    d2 = Desideratum("w", [Triple(o, a, " the", contrast=" cat") for o, a in prs])
    (td2,) = tokenize_desiderata([d2], llama.tokenizer)
    assert (contrasts(llama, td2, dbm.RunStore()) == td2.contrast).all()
