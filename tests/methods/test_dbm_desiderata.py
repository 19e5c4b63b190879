"""Desiderata as data: validation errors, JSONL round-trip, splitting, reading tasks as desiderata
(:func:`patchtrace.methods.dbm.as_desiderata`), the variable-binding generator."""

from __future__ import annotations

import json

import pytest

from patchtrace.desiderata import (
    DesiderataError,
    Desideratum,
    Triple,
    desiderata_from_task,
    load_desiderata,
    save_desiderata,
    split_desiderata,
    tokenize_desiderata,
)
from patchtrace.methods.dbm import DBMError, as_desiderata
from patchtrace.tasks import make_task
from patchtrace.tasks.base import Example, Task
from patchtrace.tasks.variable_binding import (
    VariableBindingTask,
    desiderata_from_variable_binding,
    variable_binding_task,
)


def _ok(name: str = "value") -> Desideratum:
    return Desideratum(name, [Triple("a = 3\nprint(a)", "a = 5\nprint(a)", "5", contrast="3")], kind="value")


def test_valid_desideratum_tokenizes(smol_tokenizer):
    (td,) = tokenize_desiderata([_ok()], smol_tokenizer)
    assert len(td) == 1
    assert len(td.original[0]) == len(td.alternate[0])
    assert td.original[0] != td.alternate[0]
    assert smol_tokenizer.decode([int(td.target[0])]) == "5"
    assert smol_tokenizer.decode([int(td.contrast[0])]) == "3"


def test_length_mismatch_names_desideratum_tuple_and_tokens(smol_tokenizer):
    bad = Desideratum("swap", [Triple("a = 3", "a = 3", "3"), Triple("a = 3", "alpha beta = 12345", "3")])
    with pytest.raises(DesiderataError) as e:
        tokenize_desiderata([bad], smol_tokenizer)
    msg = str(e.value)
    assert "'swap'" in msg and "tuple 1" in msg and "alpha" in msg and "equal lengths" in msg


def test_multi_token_target_is_rejected(smol_tokenizer):
    bad = Desideratum("d", [Triple("a = 3", "a = 5", " elephantine")])
    with pytest.raises(DesiderataError, match=r"'d', tuple 0: target ' elephantine' is \d+ tokens"):
        tokenize_desiderata([bad], smol_tokenizer)
    bad2 = Desideratum("d2", [Triple("a = 3", "a = 5", "5", contrast="")])
    with pytest.raises(DesiderataError, match="'d2', tuple 0: contrast is empty"):
        tokenize_desiderata([bad2], smol_tokenizer)


def test_empty_duplicate_and_bad_kind(smol_tokenizer):
    with pytest.raises(DesiderataError, match="no tuples"):
        tokenize_desiderata([Desideratum("e", [])], smol_tokenizer)
    with pytest.raises(DesiderataError, match="appears twice"):
        tokenize_desiderata([_ok("x"), _ok("x")], smol_tokenizer)
    with pytest.raises(DesiderataError, match="no desiderata"):
        tokenize_desiderata([], smol_tokenizer)
    with pytest.raises(DesiderataError, match="unknown kind"):
        Desideratum("k", [], kind="sideways")  # type: ignore[arg-type]


def test_jsonl_round_trip_and_errors(tmp_path):
    ds = [
        _ok("value"),
        Desideratum("inv", [Triple("x = 1\nprint(x)", "x = 1\nprint(y)", "1", meta={"i": 4})], kind="invariance", weight=0.5),
    ]
    p = save_desiderata(ds, tmp_path / "d.jsonl")
    back = load_desiderata(p)
    assert [d.name for d in back] == ["value", "inv"]
    assert back[1].kind == "invariance" and back[1].weight == 0.5
    assert back[0].triples == ds[0].triples and back[1].triples[0].meta == {"i": 4}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"desideratum": "v", "original": "a", "alternate": "b", "target": "1"}) + "\n{not json\n")
    with pytest.raises(DesiderataError, match=r"bad.jsonl:2: not valid JSON"):
        load_desiderata(bad)
    bad.write_text(json.dumps({"desideratum": "v", "original": "a", "target": "1"}) + "\n")
    with pytest.raises(DesiderataError, match=r"bad.jsonl:1: missing or non-string field\(s\) alternate"):
        load_desiderata(bad)
    with pytest.raises(DesiderataError, match="does not exist"):
        load_desiderata(tmp_path / "nope.jsonl")


