"""Extractive QA on the real SmolLM2: the prompt format answers from the context, generation with
the KV cache matches HF ``generate``, and the patching task is aligned and contrastive."""

from __future__ import annotations

import pytest
import torch

from patchtrace.qa.attnattrib import AttnAttribConfig, attribute
from patchtrace.qa.generation import generate
from patchtrace.qa.items import QAItem
from patchtrace.qa.prompts import render

pytestmark = pytest.mark.smollm2

ITEMS = [
    QAItem(("The capital of Germany is Berlin.", "The capital of Japan is Tokyo.", "The capital of Veldoria is Oslo."),
           "What is the capital of Veldoria?", "The capital of Veldoria is", " Oslo", 2, "nomemory", None, "Veldoria"),
    QAItem(("The capital of Italy is Rome.", "The capital of Spain is Madrid.", "The capital of Egypt is Cairo."),
           "What is the capital of Spain?", "The capital of Spain is", " Madrid", 1, "agree", " Madrid", "Spain"),
]


def test_kv_generation_matches_hf_generate(smollm2):
    ids = render(ITEMS[0], smollm2.tokenizer).ids
    g = generate(smollm2, ids, 4, stop_ids=[smollm2.tokenizer.eos_token_id])  # HF generate stops at EOS too
    with torch.no_grad():
        ref = smollm2.hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert g.tokens == ref[0, len(ids):].tolist()


def test_context_answers_and_attribution_runs(smollm2):
    tok = smollm2.tokenizer
    for it in ITEMS:
        res = attribute(smollm2, it, AttnAttribConfig(((20, 0), (25, 3))))
        assert res.answer_tokens[0] == tok(it.answer, add_special_tokens=False).input_ids[0]
        assert res.sentence_scores.shape == (3,) and float(res.sentence_scores.max()) > 0


def test_patching_task_is_aligned_and_contrastive(smollm2):
    from patchtrace.tasks import make_task

    task = make_task("extractive_qa", n=2, seed=0, model=smollm2)
    assert len(task) >= 1 and task.params["kept"] == len(task)
    tt = task.tokenize(smollm2.tokenizer)  # validates equal lengths and single-token answers
    for i in range(len(tt)):
        ids = torch.tensor([tt.clean[i], tt.corrupt[i]])
        with torch.no_grad():
            lg = smollm2.runner.forward(ids, last_only=True).logits[:, -1]
        a, w = int(tt.answer[i, 0]), int(tt.wrong[i, 0])
        assert lg[0, a] > lg[0, w] and lg[1, w] > lg[1, a]


def test_gated_steering_on_smollm2(smollm2):
    """The default gate leaves a context-copied answer alone (bit-identical), and a forced steer's
    last-token re-run from the first steering layer equals one full forward with the same bias."""
    from patchtrace.models.runner import RunCtx
    from patchtrace.qa.steering import SteeringConfig, steer
    from patchtrace.sites import HookPoint

    it = ITEMS[1]
    heads, sh = ((23, 2),), ((23, 2), (29, 1))
    plain = attribute(smollm2, it, AttnAttribConfig(heads))
    kept = steer(smollm2, it, SteeringConfig(heads, sh, 4.0))
    assert kept.extras["steered"] is False and torch.equal(kept.logits, plain.logits)
    forced = steer(smollm2, it, SteeringConfig(heads, sh, 4.0, gate="always"))
    p = render(it, smollm2.tokenizer)
    s, e = p.sentence_spans[forced.extras["target_sentence"]]
    assert forced.extras["target_sentence"] == plain.top_sentence

    def bias(layer):
        def fn(pat, ctx: RunCtx):
            out = pat.clone()
            add = torch.zeros(pat.shape[-1])
            add[s:e] = 4.0
            for lay, h in sh:
                if lay == layer:
                    out[0, h, -1] = torch.softmax(pat[0, h, -1].clamp_min(1e-30).log() + add, -1)
            return out
        return fn

    with torch.no_grad():
        ref = smollm2.runner.forward(torch.tensor([p.ids]), hooks={HookPoint("pattern", lay): [bias(lay)] for lay in (23, 29)},
                                     last_only=True).logits[0, -1]
    torch.testing.assert_close(forced.logits[0], ref.float(), atol=1e-4, rtol=1e-4)
    assert (forced.logits[0] - plain.logits[0]).abs().max() > 1e-3  # non-vacuous
