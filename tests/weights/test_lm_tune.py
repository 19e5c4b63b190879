"""Answer-only labels, teacher-forced exact match and KL, checked by hand on a stub model."""

from __future__ import annotations

import types

import pytest
import torch

from patchtrace.weights import WeightPatchError
from patchtrace.weights.lm_tune import answer_batches, exact_match, kl_on_text


def test_labels_cover_the_answer_tokens_only(smol_tokenizer):
    tok = smol_tokenizer
    pairs = [("The capital of France is", " Paris"), ("Hello", " big world")]
    (b,) = answer_batches(tok, pairs, batch=8)
    for j, (p, a) in enumerate(pairs):
        n_p = len(tok(p, add_special_tokens=False).input_ids)
        ans = tok(a, add_special_tokens=False).input_ids
        row = b["labels"][j]
        assert (row[:n_p] == -100).all()
        assert row[n_p : n_p + len(ans)].tolist() == ans
        assert (row[n_p + len(ans) :] == -100).all() and int(b["attention_mask"][j].sum()) == n_p + len(ans)
    with pytest.raises(WeightPatchError, match="no prompt/answer pairs"):
        answer_batches(tok, [])


class Stub(torch.nn.Module):
    """Predicts token ``t + 1`` after token ``t``; log-probs shifted by ``bias`` for the KL check."""

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, input_ids, attention_mask=None):
        logits = torch.full((*input_ids.shape, 50), -10.0)
        logits.scatter_(-1, ((input_ids + 1) % 50)[..., None], 10.0)
        logits[..., 0] += self.bias
        return types.SimpleNamespace(logits=logits)


def test_exact_match_and_kl_by_hand():
    ids = torch.tensor([[3, 4, 5, 6], [3, 4, 9, 0]])
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, 9, 0]])  # row 0 follows t+1, row 1 does not
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert exact_match(Stub(), [b]) == 0.5
    tok = lambda text, return_tensors=None: types.SimpleNamespace(input_ids=torch.tensor([[1, 2, 3]]))  # noqa: E731
    from patchtrace.weights.lm_tune import text_logprobs

    before = text_logprobs(Stub(), tok, ["x"])
    assert kl_on_text(Stub(), tok, ["x"], before) == pytest.approx(0.0, abs=1e-12)
    p = torch.log_softmax(Stub()(torch.tensor([[1, 2, 3]])).logits[0].double(), -1)
    q = torch.log_softmax(Stub(3.0)(torch.tensor([[1, 2, 3]])).logits[0].double(), -1)
    want = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl_on_text(Stub(3.0), tok, ["x"], before) == pytest.approx(want, rel=1e-9) and want > 0