def test_split_is_disjoint_and_complete():
    d = Desideratum("v", [Triple(f"p{i}", f"q{i}", "1") for i in range(10)])
    (tr,), (te,) = split_desiderata([d], 0.6, seed=3)
    a, b = {t.original for t in tr.triples}, {t.original for t in te.triples}
    assert len(a) == 6 and len(b) == 4 and not a & b and a | b == {t.original for t in d.triples}
    with pytest.raises(DesiderataError, match="too few"):
        split_desiderata([d.subset([0])], 0.5)


def test_task_as_value_desideratum():
    t = Task("t", [Example("c", "k", " A", (" B", " C"))])
    (d,) = [desiderata_from_task(t)]
    assert d.kind == "value" and d.triples[0] == Triple("c", "k", " B", contrast=" A")


def test_as_desiderata_dispatches_on_type():
    d = _ok("v")
    assert as_desiderata(d) == [d] and as_desiderata([d, _ok("w")])[1].name == "w"
    t = Task("t", [Example("c", "k", " A", " B")])
    (read,) = as_desiderata(t)
    assert read.kind == "value" and read.triples[0] == Triple("c", "k", " B", contrast=" A")
    vb = make_task("variable-binding", n=4, seed=0)  # dashes and underscores name the same generator
    assert isinstance(vb, VariableBindingTask) and isinstance(vb.subset([0, 1]), VariableBindingTask)
    value, op = as_desiderata(vb.subset([0, 1]))
    assert (value.name, op.name) == ("value_dependence", "operation_invariance") and len(op) == 2
    assert op.triples[1].alternate == vb.examples[1].meta["op_alternate"]
    # the same examples in a plain Task are only a value desideratum
    (plain,) = as_desiderata(Task(vb.name, vb.examples, dict(vb.params)))
    assert plain.kind == "value" and len(plain) == 4
    for bad in ([], "value", [d, "x"], 3):
        with pytest.raises(DBMError, match="DBM needs desiderata"):
            as_desiderata(bad)  # type: ignore[arg-type]


def test_variable_binding_generator_without_model(smol_tokenizer):
    task = make_task("variable_binding", n=12, seed=1)
    assert len(task) == 12 and task.params["n_solved"] is None
    task.tokenize(smol_tokenizer)  # clean/corrupt equal lengths, single-token answers
    value, op = desiderata_from_variable_binding(task)
    tv, to = tokenize_desiderata([value, op], smol_tokenizer)
    for i, ex in enumerate(task.examples):
        vals, ref, other = ex.meta["values"], ex.meta["ref"], ex.meta["other"]
        assert ex.answer == str(vals[ref]) and ex.wrong != ex.answer
        # value alternate: target is the alternate's (new) value; operation alternate: target = original's
        assert value.triples[i].target == ex.wrong and value.triples[i].contrast == ex.answer
        assert op.triples[i].target == ex.answer and op.triples[i].contrast == str(vals[other])
        assert ex.meta["op_alternate"] != ex.clean
    assert (tv.target != tv.contrast).all() and (to.target != to.contrast).all()
    assert value.weight == 5.0 and op.kind == "invariance"


def test_variable_binding_bad_format():
    from patchtrace.tasks.base import TaskError

    with pytest.raises(TaskError, match="unknown variable-binding format"):
        variable_binding_task(4, fmt="haiku")
