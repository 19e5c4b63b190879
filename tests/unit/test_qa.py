"""Extractive QA: generation with KV cache, attention recording, ATTNATTRIB bookkeeping, baselines,
steering and the HTML view — each against an independent reference on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny
from patchtrace.apply.attnattrib import AttnAttribConfig, attribute, head_entropies, select_heads, sentence_scores
from patchtrace.apply.baselines import leave_one_out
from patchtrace.apply.generation import AttentionRecorder, GenerationError, generate
from patchtrace.apply.steering import SteeringConfig, boost, gate_open, relative_margin, steer
from patchtrace.report.qa_html import render_html
from patchtrace.results import Scores
from patchtrace.tasks.base import TaskError
from patchtrace.tasks.extractive_qa import (
    QAItem,
    load_qa_jsonl,
    make_qa_items,
    render,
    same_length_distractor,
    save_qa_jsonl,
)


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    return make_tiny("llama", seed=1, tokenizer=smol_tokenizer)


@pytest.fixture(scope="module")
def eager_hf(tiny):
    """An independent HF copy of the tiny model with eager attention (so it returns attentions)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(tiny.hf.config, attn_implementation="eager").eval()
    hf.load_state_dict(tiny.hf.state_dict())
    return hf


ITEM = QAItem(
    ("The capital of Spain is Madrid.", "The capital of France is Lyon.", "The capital of Japan is Tokyo."),
    "What is the capital of France?", "The capital of France is", " Lyon", 1, "conflict", " Paris", "France",
)


def test_generation_kv_cache_matches_repeated_full_hf_forwards(tiny, eager_hf, smol_tokenizer):
    ids = render(ITEM, smol_tokenizer).ids
    g = generate(tiny, ids, 4)
    seq = list(ids)
    for step in range(4):
        with torch.no_grad():
            ref = eager_hf(torch.tensor([seq])).logits[0, -1]
        assert g.tokens[step] == int(ref.argmax())
        torch.testing.assert_close(g.logits[step], ref.float(), atol=1e-4, rtol=1e-4)
        seq.append(int(ref.argmax()))


def test_recorded_attention_equals_eager_hf_attentions(tiny, eager_hf, smol_tokenizer):
    ids = render(ITEM, smol_tokenizer).ids
    heads = [(0, 1), (2, 3), (2, 0)]
    rec = AttentionRecorder(heads, len(ids))
    g = generate(tiny, ids, 3, recorder=rec)
    assert g.attention is not None and g.attention.shape == (3, 3, len(ids))
    full = torch.tensor([list(ids) + g.tokens[:-1]])
    with torch.no_grad():
        att = eager_hf(full, output_attentions=True).attentions
    for step in range(3):
        q = len(ids) - 1 + step
        for i, (layer, h) in enumerate(heads):
            torch.testing.assert_close(g.attention[step, i], att[layer][0, h, q, : len(ids)].float(), atol=1e-5, rtol=1e-4)
    # non-vacuous: the heads do not all attend identically
    assert (g.attention[0, 0] - g.attention[0, 1]).abs().max() > 1e-3


def test_generation_bad_input(tiny):
    with pytest.raises(GenerationError, match="empty"):
        generate(tiny, [], 1)
    with pytest.raises(GenerationError, match=r"head \(7, 0\) does not exist"):
        generate(tiny, [1, 2, 3], 1, recorder=AttentionRecorder([(7, 0)], 3))


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


def test_sentence_scores_aggregates():
    ts = torch.tensor([0.0, 0.5, 0.1, 0.2, 0.3, 0.0])
    spans = [(1, 3), (3, 5)]
    assert sentence_scores(ts, spans, "max").tolist() == pytest.approx([0.5, 0.3])
    assert sentence_scores(ts, spans, "sum").tolist() == pytest.approx([0.6, 0.5])
    with pytest.raises(GenerationError, match="sentence 0"):
        sentence_scores(ts, [(3, 3)], "max")


def test_attnattrib_uses_recorded_heads(tiny, smol_tokenizer):
    heads = ((1, 2),)
    res = attribute(tiny, ITEM, AttnAttribConfig(heads))
    p = render(ITEM, smol_tokenizer)
    rec = AttentionRecorder(list(heads), len(p.ids))
    generate(tiny, p.ids, 1, recorder=rec)
    row = rec.steps[0][0]
    want = [float(row[s:e].max()) for s, e in p.sentence_spans]
    assert res.sentence_scores.tolist() == pytest.approx(want)
    assert res.ranking[0] == max(range(3), key=lambda i: want[i])
    with pytest.raises(GenerationError, match="at least one head"):
        attribute(tiny, ITEM, AttnAttribConfig(()))


