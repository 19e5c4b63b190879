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
