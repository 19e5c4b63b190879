"""Baselines for sentence attribution, to compare ATTNATTRIB against.

* :func:`leave_one_out` — exact: the drop in the answer's log-probability when each context
  sentence is deleted from the prompt; ``S`` extra forward passes over the generation (the full
  context's log-probability is read off the generation's own logits).
* :func:`grad_x_input` — gradient of the answer log-probability with respect to the input
  embeddings, dotted with the embeddings, summed per sentence; one forward + backward.
* :func:`mean_attention` — ATTNATTRIB's recipe with *every* head of every layer averaged.
* :func:`random_heads` — ATTNATTRIB's recipe with randomly chosen heads (seeded).

All return an :class:`~patchtrace.qa.attnattrib.Attribution` whose ``seconds`` covers the whole
call including generating the answer, so times are comparable with :func:`attribute`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from patchtrace.models.load import Model
from patchtrace.models.runner import RunCtx
from patchtrace.qa.attnattrib import AttnAttribConfig, Attribution, attribute, finish
from patchtrace.qa.generation import generate
from patchtrace.qa.items import QAItem
from patchtrace.qa.prompts import Fmt, render
from patchtrace.sites import HookPoint


def answer_logprob(model: Model, prompt_ids: Sequence[int], answer: Sequence[int]) -> float:
    """Sum of log-probabilities of ``answer`` tokens after ``prompt_ids`` (teacher forced; one pass)."""
    ids = torch.tensor([list(prompt_ids) + list(answer[:-1])], device=model.device)
    with torch.no_grad():
        lg = model.runner.forward(ids).logits
    assert lg is not None
    lp = torch.log_softmax(lg[0, len(prompt_ids) - 1 :].float(), -1)
    return float(sum(lp[i, a] for i, a in enumerate(answer)))


def leave_one_out(model: Model, item: QAItem, *, max_new_tokens: int = 1, fmt: Fmt = "chat") -> Attribution:
    """Sentence ``i`` scores ``log p(answer | context) − log p(answer | context without i)``."""
    t0 = time.perf_counter()
    tok = model.tokenizer
    prompt = render(item, tok, fmt)
    gen = generate(model, prompt.ids, max_new_tokens)
    # the generation's own logits are the teacher-forced ones of its tokens: no extra pass for the full context
    full = float(sum(torch.log_softmax(gen.logits[i], -1)[a] for i, a in enumerate(gen.tokens)))
    scores = []
    for i in range(len(item.sentences)):
        ids = render(item, tok, fmt, sentences=item.without_sentence(i)).ids
        scores.append(full - answer_logprob(model, ids, gen.tokens))
    ss = torch.tensor(scores)
    tok_scores = torch.zeros(len(prompt.ids))
    for i, (s, e) in enumerate(prompt.sentence_spans):
        tok_scores[s:e] = ss[i]
    res = finish(prompt, tok_scores, "max", 0, "leave_one_out", gen, tok, t0)
    res.seconds = time.perf_counter() - t0
    return res


def grad_x_input(model: Model, item: QAItem, *, max_new_tokens: int = 1, fmt: Fmt = "chat") -> Attribution:
    """Gradient × input on the token embeddings, summed over dimensions and over each sentence."""
    t0 = time.perf_counter()
    tok = model.tokenizer
    prompt = render(item, tok, fmt)
    gen = generate(model, prompt.ids, max_new_tokens)
    ids = torch.tensor([prompt.ids + gen.tokens[:-1]], device=model.device)
    held: dict[str, Tensor] = {}

    def leaf(x: Tensor, ctx: RunCtx) -> Tensor:
        e = x.detach().requires_grad_(True)
        held["e"] = e
        return e

    with torch.enable_grad():
        lg = model.runner.forward(ids, hooks={HookPoint("embed", None): [leaf]}).logits
        assert lg is not None
        lp = torch.log_softmax(lg[0, len(prompt.ids) - 1 :].float(), -1)
        target = sum(lp[i, a] for i, a in enumerate(gen.tokens))
        (g,) = torch.autograd.grad(target, held["e"])  # type: ignore[arg-type]
    tok_scores = (g * held["e"]).sum(-1)[0, : len(prompt.ids)].detach()
    return finish(prompt, tok_scores, "sum", 2, "grad_x_input", gen, tok, t0)


def mean_attention(model: Model, item: QAItem, *, max_new_tokens: int = 1, agg: str = "max", fmt: Fmt = "chat") -> Attribution:
    """ATTNATTRIB with all heads of all layers averaged."""
    d = model.dims
    heads = tuple((layer, h) for layer in range(d.n_layers) for h in range(d.n_heads))
    res = attribute(model, item, AttnAttribConfig(heads, agg=agg, max_new_tokens=max_new_tokens, fmt=fmt))  # type: ignore[arg-type]
    res.method = "mean_attention"
    return res


def random_heads(model: Model, item: QAItem, n_heads: int, seed: int, *, max_new_tokens: int = 1, agg: str = "max", fmt: Fmt = "chat") -> Attribution:
    """ATTNATTRIB with ``n_heads`` heads drawn uniformly at random (``random.Random(seed)``)."""
    d = model.dims
    rng = random.Random(seed)
    pool = [(layer, h) for layer in range(d.n_layers) for h in range(d.n_heads)]
    heads = tuple(rng.sample(pool, n_heads))
    res = attribute(model, item, AttnAttribConfig(heads, agg=agg, max_new_tokens=max_new_tokens, fmt=fmt))  # type: ignore[arg-type]
    res.method = "random_heads"
    res.extras["heads"] = [list(h) for h in heads]
    return res
