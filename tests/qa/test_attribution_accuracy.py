"""Attribution accuracy counts only answers that came from the context (issue: silent wrong results, 7)."""

from __future__ import annotations

import torch

from patchtrace.qa.attnattrib import Attribution, accuracy_by_source, answer_source
from patchtrace.qa.items import QAItem


def _item(gold: int, answer: str = " Lyon", memory: str | None = " Paris") -> QAItem:
    return QAItem(("France's capital is Lyon.", "It rains."), "What is the capital of France?",
                  "The capital of France is", answer, gold, "conflict", memory, "France")


def _attr(tokenizer, text: str, top: int) -> Attribution:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return Attribution(ids, text, torch.zeros(3), torch.zeros(2), [top, 1 - top], (0, 1), 0.0, "ATTNATTRIB", None)  # type: ignore[arg-type]


def test_memory_and_other_answers_are_not_counted(smol_tokenizer):
    items = [_item(0), _item(0), _item(0), _item(0)]
    results = [
        _attr(smol_tokenizer, " Lyon.", 0),  # from the context, attributed right
        _attr(smol_tokenizer, " Lyon", 1),  # from the context, attributed wrong
        _attr(smol_tokenizer, " Paris", 0),  # from memory: its "hit" must not count
        _attr(smol_tokenizer, "The", 0),  # neither
    ]
    assert [answer_source(i, r, smol_tokenizer) for i, r in zip(items, results, strict=True)] == [
        "context", "context", "memory", "other"]
    acc = accuracy_by_source(items, results, smol_tokenizer)
    assert (acc["hits"], acc["n_context"], acc["memory"], acc["other"]) == (1, 2, [2], [3])


def test_attribution_saves_and_loads_bit_for_bit(smol_tokenizer, tmp_path):
    from patchtrace.qa.prompts import QAPrompt

    prompt = QAPrompt("ctx. q?", [5, 6, 7, 8], [(0, 2)], [0, 0, -1, -1])
    a = Attribution([11, 12], " Lyon.", torch.tensor([0.5, 0.25, 0.0, 0.0]), torch.tensor([0.75]), [0], (0, 2),
                    0.125, "ATTNATTRIB", prompt, torch.randn(2, 9), {"steered": True, "margin": 0.5})
    b = Attribution.load(a.save(tmp_path / "a"))
    assert torch.equal(a.token_scores, b.token_scores) and torch.equal(a.sentence_scores, b.sentence_scores)
    assert a.logits is not None and b.logits is not None and torch.equal(a.logits, b.logits)
    assert (b.answer_tokens, b.answer_text, b.ranking, b.span, b.seconds, b.method, b.extras) == (
        [11, 12], " Lyon.", [0], (0, 2), 0.125, "ATTNATTRIB", {"steered": True, "margin": 0.5})
    assert b.prompt == prompt
