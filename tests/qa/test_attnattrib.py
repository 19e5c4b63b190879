"""Generation with a KV cache, attention recording, ATTNATTRIB bookkeeping, the head-selection rule,
the leave-one-out baseline and the HTML view — each against an independent reference (an eager
Hugging Face copy of a tiny random Llama, or arithmetic written here)."""

from __future__ import annotations

import math

import pytest
import torch
from qa_common import ITEM

from conftest import make_tiny
from patchtrace.qa.attnattrib import AttnAttribConfig, attribute, head_entropies, select_heads, sentence_scores
from patchtrace.qa.baselines import leave_one_out
from patchtrace.qa.generation import AttentionRecorder, GenerationError, generate
from patchtrace.qa.html import render_html
from patchtrace.qa.items import QAItem
from patchtrace.qa.prompts import render
from patchtrace.results import Scores


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


def _eager_context_entropies(eager_hf, prompt_ids, spans):
    """Entropy (nats) of every head's last-position attention renormalised over the context tokens,
    from the eager HF copy's ``output_attentions`` (the library's recorder is not used): ``[L, H]``."""
    ctx = torch.zeros(len(prompt_ids), dtype=torch.bool)
    for s, e in spans:
        ctx[s:e] = True
    with torch.no_grad():
        att = eager_hf(torch.tensor([prompt_ids]), output_attentions=True).attentions
    rows = torch.stack([a[0, :, -1, :] for a in att]).double()[:, :, ctx]  # [L, H, C]
    q = rows / rows.sum(-1, keepdim=True)
    return -(q * q.log()).sum(-1)


def test_select_heads_keeps_the_sharpest_candidates_by_an_independent_entropy(tiny, eager_hf, smol_tokenizer):
    """Effects are assigned against the entropy order computed here, so a rule that ranked by effect,
    or looked beyond the top-k candidates, would pick different heads."""
    p = render(ITEM, smol_tokenizer)
    ent = _eager_context_entropies(eager_hf, p.ids, p.sentence_spans)
    H = ent.shape[1]
    order = [(int(i) // H, int(i) % H) for i in torch.argsort(ent.flatten())]
    h0, h1, h2, h3 = order[:4]  # sharpest first
    gaps = [float(ent[b] - ent[a]) for a, b in ((h0, h1), (h1, h2), (h2, h3))]
    assert min(gaps) > 1e-4, gaps  # non-vacuous: the four entropies are distinct
    vals = torch.zeros_like(ent, dtype=torch.float32)
    vals[h3], vals[h2], vals[h1], vals[h0] = 3.0, 2.0, 1.0, 0.5  # the sharpest head is not a top-3 candidate
    sc = Scores(vals, ("layer", "head"), "head")
    chosen, info = select_heads(tiny, sc, [ITEM], k_candidates=3, n_heads=1)
    assert [tuple(c) for c in info["candidates"]] == [h3, h2, h1]
    assert chosen == (h1,)
    torch.testing.assert_close(torch.tensor(info["entropies"]), ent[[h3[0], h2[0], h1[0]], [h3[1], h2[1], h1[1]]].float(),
                               atol=1e-4, rtol=1e-4)
    chosen2, _ = select_heads(tiny, sc, [ITEM], k_candidates=3, n_heads=2)
    assert chosen2 == (h1, h2)
    with pytest.raises(GenerationError, match="layer, head"):
        select_heads(tiny, Scores(vals.flatten(), ("layer",), "mlp_out"), [ITEM])


def test_html_escapes_context(tiny):
    bad = QAItem(("<script>alert(1)</script> is here.", "Fine & dandy."), "Q <b>?</b>", "A", " x", 0)
    res = attribute(tiny, bad, AttnAttribConfig(((0, 0),)))
    page = render_html([(bad, res)], title="<t>")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>?</b>" not in page and "&amp; dandy" in page


def test_entropy_is_finite(tiny):
    p = render(ITEM, tiny.tokenizer)
    ent = head_entropies(tiny, [p], [(0, 0), (2, 3)])
    assert all(0 <= float(e) <= math.log(len(p.ids)) for e in ent)
