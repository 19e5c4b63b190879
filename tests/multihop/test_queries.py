"""Two-hop records: JSONL round trip, validation naming file:line and field, alias filtering, the generator."""

from __future__ import annotations

import json

import pytest

from patchtrace.multihop.queries import MultihopError, TwoHopQuery, load_jsonl, matches, save_jsonl, usable_aliases

GOOD = {"prompt": "The capital of the country where Lyon is located is", "target": "Paris", "aliases": ["Paris", "P"],
        "entity": "Lyon", "bridge": "France", "relation": "capital", "hop1_ok": True}


def _write(tmp_path, *recs):
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def test_round_trip_and_alias_filter(tmp_path):
    qs = load_jsonl(_write(tmp_path, GOOD))
    assert qs[0].aliases == ("Paris",) and qs[0].hop1_ok is True and qs[0].name.endswith("q.jsonl:1")
    again = load_jsonl(save_jsonl(qs, tmp_path / "out.jsonl"))
    assert again == qs
    assert usable_aliases(["US", "U", " us ", "USA"]) == ("US", "USA")
    assert matches("it is paris.", ("Paris",)) and not matches("Parma", ("Paris",))


@pytest.mark.parametrize(("change", "needle"), [
    ({"aliases": None}, "missing required field 'aliases'"),
    ({"target": "  "}, "'target' is empty"),
    ({"entity": "Osaka"}, "entity 'Osaka' does not occur"),
    ({"hop1_ok": "yes"}, "'hop1_ok' must be true or false"),
    ({"aliases": "Paris"}, "'aliases' must be a list of strings"),
    ({"colour": "red"}, "unknown field 'colour'"),
])
def test_bad_records_name_the_line(tmp_path, change, needle):
    rec = dict(GOOD)
    for k, v in change.items():
        if v is None:
            rec.pop(k)
        else:
            rec[k] = v
    with pytest.raises(MultihopError, match=r"q\.jsonl:2") as e:
        load_jsonl(_write(tmp_path, GOOD, rec))
    assert needle in str(e.value)


def test_missing_file_and_empty_query():
    with pytest.raises(MultihopError, match="does not exist"):
        load_jsonl("/nonexistent/q.jsonl")
    with pytest.raises(MultihopError, match="q7: 'target' is empty"):
        TwoHopQuery(prompt="a", target="", aliases=(), name="q7")


def test_generator_composes_known_facts():
    from patchtrace.multihop.kb import generate

    qs = generate(n_cities=3, relations=("capital",))
    q = next(q for q in qs if q.entity == "Eiffel Tower")
    assert (q.target, q.bridge, q.hop2_prompt) == ("Paris", "France", "The capital of France is")
    assert q.prompt == "The capital of the country where the Eiffel Tower is located is"
    assert sum(q.relation == "capital" for q in qs) == len(qs) and len({q.entity for q in qs}) == len(qs)
    with pytest.raises(MultihopError, match="unknown relation 'mayor'"):
        generate(relations=("mayor",))