def test_leave_one_out_by_hand(tiny, eager_hf, smol_tokenizer):
    res = leave_one_out(tiny, ITEM)

    def prompt(sents):
        user = ("Context: " + " ".join(sents) + "\n" if sents else "") + f"Question: {ITEM.question}"
        msgs = [{"role": "system", "content": "Answer the question using only the context."}, {"role": "user", "content": user}]
        return smol_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + ITEM.prefix

    def logp(text):
        ids = torch.tensor([smol_tokenizer(text).input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(eager_hf(ids).logits[0, -1].float(), -1)
        return lp

    full = logp(prompt(ITEM.sentences))
    a = int(full.argmax())
    assert res.answer_tokens == [a]
    want = []
    for i in range(3):
        rest = [s for j, s in enumerate(ITEM.sentences) if j != i]
        want.append(float(full[a] - logp(prompt(rest))[a]))
    assert res.sentence_scores.tolist() == pytest.approx(want, abs=1e-4)
    assert max(abs(w) for w in want) > 1e-4  # non-vacuous


def test_select_heads_rule(tiny, smol_tokenizer):
    vals = torch.zeros(3, 4)
    vals[2, 1], vals[0, 3], vals[1, 0] = 3.0, 2.0, 1.0
    sc = Scores(vals, ("layer", "head"), "head")
    probe = [ITEM]
    chosen, info = select_heads(tiny, sc, probe, k_candidates=3, n_heads=1)
    cands = [(2, 1), (0, 3), (1, 0)]
    assert [tuple(c) for c in info["candidates"]] == cands
    # independent entropy: recompute from eager attention of the prompt
    p = render(ITEM, smol_tokenizer)
    ent = head_entropies(tiny, [p], cands)
    assert chosen == (cands[int(ent.argmin())],)
    with pytest.raises(GenerationError, match="layer, head"):
        select_heads(tiny, Scores(vals.flatten(), ("layer",), "mlp_out"), probe)


def test_boost_equals_adding_to_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 7)
    mask = torch.tensor([False, True, True, False, False, False, True])
    got = boost(torch.softmax(logits, -1), mask, 3.0)
    want = torch.softmax(logits + 3.0 * mask.float(), -1)
    torch.testing.assert_close(got, want)


def test_steering_off_is_bit_identical_and_on_changes_logits(tiny):
    heads = ((1, 2),)
    base = attribute(tiny, ITEM, AttnAttribConfig(heads, max_new_tokens=2))
    off = steer(tiny, ITEM, SteeringConfig(heads, ((2, 0), (2, 3)), strength=0.0, max_new_tokens=2))
    assert base.logits is not None and off.logits is not None
    assert torch.equal(base.logits, off.logits)
    # a gate that never opens (margin above 1) is the plain run too
    shut = steer(tiny, ITEM, SteeringConfig(heads, ((2, 0), (2, 3)), strength=5.0, max_new_tokens=2, gate="always", min_margin=1.01))
    assert shut.extras["steered"] is False and shut.logits is not None
    assert torch.equal(base.logits, shut.logits)
    on = steer(tiny, ITEM, SteeringConfig(heads, ((2, 0), (2, 3)), strength=5.0, max_new_tokens=2, gate="always"))
    assert on.extras["steered"] is True
    assert on.logits is not None
    assert (on.logits[0] - base.logits[0]).abs().max() > 1e-4
    # the attribution itself is read before steering acts (recorder runs first)
    torch.testing.assert_close(on.sentence_scores, base.sentence_scores)


def test_html_escapes_context(tiny):
    bad = QAItem(("<script>alert(1)</script> is here.", "Fine & dandy."), "Q <b>?</b>", "A", " x", 0)
    res = attribute(tiny, bad, AttnAttribConfig(((0, 0),)))
    page = render_html([(bad, res)], title="<t>")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>?</b>" not in page and "&amp; dandy" in page


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


def test_entropy_is_finite(tiny):
    p = render(ITEM, tiny.tokenizer)
    ent = head_entropies(tiny, [p], [(0, 0), (2, 3)])
    assert all(0 <= float(e) <= math.log(len(p.ids)) for e in ent)


def test_cli_parse_heads():
    from patchtrace.cli.attribute import parse_heads
    from patchtrace.cli.common import CLIError

    assert parse_heads("23.2, 29.1") == ((23, 2), (29, 1))
    with pytest.raises(CLIError, match=r"'2x' is not 'layer\.head'"):
        parse_heads("2x")


def _reference_steered_tokens(model, prompt_ids, attrib_head, steer_heads, strength, n_new):
    """Naive reference: pick the sentence from the plain run's recorded attention, then for every step
    run the WHOLE sequence with the attention logits of ``steer_heads`` raised by ``strength`` on that
    sentence for every query row from the last prompt position on."""
    from patchtrace.models.runner import RunCtx
    from patchtrace.sites import HookPoint

    p = render(ITEM, model.tokenizer)
    T = len(prompt_ids)
    seen = {}

    def rec(pat, ctx: RunCtx):
        seen["row"] = pat[0, attrib_head[1], -1, :T].clone()

    with torch.no_grad():
        model.runner.forward(torch.tensor([prompt_ids]), hooks={HookPoint("pattern", attrib_head[0]): [rec]})
    best = max(range(len(p.sentence_spans)), key=lambda i: float(seen["row"][slice(*p.sentence_spans[i])].max()))
    s, e = p.sentence_spans[best]
    seq, logits = list(prompt_ids), []
    for _ in range(n_new):
        def bias(pat, ctx: RunCtx, layer=None):
            lg = pat.clamp_min(1e-30).log()
            add = torch.zeros(pat.shape[-1])
            add[s:e] = strength
            out = pat.clone()
            for lay, h in steer_heads:
                if lay == layer:
                    out[0, h, T - 1 :] = torch.softmax(lg[0, h, T - 1 :] + add, -1)
            return out

        hooks = {HookPoint("pattern", lay): [lambda pat, ctx, lay=lay: bias(pat, ctx, lay)] for lay, _ in steer_heads}
        with torch.no_grad():
            lg = model.runner.forward(torch.tensor([seq]), hooks=hooks).logits[0, -1]
        logits.append(lg)
        seq.append(int(lg.argmax()))
    return best, seq[T:], torch.stack(logits)


def test_steered_resume_equals_full_forward_with_bias(tiny):
    heads, sh = ((1, 2),), ((1, 0), (2, 3))
    ids = render(ITEM, tiny.tokenizer).ids
    best, toks, ref = _reference_steered_tokens(tiny, ids, heads[0], sh, 6.0, 3)
    got = steer(tiny, ITEM, SteeringConfig(heads, sh, 6.0, max_new_tokens=3, gate="always"))
    assert got.extras["target_sentence"] == best and got.extras["steered"]
    assert got.answer_tokens == toks
    torch.testing.assert_close(got.logits, ref.float(), atol=1e-4, rtol=1e-4)
    plain = attribute(tiny, ITEM, AttnAttribConfig(heads, max_new_tokens=1))
    assert (plain.logits[0] - got.logits[0]).abs().max() > 1e-3  # non-vacuous: steering moved the logits


def test_gate_rules(smol_tokenizer):
    p = render(ITEM, smol_tokenizer)
    lyon = smol_tokenizer(" Lyon", add_special_tokens=False).input_ids[0]
    paris = smol_tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    heads = ((0, 0),)

    def cfg(**kw):
        return SteeringConfig(heads, heads, **{"strength": 4.0, **kw})

    # " Lyon" is copied from sentence 1; " Paris" occurs nowhere in the context
    assert not gate_open(cfg(gate="not_in_context"), lyon, p, 0, 0.9)
    assert gate_open(cfg(gate="not_in_context"), paris, p, 1, 0.9)
    assert not gate_open(cfg(gate="not_in_sentence"), lyon, p, 1, 0.9)
    assert gate_open(cfg(gate="not_in_sentence"), lyon, p, 0, 0.9)
    assert gate_open(cfg(gate="always"), lyon, p, 1, 0.9)
    assert not gate_open(cfg(gate="always", min_margin=0.5), paris, p, 1, 0.4)
    assert not gate_open(cfg(gate="always", strength=0.0), paris, p, 1, 0.9)
    assert relative_margin(torch.tensor([0.2, 0.8, 0.6])) == pytest.approx(0.25)
    with pytest.raises(GenerationError, match="unknown steering gate"):
        gate_open(cfg(gate="sometimes"), paris, p, 1, 0.9)


def test_cli_rejects_unknown_gate_before_loading():
    from typer.testing import CliRunner

    from patchtrace.cli import build_app

    res = CliRunner().invoke(build_app(), ["attribute", "--heads", "1.2", "--steer", "4", "--gate", "sometimes",
                                           "--model", "/nonexistent/model"])
    assert res.exit_code != 0
    assert "--gate 'sometimes'" in res.output and "not_in_context" in res.output


def test_cli_attribute_with_circuit_and_steering(tmp_path, tiny, smol_tokenizer):
    """End to end on a saved tiny model: heads chosen from a saved circuit, gated steering, JSONL out."""
    from typer.testing import CliRunner

    from patchtrace.apply.steering import SteeringConfig as SC
    from patchtrace.cli import build_app

    mdir = tmp_path / "tiny"
    tiny.hf.save_pretrained(mdir, safe_serialization=True)
    smol_tokenizer.save_pretrained(mdir)
    L, H = tiny.dims.n_layers, tiny.dims.n_heads
    vals = torch.zeros(L, H)
    vals[L - 1, 1], vals[1, 0] = 2.0, 1.0
    Scores(vals, ("layer", "head"), "head").save(tmp_path / "circ")
    out = tmp_path / "attr"
    res = CliRunner().invoke(build_app(), [
        "attribute", "--model", str(mdir), "--circuit", str(tmp_path / "circ"), "--k-candidates", "2", "--n-heads", "2",
        "--kind", "conflict", "--n", "2", "--steer", "3", "--gate", "always", "--out", str(out)])
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "attributions.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["steered"] for r in recs)
    assert sorted(map(tuple, recs[0]["heads"])) == [(1, 0), (L - 1, 1)]
    # the CLI's answer is the library's steered answer
    it = make_qa_items("conflict", 2, 0, smol_tokenizer)[0]
    lib = steer(tiny, it, SC(((L - 1, 1), (1, 0)), ((L - 1, 1), (1, 0)), 3.0, gate="always"))
    assert recs[0]["answer"] == lib.answer_text
