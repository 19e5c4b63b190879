"""Built-in task generators and the JSONL/CSV loader."""

from __future__ import annotations

import json

import pytest

from patchtrace.tasks import BUILTIN_TASKS, Example, Task, make_task
from patchtrace.tasks.factual import CAPITALS, factual
from patchtrace.tasks.io import load_task


@pytest.mark.parametrize("name", ["ioi", "factual", "greater_than"])
def test_deterministic_for_a_seed(name, smol_tokenizer):
    model = None
    a = make_task(name, n=8, seed=3, model=model)
    b = make_task(name, n=8, seed=3, model=model)
    c = make_task(name, n=8, seed=4, model=model)
    assert [e.to_json() for e in a.examples] == [e.to_json() for e in b.examples]
    assert a.hash() == b.hash()
    assert a.hash() != c.hash()
    assert name in BUILTIN_TASKS


def test_ioi_balance_and_structure():
    t = make_task("ioi", n=16, seed=0)
    orders = [e.meta["order"] for e in t.examples]
    assert orders.count("ABBA") == orders.count("BABA") == 8
    for e in t.examples:
        io, s = e.meta["io"], e.meta["s"]
        assert io != s
        assert e.answer == " " + io and e.wrong == " " + s
        # clean repeats S in the second clause; corrupt repeats IO
        assert f", {s} gave" in e.clean and f", {io} gave" in e.corrupt
        first = e.clean.split(" went")[0]
        assert first in (f"When {io} and {s}", f"When {s} and {io}")
        assert (first == f"When {io} and {s}") == (e.meta["order"] == "ABBA")


@pytest.mark.parametrize("name", ["ioi", "greater_than"])
def test_single_token_answers_and_equal_lengths(name, smol_tokenizer):
    class _M:
        tokenizer = smol_tokenizer

    t = make_task(name, n=16, seed=0) if name != "greater_than" else make_task(name, n=16, seed=0, model=_M())
    assert len(t) > 0
    tt = t.tokenize(smol_tokenizer)  # raises on a length mismatch or a multi-token answer
    for i in range(len(t)):
        assert len(tt.clean[i]) == len(tt.corrupt[i])
        assert tt.clean[i] != tt.corrupt[i]
    assert tt.answer.shape[0] == len(t) and tt.wrong.shape[0] == len(t)
    for e in t.examples:
        for a in (e.answer,) if isinstance(e.answer, str) else e.answer:
            assert len(smol_tokenizer(a, add_special_tokens=False).input_ids) == 1, (name, a)
    if name == "ioi":
        assert tt.uniform_length() is not None


def test_factual_with_tokenizer_keeps_single_token_answers(smol_tokenizer, monkeypatch):
    """With a tokenizer known, factual only pairs countries whose capitals are single tokens
    (' Bangkok' and ' Ankara' are two SmolLM2 tokens). The model filter is bypassed here."""

    class _M:
        tokenizer = smol_tokenizer

    import sys

    fm = sys.modules["patchtrace.tasks.factual"]  # the package attribute is the function of that name
    monkeypatch.setattr(fm, "known_facts", lambda model, examples: examples)
    t = factual(n=40, seed=0, model=_M())
    assert len(t) >= 20
    tt = t.tokenize(smol_tokenizer)  # raised TaskError on ' Bangkok' before the fix
    assert all(len(tt.clean[i]) == len(tt.corrupt[i]) for i in range(len(t)))
    assert all(e.meta["subject"] not in ("Thailand", "Turkey") for e in t.examples)


def test_factual_subjects_and_answers():
    t = factual(n=8, seed=0)
    for e in t.examples:
        subj, other = e.meta["subject"], e.meta["other"]
        assert subj in e.clean and other in e.corrupt
        assert e.answer == " " + CAPITALS[subj] and e.wrong == " " + CAPITALS[other]
    assert t.params["kept"] == len(t) == 8


def test_greater_than_answer_sets(smol_tokenizer):
    class _M:
        tokenizer = smol_tokenizer

    t = make_task("greater_than", n=8, seed=1, model=_M())
    for e in t.examples:
        yy = e.meta["yy"]
        assert "1701" in e.corrupt
        if not t.params["two_digit"]:
            tens = yy // 10
            assert all(int(a) > tens for a in e.answer)
            assert all(int(w) < tens for w in e.wrong)


def test_jsonl_loader(tmp_path, smol_tokenizer):
    p = tmp_path / "mine.jsonl"
    recs = [
        {"clean": "The cat sat on the", "corrupt": "The dog sat on the", "answer": " mat", "wrong": " rug", "k": 1},
        {"clean": "The cat sat on the", "corrupt": "The dog sat on the", "answer": [" mat", " floor"],
         "wrong": [" rug", " bed"]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    t = load_task(p)
    assert t.name == "mine" and len(t) == 2
    assert t.examples[0].meta == {"k": 1}
    assert t.examples[1].answer == (" mat", " floor")
    assert make_task(str(p)).hash() == t.hash()


def test_csv_loader_with_answer_sets(tmp_path, smol_tokenizer):
    p = tmp_path / "mine.csv"
    p.write_text("clean,corrupt,answer,wrong,note\nThe cat sat on the,The dog sat on the, mat| floor, rug| bed,hi\n")
    t = load_task(p)
    e = t.examples[0]
    assert e.answer == (" mat", " floor") and e.wrong == (" rug", " bed")
    assert e.meta == {"note": "hi"}
    tt = t.tokenize(smol_tokenizer)
    assert tt.answer.shape == (1, 2) and tt.wrong.shape == (1, 2)


def test_groups_and_ids(smol_tokenizer):
    t = Task("t", [Example("a b c", "a b d", " x", " y"), Example("a b", "a c", " x", " y"),
                   Example("a b e", "a b f", " x", " y")])
    tt = t.tokenize(smol_tokenizer)
    groups = tt.groups()
    assert sorted(i for g in groups for i in g) == [0, 1, 2]
    for g in groups:
        assert len({tt.lengths[i] for i in g}) == 1
        assert tuple(tt.ids("clean", g).shape) == (len(g), tt.lengths[g[0]])
    assert tt.uniform_length() is None
