"""Recall vs reasoning: the statistics against hand computations (Cohen's d with pooled std, BH by
its definition, thresholds and sign), the matched items, and the pipeline on a tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from patchtrace.multihop.queries import MultihopError, TwoHopQuery
from patchtrace.multihop.recall_reasoning import RRConfig, items, recall_reasoning, specialization


def test_specialization_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 3, generator=g)
    b = torch.randn(30, 3, generator=g)
    a[:, 0] += 3.0  # recall-specialized
    b[:, 1] += 3.0  # reasoning-specialized
    out = specialization(a, b, alpha=0.01, d_min=0.8)
    for c in range(3):
        x, y = a[:, c].double(), b[:, c].double()
        sp = ((29 * x.var() + 29 * y.var()) / 58).sqrt()
        assert float(out["d"][c]) == pytest.approx(float((x.mean() - y.mean()) / sp), rel=1e-9)
    # Benjamini-Hochberg by definition: q_(k) = min_{j ≥ k} p_(j) · m / j
    p = out["p"]
    order = p.argsort()
    m = len(p)
    ranked = p[order] * m / torch.arange(1, m + 1)
    q = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1)
    torch.testing.assert_close(out["q"][order], q)
    assert out["label"].tolist() == [1, -1, 0]


def test_fold_consistency_drops_an_effect_carried_by_one_fold():
    a = torch.zeros(20, 2)
    b = torch.zeros(20, 2)
    a[:, 0] = torch.arange(20.0) % 2 + 5.0   # every fold: recall higher
    b[:, 0] = torch.arange(20.0) % 2
    a[:, 1] = torch.arange(20.0) % 2          # column 1: only fold 0's items of a are high ...
    a[0::5, 1] += 50.0
    b[:, 1] = torch.arange(20.0) % 2 + 0.5    # ... elsewhere reasoning is higher
    loose = specialization(a, b, alpha=1.0, d_min=0.0)
    strict = specialization(a, b, alpha=1.0, d_min=0.0, folds=5)
    assert loose["label"].tolist() == [1, 1]
    assert strict["label"].tolist() == [1, 0]


def test_constant_features_are_not_specialized():
    a = torch.ones(10, 2)
    b = torch.ones(10, 2)
    b[:, 1] = 2.0
    out = specialization(a, b, alpha=0.01, d_min=0.5)
    assert out["label"][0] == 0 and out["p"][0] == 1.0


QS = [
    TwoHopQuery(prompt=f"The {rel} of the country where {city} is located is", target=t, aliases=(), entity=city,
                bridge=country, relation=rel, name=f"q{k}")
    for k, (city, country, rel, t) in enumerate([
        ("Lyon", "France", "capital", "Paris"), ("Lyon", "France", "continent", "Europe"),
        ("Osaka", "Japan", "capital", "Tokyo"), ("Osaka", "Japan", "continent", "Asia"),
        ("Milan", "Italy", "capital", "Rome"), ("Milan", "Italy", "continent", "Europe"),
        ("Porto", "Portugal", "capital", "Lisbon"), ("Porto", "Portugal", "continent", "Europe"),
    ])
]


def test_items_are_matched_over_the_same_facts():
    rec, rea = items(QS)
    assert ("The capital of France is", "Paris") in rec and ("Japan is on the continent of", "Asia") in rec
    assert any(p.startswith("If Rome is the capital of Italy and Italy is in Europe") for p, _ in rea)
    assert {t for _, t in rea} <= {t for _, t in rec}


def test_pipeline_on_tiny_model(smol_tokenizer):
    m = make_tiny("llama", tokenizer=smol_tokenizer)
    r = recall_reasoning(m, QS, RRConfig(n_random=1, max_group=3, folds=2))
    c = r.counts()
    assert c["head"]["total"] == 3 * 4 and c["neuron"]["total"] == 3 * 96 and c["layer"]["total"] == 3
    for g, row in r.ablation.items():
        assert row["size"] == len(r.groups[g]) <= 3
    with pytest.raises(MultihopError, match="10 items per set"):
        recall_reasoning(m, QS)  # 5 folds need 10 items per set
