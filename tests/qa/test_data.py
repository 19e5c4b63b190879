"""QA data: sentence spans of rendered prompts, the generators, JSONL round trip and errors, and the
same-length distractor of the patching task."""

from __future__ import annotations

import json

import pytest

from patchtrace.qa.generators import make_qa_items
from patchtrace.qa.io import load_qa_jsonl, save_qa_jsonl
from patchtrace.qa.items import QAItem
from patchtrace.qa.patching import same_length_distractor
from patchtrace.qa.prompts import render
from patchtrace.tasks.base import TaskError


def test_sentence_spans_adversarial(smol_tokenizer):
    sents = (
        "Dr. No is 3.5 m tall.",
        "<script>alert('x')</script> & co.",
        "Dr. No is 3.5 m tall.",
        "Zürich – naïve café 東京",
        "Question: What is it?",
        "no final punctuation",
    )
    it = QAItem(sents, "Who is Dr. No?", "Dr. No is", " tall", 0)
    for fmt in ("chat", "plain"):
        p = render(it, smol_tokenizer, fmt)  # type: ignore[arg-type]
        assert len(p.sentence_spans) == len(sents)
        for i, (s, e) in enumerate(p.sentence_spans):
            assert smol_tokenizer.decode(p.ids[s:e]).strip() == sents[i]
            assert all(p.token_sentence[t] == i for t in range(s, e))
        # tokens outside the spans are not context
        inside = {t for s, e in p.sentence_spans for t in range(s, e)}
        assert all(p.token_sentence[t] == -1 for t in range(len(p.ids)) if t not in inside)
        # the repeated sentence gets two different spans
        assert p.sentence_spans[0] != p.sentence_spans[2]


def test_generators_and_jsonl_roundtrip(tmp_path, smol_tokenizer):
    for kind in ("agree", "conflict", "nomemory"):
        items = make_qa_items(kind, 6, 0, smol_tokenizer)
        assert len(items) == 6
        for it in items:
            assert 3 <= len(it.sentences) <= 5
            assert it.sentences[it.gold].endswith(it.answer.strip() + ".") and it.subject in it.sentences[it.gold]
            assert len(smol_tokenizer(it.answer, add_special_tokens=False).input_ids) == 1
            if kind == "conflict":
                assert it.answer != it.memory
            if kind == "agree":
                assert it.answer == it.memory
            if kind == "nomemory":
                assert it.memory is None
    items = make_qa_items("conflict", 3, 1, smol_tokenizer)
    path = save_qa_jsonl(items, tmp_path / "qa.jsonl")
    assert load_qa_jsonl(path) == items
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentences": ["a."], "question": "q", "answer": " a", "gold": 3}) + "\n")
    with pytest.raises(TaskError, match="gold sentence index 3"):
        load_qa_jsonl(bad)
    bad.write_text(json.dumps({"sentences": ["a."], "question": "q"}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:1: missing field\(s\) answer, gold"):
        load_qa_jsonl(bad)


def test_same_length_distractor(smol_tokenizer):
    for it in make_qa_items("conflict", 8, 0, smol_tokenizer):
        alt = same_length_distractor(it, smol_tokenizer)
        if alt is None:
            continue
        assert len(render(alt, smol_tokenizer).ids) == len(render(it, smol_tokenizer).ids)
        assert it.answer.strip() not in alt.context and it.subject not in alt.sentences[it.gold]
        assert alt.sentences[:it.gold] == it.sentences[:it.gold]
