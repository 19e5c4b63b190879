"""Gated attention steering: the bias equals adding to the attention logits, the gate rules, the
last-token re-run from the first steering layer against a full forward with the same bias (written
here), and the ``attribute`` command end to end."""

from __future__ import annotations

import json

import pytest
import torch
from qa_common import ITEM

from conftest import make_tiny
from patchtrace.qa.attnattrib import AttnAttribConfig, attribute
from patchtrace.qa.generation import GenerationError
from patchtrace.qa.generators import make_qa_items
from patchtrace.qa.prompts import render
from patchtrace.qa.steering import SteeringConfig, gate_open, relative_margin, steer
from patchtrace.results import Scores


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    return make_tiny("llama", seed=1, tokenizer=smol_tokenizer)


def test_logit_bias_equals_adding_to_logits():
    """The steering intervention on probabilities equals a softmax of biased logits (keys past the
    bias's length get no bias, as generated tokens do)."""
    from patchtrace.engine.apply import new_value
    from patchtrace.interventions import Intervention, LogitBias
    from patchtrace.sites import Site

    torch.manual_seed(0)
    logits = torch.randn(2, 9)
    mask = torch.tensor([False, True, True, False, False, False, True])  # 7 prompt keys of 9
    iv = Intervention(Site("pattern", 0, 1, -1), LogitBias(3.0 * mask.float()))
    got = new_value(iv, torch.softmax(logits, -1), None)
    want = torch.softmax(logits + 3.0 * torch.cat([mask.float(), torch.zeros(2)]), -1)
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


def test_cli_parse_heads():
    from patchtrace.cli.attribute import parse_heads
    from patchtrace.cli.common import CLIError

    assert parse_heads("23.2, 29.1") == ((23, 2), (29, 1))
    with pytest.raises(CLIError, match=r"'2x' is not 'layer\.head'"):
        parse_heads("2x")


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
    lib = steer(tiny, it, SteeringConfig(((L - 1, 1), (1, 0)), ((L - 1, 1), (1, 0)), 3.0, gate="always"))
    assert recs[0]["answer"] == lib.answer_text
