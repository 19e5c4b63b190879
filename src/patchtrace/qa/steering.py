"""Steering toward the context with ATTNATTRIB's attribution, gated so it leaves good answers alone.

When the context contradicts memory, a model often answers from memory even though its attribution
heads already point at the sentence that holds the context answer. :func:`steer` feeds that pointer
back into the *same* generation step:

1. **Plain pass.** The prompt runs once, exactly as :func:`~patchtrace.qa.attnattrib.attribute`
   runs it: the attribution heads' attention at the answer query is recorded (ATTNATTRIB), the
   residual stream entering the first steering layer ``L0`` at the last position is kept, and the
   keys/values of every position are cached. This pass *is* the unsteered answer.
2. **Gate** (no gold labels; see :class:`SteeringConfig`): steer only when the unsteered next token
   is not already copied from the context (``gate="not_in_context"``, the default) or from the
   attributed sentence (``"not_in_sentence"``), and when the attribution is confident: the top
   sentence's score beats the runner-up by a relative margin ``(s1 - s2) / s1 >= min_margin``.
   A model that already answers from the context is never pushed anywhere — that is what keeps
   agreeing contexts (and correct context answers) intact.
3. **Steered re-run, from ``L0`` only.** Steering only touches the answer query's attention row, so
   nothing below ``L0`` and no earlier position changes: the last position alone is re-run through
   layers ``L0 .. N-1`` against the cached keys/values, with the steering heads' attention logits on
   the attributed sentence's tokens raised by ``strength``. Adding ``b`` to logits is done exactly on
   the probabilities: ``p'_j = p_j · e^{b·[j ∈ S]} / Σ_k p_k · e^{b·[k ∈ S]}``. This costs one token
   through ``N - L0`` layers, a few percent of the plain pass; the tests check it against the
   single full forward with the same bias.

Later tokens (``max_new_tokens > 1``) keep the first step's decision and target sentence.

This differs from the paper's steering (Basu et al. 2025: put the attributed sentence back into the
prompt and answer again, a second generation); it costs no extra full pass. ``strength = 0`` or a
closed gate returns the plain pass, bit-identical to an unsteered :func:`attribute`.

Example:
    The model already copies this item's context answer, so the default gate leaves it alone;
    ``gate="always"`` steers anyway:

    >>> from dataclasses import replace
    >>> from patchtrace import load_model
    >>> from patchtrace.qa.generators import make_qa_items
    >>> m = load_model()
    >>> item = make_qa_items("conflict", 1, tokenizer=m.tokenizer)[0]
    >>> cfg = SteeringConfig(attrib_heads=((23, 2),), steer_heads=((23, 2), (29, 1)), strength=4.0)
    >>> res = steer(m, item, cfg)
    >>> res.answer_text, res.extras["steered"]
    (' Hamburg', False)
    >>> steer(m, item, replace(cfg, gate="always")).extras["steered"]
    True
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from patchtrace.engine.apply import intervention_hook
from patchtrace.interventions import Intervention, LogitBias
from patchtrace.models.load import Model
from patchtrace.models.runner import RunCtx
from patchtrace.qa.attnattrib import Agg, Attribution, context_mask, finish, sentence_scores
from patchtrace.qa.generation import AttentionRecorder, Generation, GenerationError, Head, HookFn, check_heads
from patchtrace.qa.items import QAItem
from patchtrace.qa.prompts import Fmt, QAPrompt, render
from patchtrace.sites import HookPoint, Site

Gate = Literal["always", "not_in_context", "not_in_sentence"]
GATES: tuple[str, ...] = ("always", "not_in_context", "not_in_sentence")


@dataclass(frozen=True)
class SteeringConfig:
    """Settings of attribution-guided steering.

    Attributes:
        attrib_heads: the ATTNATTRIB heads that pick the sentence (their attention is averaged).
        steer_heads: heads whose attention is boosted toward it.
        strength: logit bias added on the attributed sentence's tokens (0 = off).
        agg: sentence aggregate for the attribution.
        max_new_tokens: tokens to generate.
        fmt: prompt format.
        gate: when to steer: ``always``; ``not_in_context`` (default) — only if the unsteered next
            token does not occur among the context tokens; ``not_in_sentence`` — only if it does
            not occur in the attributed sentence.
        min_margin: steer only if the attribution's relative margin ``(s1 - s2) / s1`` (top vs
            second sentence score) is at least this (0 = no margin gate).

    The default gate is the cautious one. With a good attribution the margin gate alone can be
    enough: on SmolLM2, ``benchmarks/qa.py`` picks ``gate="always", min_margin=0.5, strength=4``
    on its dev split (attribution heads L18.H6 + L23.H2); see BENCHMARKS.md.
    """

    attrib_heads: tuple[Head, ...]
    steer_heads: tuple[Head, ...]
    strength: float = 4.0
    agg: Agg = "max"
    max_new_tokens: int = 1
    fmt: Fmt = "chat"
    gate: Gate = "not_in_context"
    min_margin: float = 0.0


def bias_interventions(steer_heads: Sequence[Head], target: Tensor, strength: float) -> list[Intervention]:
    """The steering as interventions: ``strength`` added to ``steer_heads``' attention logits on
    ``target`` at the last query position (``pos=-1``: the newest token of every call, so it keeps
    steering while the answer is generated).

    Args:
        steer_heads: ``(layer, head)`` pairs.
        target: ``[P]`` boolean mask over the first ``P`` key positions (the prompt); keys beyond
            ``P`` (generated tokens) are never boosted.
        strength: the logit bias.
    """
    bias = target.float() * strength
    return [Intervention(Site("pattern", layer, h, -1), LogitBias(bias)) for layer, h in steer_heads]


def bias_hooks(steer_heads: Sequence[Head], target: Tensor, strength: float) -> dict[HookPoint, list[HookFn]]:
    """Runner hooks applying :func:`bias_interventions` (one per steered layer)."""
    by_point: dict[HookPoint, list[tuple[int, Intervention]]] = {}
    for iv in bias_interventions(steer_heads, target, strength):
        by_point.setdefault(iv.target.point, []).append((0, iv))
    return {hp: [intervention_hook(hp, ents, {}, 1, n_patches=1)] for hp, ents in by_point.items()}


def relative_margin(scores: Tensor) -> float:
    """``(s1 - s2) / s1`` of the two largest sentence scores (1 for a single sentence, 0 if ``s1 <= 0``)."""
    if scores.numel() < 2:
        return 1.0
    top = torch.topk(scores.float(), 2).values
    s1, s2 = float(top[0]), float(top[1])
    return 0.0 if s1 <= 0 else (s1 - s2) / s1


def gate_open(config: SteeringConfig, token: int, prompt: QAPrompt, top_sentence: int, margin: float) -> bool:
    """Whether :func:`steer` steers, given the unsteered next ``token`` and the attribution."""
    if config.strength == 0 or margin < config.min_margin:
        return False
    if config.gate == "always":
        return True
    if config.gate == "not_in_context":
        pool = {t for t, s in zip(prompt.ids, prompt.token_sentence, strict=True) if s >= 0}
    elif config.gate == "not_in_sentence":
        s, e = prompt.sentence_spans[top_sentence]
        pool = set(prompt.ids[s:e])
    else:
        raise GenerationError(f"unknown steering gate {config.gate!r}; use one of {', '.join(GATES)}")
    return token not in pool


def _cat_kv(past: list[tuple[Tensor, Tensor]], new: Sequence[tuple[Tensor, Tensor] | None]) -> list[tuple[Tensor, Tensor]]:
    out = []
    for (pk, pv), kv in zip(past, new, strict=True):
        assert kv is not None
        out.append((torch.cat((pk, kv[0]), dim=2), torch.cat((pv, kv[1]), dim=2)))
    return out


def steer(model: Model, item: QAItem, config: SteeringConfig) -> Attribution:
    """Generate with gated steering; returns the answer and the ATTNATTRIB attribution of the plain pass.

    ``extras`` holds ``steered`` (whether the gate opened), ``margin``, ``unsteered_token`` and
    ``unsteered_text`` (the plain pass's first answer token: the answer *before* steering) and
    ``target_sentence``.

    Raises:
        GenerationError: no attribution or steering heads, a head out of range, an unknown gate,
            or ``max_new_tokens < 1``.
    """
    if not config.attrib_heads:
        raise GenerationError("steering needs at least one attribution head")
    if not config.steer_heads:
        raise GenerationError("steering needs at least one steering head")
    if config.gate not in GATES:
        raise GenerationError(f"unknown steering gate {config.gate!r}; use one of {', '.join(GATES)}")
    if config.max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1 (got {config.max_new_tokens})")
    check_heads(model, config.attrib_heads)
    check_heads(model, config.steer_heads)
    t0 = time.perf_counter()
    prompt = render(item, model.tokenizer, config.fmt)
    T = len(prompt.ids)
    L0 = min(layer for layer, _ in config.steer_heads)
    rec = AttentionRecorder(list(config.attrib_heads), T)
    kept: dict[str, Tensor] = {}

    def keep_resid(x: Tensor, ctx: RunCtx) -> None:
        kept["h"] = x[:, -1:].detach().clone()

    hooks: dict[HookPoint, list[HookFn]] = {HookPoint("pattern", layer): [rec.hook(layer)] for layer in rec.layers()}
    hooks.setdefault(HookPoint("resid_pre", L0), []).append(keep_resid)
    ids = torch.tensor([prompt.ids], device=model.device)
    with torch.no_grad():
        rec.begin_step()
        out = model.runner.forward(ids, hooks=hooks, keep_kv=True, last_only=True)
        rec.end_step()
        assert out.logits is not None and out.kv is not None
        lg = out.logits[0, -1]
        plain_tok = int(lg.argmax())
        row = rec.steps[0].mean(0)
        cmask = context_mask(prompt)
        ss = sentence_scores(torch.where(cmask, row.cpu(), torch.zeros(())), prompt.sentence_spans, config.agg)
        top = int(torch.argsort(ss, descending=True, stable=True)[0])
        margin = relative_margin(ss)
        on = gate_open(config, plain_tok, prompt, top, margin)
        past = [kv for kv in out.kv if kv is not None]
        steer_h: dict[HookPoint, list[HookFn]] = {}
        if on:
            steer_h = bias_hooks(config.steer_heads, prompt.token_mask(top, T), config.strength)
            prefix = [(k[:, :, : T - 1], v[:, :, : T - 1]) for k, v in past]
            out2 = model.runner.forward(
                resid=kept["h"], start_layer=L0, pos_offset=T - 1, past_kv=prefix, hooks=steer_h, keep_kv=True, last_only=True,
            )
            assert out2.logits is not None and out2.kv is not None
            lg = out2.logits[0, -1]
            new = out2.kv
            past = [kv if li < L0 else _cat_kv([prefix[li]], [new[li]])[0] for li, kv in enumerate(past)]
        tokens, logits = [int(lg.argmax())], [lg.float()]
        pos = T
        while len(tokens) < config.max_new_tokens:
            cur = torch.tensor([[tokens[-1]]], device=model.device)
            o = model.runner.forward(cur, pos_offset=pos, past_kv=past, hooks=steer_h, keep_kv=True, last_only=True)
            assert o.logits is not None and o.kv is not None
            past = _cat_kv(past, o.kv)
            pos += 1
            tokens.append(int(o.logits[0, -1].argmax()))
            logits.append(o.logits[0, -1].float())
    gen = Generation(tokens, torch.stack(logits), rec.steps[0][None])
    res = finish(prompt, row, config.agg, 2, "steered" if on else "attnattrib", gen, model.tokenizer, t0)
    res.extras.update({"steered": on, "margin": margin, "unsteered_token": plain_tok,
                       "unsteered_text": model.tokenizer.decode([plain_tok]), "target_sentence": top})
    return res
