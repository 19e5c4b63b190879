"""Greedy decoding on patchtrace's runner, alias matching, and classifying two-hop queries.

Back-patching scores a patch by what the model *generates* after it: the patch changes the prefill
(the prompt's forward), and greedy decoding then continues from that prefill's keys and values with
no further intervention (the paper's code skips its hook on decode steps). So decoding here starts
from a given prefill — last-position logits and per-layer keys/values — which is exactly what the
back-patching fast path produces for a batch of patched rows. Each row carries its own prefix.

Text is decoded up to the first end-of-sequence token and matched against aliases case-insensitively
(:func:`patchtrace.multihop.queries.matches`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from patchtrace.models.load import Model
from patchtrace.models.runner import Hooks
from patchtrace.multihop.queries import MultihopError, TwoHopQuery, matches

KV = list[tuple[Tensor, Tensor]]


def encode(model: Model, prompt: str, name: str = "prompt") -> list[int]:
    """Token ids of ``prompt`` (as the model's tokenizer writes them).

    Raises:
        MultihopError: the model has no tokenizer, or the prompt tokenizes to nothing.
    """
    if model.tokenizer is None:
        raise MultihopError(f"{name}: the model has no tokenizer")
    ids = list(model.tokenizer(prompt).input_ids)
    if not ids:
        raise MultihopError(f"{name}: prompt {prompt!r} has no tokens")
    return ids


def first_token(model: Model, answer: str, name: str = "target") -> int:
    """The first token of ``" " + answer`` as a continuation (no BOS), the token a log-prob metric reads.

    Raises:
        MultihopError: an empty answer.
    """
    if not answer.strip():
        raise MultihopError(f"{name}: target is empty")
    if model.tokenizer is None:
        raise MultihopError(f"{name}: the model has no tokenizer")
    ids = list(model.tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids)
    if not ids:
        raise MultihopError(f"{name}: target {answer!r} has no tokens")
    return int(ids[0])


def prefill(model: Model, ids: Tensor) -> tuple[Tensor, KV]:
    """Unpatched prefill of ``ids`` ``[B, T]``: last-position logits ``[B, V]`` and keys/values."""
    with torch.no_grad():
        out = model.runner.forward(ids, keep_kv=True, last_only=True)
    assert out.logits is not None and out.kv is not None
    return out.logits[:, -1], [kv for kv in out.kv if kv is not None]


def decode_from(model: Model, logits: Tensor, kv: KV, length: int, max_new: int, hooks: Hooks | None = None) -> Tensor:
    """Greedy continuation of ``B`` prefills: token ids ``[B, max_new]``.

    Args:
        logits: last-position logits of each row's prefill ``[B, V]``.
        kv: per layer, each row's keys/values ``[B, K, length, d]``.
        length: the prefill's length (the first new token's absolute position).
        max_new: tokens to generate (the first is the prefill logits' argmax).
        hooks: run at every decoding step (an ablation that lasts the whole generation); none by
            default (back-patching patches the prefill only).
    """
    out = [logits.argmax(-1)]
    cache = [(k, v) for k, v in kv]
    with torch.no_grad():
        for s in range(1, max_new):
            step = model.runner.forward(out[-1][:, None], pos_offset=length + s - 1, past_kv=cache, keep_kv=True,
                                        last_only=True, hooks=hooks)
            assert step.logits is not None and step.kv is not None
            new = step.kv
            cache = [(torch.cat((k, nk[0]), 2), torch.cat((v, nk[1]), 2))  # type: ignore[index]
                     for (k, v), nk in zip(cache, new, strict=True)]
            out.append(step.logits[:, -1].argmax(-1))
    return torch.stack(out, 1)


def to_text(model: Model, ids: Tensor) -> list[str]:
    """Decode generated ids ``[B, n]`` up to the first end-of-sequence token."""
    eos = getattr(model.tokenizer, "eos_token_id", None)
    texts = []
    for row in ids.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(model.tokenizer.decode(row, skip_special_tokens=True))
    return texts


def greedy(model: Model, prompts: Sequence[str], max_new: int = 10, batch: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (grouped by token length, so no padding is needed)."""
    ids = [encode(model, p, f"prompt {i}") for i, p in enumerate(prompts)]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(ids):
        groups[len(t)].append(i)
    texts: list[str] = [""] * len(prompts)
    dev = model.device
    for length, idx in groups.items():
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            x = torch.tensor([ids[i] for i in part], device=dev)
            logits, kv = prefill(model, x)
            gen = decode_from(model, logits, kv, length, max_new)
            for i, txt in zip(part, to_text(model, gen), strict=True):
                texts[i] = txt
    return texts


def classify(model: Model, queries: Sequence[TwoHopQuery], max_new: int = 10) -> tuple[list[TwoHopQuery], list[bool], dict[str, int]]:
    """Ask the model each hop and the composition; greedy generation scored by alias match.

    Returns:
        ``(queries with hop1_ok/hop2_ok set, composition correct per query, counts)``; counts has
        ``total``, ``hop1``, ``hop2``, ``both_hops``, ``composition``, ``both_hops_composition_wrong``
        (the queries back-patching is about) and ``both_hops_composition_right``.

    Raises:
        MultihopError: a query without one-hop prompts or a bridge (it cannot be classified).
    """
    for q in queries:
        if q.hop1_prompt is None or q.hop2_prompt is None or q.bridge is None:
            raise MultihopError(f"{q.name}: classifying needs 'hop1_prompt', 'hop2_prompt' and 'bridge'")
    unique = list(dict.fromkeys(p for q in queries for p in (q.hop1_prompt, q.hop2_prompt, q.prompt)))
    said = dict(zip(unique, greedy(model, unique, max_new), strict=True))  # type: ignore[arg-type]
    out, comp = [], []
    for q in queries:
        h1, h2, c = said[q.hop1_prompt], said[q.hop2_prompt], said[q.prompt]  # type: ignore[index]
        out.append(replace(q, hop1_ok=matches(h1, q.bridge_aliases), hop2_ok=matches(h2, q.aliases)))
        comp.append(matches(c, q.aliases))
    counts = summarize(out, comp)
    return out, comp, counts


def summarize(queries: Sequence[TwoHopQuery], composed: Sequence[bool]) -> dict[str, int]:
    """The classification counts (see :func:`classify`)."""
    both = [q.both_hops_ok for q in queries]
    return {
        "total": len(queries),
        "hop1": sum(bool(q.hop1_ok) for q in queries),
        "hop2": sum(bool(q.hop2_ok) for q in queries),
        "both_hops": sum(both),
        "composition": sum(composed),
        "both_hops_composition_wrong": sum(b and not c for b, c in zip(both, composed, strict=True)),
        "both_hops_composition_right": sum(b and c for b, c in zip(both, composed, strict=True)),
    }




__all__ = ["classify", "decode_from", "encode", "first_token", "greedy", "prefill", "summarize", "to_text"]
