"""Steering toward the context with ATTNATTRIB's attribution, inside the same forward pass.

When the context contradicts memory, a model often answers from memory even though its attribution
heads already point at the sentence that holds the context answer. Here that pointer is fed back
as an extra signal *in the same forward*: as soon as the attribution heads' layer has run, the
attributed sentence is known; the ``pattern`` hooks of the chosen *steering heads* (at that layer,
run after the recorder, or later layers) then add ``strength`` to their attention logits on that
sentence's tokens for the query that predicts the next token. Adding ``b`` to logits is done
exactly on the probabilities: ``p'_j = p_j · e^{b·[j ∈ S]} / Σ_k p_k · e^{b·[k ∈ S]}``.

A steering head in an *earlier* layer than the attribution heads cannot see this step's
attribution; it uses the previous step's (and does nothing on the first step). Query rows other
than the last are left alone, so the cached keys/values of the prompt are those of the plain run.

This differs from the paper's steering (methods.md §6: put the attributed sentence back into the
prompt and answer again, i.e. a second generation); it costs no extra pass. ``strength = 0``
installs no hook at all, so the run is bit-identical to an unsteered one.

Example:
    >>> cfg = SteeringConfig(attrib_heads=((21, 4),), steer_heads=((21, 4), (25, 1)), strength=4.0)  # doctest: +SKIP
    >>> res = steer(model, item, cfg)                                                               # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patchtrace.apply.attnattrib import AttnAttribConfig, Attribution, attribute, context_mask, sentence_scores
from patchtrace.apply.generation import AttentionRecorder, GenerationError, Head, HookFn
from patchtrace.models.load import Model
from patchtrace.models.runner import RunCtx
from patchtrace.sites import HookPoint
from patchtrace.tasks.extractive_qa import Fmt, QAItem, QAPrompt, render


@dataclass(frozen=True)
class SteeringConfig:
    """Settings of attribution-guided steering.

    Attributes:
        attrib_heads: the ATTNATTRIB heads that pick the sentence.
        steer_heads: heads whose attention is boosted toward it.
        strength: logit bias added on the attributed sentence's tokens (0 = off).
        agg: sentence aggregate for the attribution.
        max_new_tokens: tokens to generate.
        fmt: prompt format.
    """

    attrib_heads: tuple[Head, ...]
    steer_heads: tuple[Head, ...]
    strength: float = 4.0
    agg: str = "max"
    max_new_tokens: int = 1
    fmt: Fmt = "chat"


def boost(row: Tensor, mask: Tensor, strength: float) -> Tensor:
    """Attention row(s) ``[..., P]`` re-weighted as if ``strength`` were added to the logits on ``mask``."""
    w = torch.where(mask, torch.full_like(row, math.exp(strength)), torch.ones_like(row))
    out = row * w
    return out / out.sum(-1, keepdim=True)


def steering_hooks(prompt: QAPrompt, config: SteeringConfig):  # type: ignore[no-untyped-def]
    """A hook factory for :func:`patchtrace.apply.generation.generate` (needs a recorder of the attribution heads)."""
    cmask = context_mask(prompt)
    P = len(prompt.ids)

    def factory(recorder: AttentionRecorder | None) -> dict[HookPoint, list[HookFn]]:
        if config.strength == 0:
            return {}
        if recorder is None:
            raise GenerationError("steering needs the attribution heads' recorder")
        by_layer: dict[int, list[int]] = {}
        for layer, h in config.steer_heads:
            by_layer.setdefault(layer, []).append(h)

        def target() -> Tensor | None:
            row = recorder.current_mean()
            if row is None:
                if not recorder.steps:
                    return None
                row = recorder.steps[-1].mean(0)
            ss = sentence_scores(torch.where(cmask, row.cpu(), torch.zeros(())), prompt.sentence_spans, config.agg)  # type: ignore[arg-type]
            return prompt.token_mask(int(ss.argmax()), P)

        def make(heads: list[int]) -> HookFn:
            def fn(pattern: Tensor, ctx: RunCtx) -> Tensor | None:
                m = target()
                if m is None:
                    return None
                full = torch.zeros(pattern.shape[-1], dtype=torch.bool, device=pattern.device)
                full[:P] = m.to(pattern.device)
                out = pattern.clone()
                for h in heads:
                    out[:, h, -1] = boost(pattern[:, h, -1].float(), full, config.strength).to(pattern.dtype)
                return out

            return fn

        return {HookPoint("pattern", layer): [make(hs)] for layer, hs in by_layer.items()}

    return factory


def steer(model: Model, item: QAItem, config: SteeringConfig) -> Attribution:
    """Generate with steering; returns the (steered) answer and the attribution recorded on the way.

    Raises:
        GenerationError: no attribution heads.
    """
    prompt = render(item, model.tokenizer, config.fmt)
    acfg = AttnAttribConfig(config.attrib_heads, agg=config.agg, max_new_tokens=config.max_new_tokens, fmt=config.fmt)  # type: ignore[arg-type]
    res = attribute(model, item, acfg, extra_hooks=steering_hooks(prompt, config))
    res.method = "steered" if config.strength else "attnattrib"
    return res


def context_faithful_rate(results: Sequence[Attribution], items: Sequence[QAItem], tokenizer: object) -> float:
    """Fraction of results whose first generated token is the item's context answer token."""
    if not items:
        return float("nan")
    hits = 0
    for r, it in zip(results, items, strict=True):
        a = tokenizer(it.answer, add_special_tokens=False).input_ids[0]  # type: ignore[operator]
        hits += bool(r.answer_tokens) and r.answer_tokens[0] == a
    return hits / len(items)
