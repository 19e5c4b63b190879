"""ATTNATTRIB: attribute a generated answer to context sentences from a few heads' attention.

Basu et al. (2025) find that some attention heads of the context-faithfulness circuit
attend, at the answer position, to where the answer sits in the context. Reading those heads'
attention *while the answer is generated* gives attribution for free: no extra forward or backward
pass. The steps here:

1. **Choose heads** (:func:`select_heads`, a fixed, reproducible rule): take the ``k_candidates``
   heads with the largest context-use effect in the circuit scores (activation patching at the last
   position, :mod:`patchtrace.qa.circuit`); on the probe prompts, measure each candidate's
   attention at the last position restricted to the context tokens; keep the ``n_heads`` with the
   lowest mean entropy of that (renormalised) distribution — the sharpest pointers. Ties break by
   larger effect. No gold labels are used.
2. **Generate** the answer greedily (:func:`patchtrace.qa.generation.generate`) recording those
   heads' attention over the prompt at every step.
3. **Score** context tokens by the heads' mean attention, averaged over the answer's generated
   tokens (``answer_steps``); restrict to context tokens (attention sinks such as the first token
   are never context).
4. **Rank sentences** by an aggregate of their tokens' scores (``max``, the paper's choice, or
   ``sum``); the top sentence is the attribution; the arg-max token ± ``window`` is the span.

Example:
    One generated conflict item (the context says Poland's capital is Hamburg), attributed with head
    L23.H2:

    >>> from patchtrace import load_model
    >>> from patchtrace.qa.generators import make_qa_items
    >>> m = load_model()
    >>> item = make_qa_items("conflict", 1, tokenizer=m.tokenizer)[0]
    >>> item.question, item.answer, item.memory
    ('What is the capital of Poland?', ' Hamburg', ' Warsaw')
    >>> res = attribute(m, item, AttnAttribConfig(heads=((23, 2),)))
    >>> res.answer_text, len(res.sentence_scores) == len(item.sentences)
    (' Hamburg', True)
    >>> res.top_sentence == item.gold                          # the sentence the answer came from
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from patchtrace.models.load import Model
from patchtrace.qa.generation import AttentionRecorder, Generation, GenerationError, Head, HookFactory, generate
from patchtrace.qa.items import QAItem
from patchtrace.qa.prompts import Fmt, QAPrompt, render
from patchtrace.results import ResultsError, Scores, read_meta, read_tensors, write_meta

Agg = Literal["max", "sum", "mean"]


def sentence_scores(token_scores: Tensor, spans: Sequence[tuple[int, int]], agg: Agg = "max") -> Tensor:
    """Aggregate per-token scores ``[T]`` into per-sentence scores ``[S]`` over token ``spans``.

    Raises:
        GenerationError: an unknown aggregate or an empty / out-of-range span.
    """
    out = []
    for i, (s, e) in enumerate(spans):
        if not 0 <= s < e <= token_scores.shape[0]:
            raise GenerationError(f"sentence {i}: token span [{s}, {e}) is empty or outside [0, {token_scores.shape[0]})")
        seg = token_scores[s:e]
        if agg == "max":
            out.append(seg.max())
        elif agg == "sum":
            out.append(seg.sum())
        elif agg == "mean":
            out.append(seg.mean())
        else:
            raise GenerationError(f"unknown sentence aggregate {agg!r}; use 'max', 'sum' or 'mean'")
    return torch.stack(out)


def context_mask(prompt: QAPrompt) -> Tensor:
    """``[T]`` boolean mask of the context tokens of a rendered prompt."""
    return torch.tensor([s >= 0 for s in prompt.token_sentence], dtype=torch.bool)


@dataclass(frozen=True)
class AttnAttribConfig:
    """Settings of ATTNATTRIB.

    Attributes:
        heads: ``(layer, head)`` attribution heads (from :func:`select_heads`).
        agg: sentence aggregate of token scores.
        max_new_tokens: answer tokens to generate.
        answer_steps: how many of the first generated tokens' attention to average (the answer;
            1 for single-token answers).
        window: half-width in tokens of the attributed span around the arg-max token.
        fmt: prompt format.
    """

    heads: tuple[Head, ...]
    agg: Agg = "max"
    max_new_tokens: int = 1
    answer_steps: int = 1
    window: int = 2
    fmt: Fmt = "chat"


@dataclass
class Attribution:
    """ATTNATTRIB (or a baseline's) result for one example.

    Attributes:
        answer_tokens: generated ids; answer_text: their decoded text.
        token_scores: ``[T]`` score per prompt token (0 outside the context).
        sentence_scores: ``[S]`` score per context sentence.
        ranking: sentence indices, best first.
        span: token range ``[start, end)`` of the attributed span.
        seconds: wall time of the whole call (generation included).
        method: which method produced it.
        prompt: the rendered prompt (for reports).
        logits: ``[n_new, V]`` logits of the generated tokens (when generated).
    """

    answer_tokens: list[int]
    answer_text: str
    token_scores: Tensor
    sentence_scores: Tensor
    ranking: list[int]
    span: tuple[int, int]
    seconds: float
    method: str
    prompt: QAPrompt
    logits: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        """In a notebook: the answer and the sentence scores (:func:`patchtrace.report.inline.attribution_html`)."""
        from patchtrace.report.inline import attribution_html

        return attribution_html(self)

    @property
    def top_sentence(self) -> int:
        return self.ranking[0]

    def hit(self, gold: int, k: int = 1) -> bool:
        """Whether ``gold`` is among the top ``k`` sentences."""
        return gold in self.ranking[:k]

    def save(self, path: str | Path) -> Path:
        """Write ``attribution.safetensors`` (the score and logit tensors) and ``attribution.json``
        (everything else, the rendered prompt included) into the folder ``path``; nothing is pickled."""
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        tensors = {"token_scores": self.token_scores.detach().cpu().contiguous(),
                   "sentence_scores": self.sentence_scores.detach().cpu().contiguous()}
        if self.logits is not None:
            tensors["logits"] = self.logits.detach().cpu().contiguous()
        save_file(tensors, str(p / "attribution.safetensors"))
        meta = {
            "format_version": 1, "answer_tokens": self.answer_tokens, "answer_text": self.answer_text,
            "ranking": self.ranking, "span": list(self.span), "seconds": self.seconds, "method": self.method,
            "prompt": {"text": self.prompt.text, "ids": self.prompt.ids,
                       "sentence_spans": [list(x) for x in self.prompt.sentence_spans],
                       "token_sentence": self.prompt.token_sentence},
            "extras": {k: v for k, v in self.extras.items() if isinstance(v, (bool, int, float, str, list, type(None)))},
        }
        write_meta(p, "attribution.json", meta, ("attribution.safetensors",), indent=1)  # with checksums
        return p

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        """Read a folder written by :meth:`save`.

        Raises:
            GenerationError: a missing or malformed file (named).
        """
        p = Path(path)
        try:
            meta = read_meta(p, "attribution.json")
            t = read_tensors(p, "attribution.safetensors", meta)  # checked against the JSON's checksum
        except ResultsError as e:
            raise GenerationError(f"{p} is not a readable attribution folder ({e})") from None
        except Exception as e:
            raise GenerationError(f"{p} is not a readable attribution folder ({type(e).__name__}: {e})") from None
        pr = meta["prompt"]
        prompt = QAPrompt(pr["text"], pr["ids"], [tuple(x) for x in pr["sentence_spans"]], pr["token_sentence"])
        return cls(meta["answer_tokens"], meta["answer_text"], t["token_scores"], t["sentence_scores"],
                   meta["ranking"], tuple(meta["span"]), meta["seconds"], meta["method"], prompt,  # type: ignore[arg-type]
                   t.get("logits"), dict(meta["extras"]))


def finish(
    prompt: QAPrompt, token_scores: Tensor, agg: Agg, window: int, method: str, gen: Generation | None,
    tokenizer: Any, t0: float, answer_tokens: list[int] | None = None,
) -> Attribution:
    """Turn token scores into an :class:`Attribution` (shared by ATTNATTRIB and the baselines)."""
    mask = context_mask(prompt)
    ts = torch.where(mask, token_scores.float().cpu(), torch.zeros(()))
    ss = sentence_scores(ts, prompt.sentence_spans, agg)
    ranking = [int(i) for i in torch.argsort(ss, descending=True, stable=True)]
    masked = torch.where(mask, ts, torch.full_like(ts, -math.inf))
    j = int(masked.argmax())
    s0, e0 = prompt.sentence_spans[0][0], prompt.sentence_spans[-1][1]
    span = (max(s0, j - window), min(e0, j + window + 1))
    toks = answer_tokens if answer_tokens is not None else (gen.tokens if gen is not None else [])
    return Attribution(
        toks, tokenizer.decode(toks) if tokenizer is not None else "", ts, ss, ranking, span,
        time.perf_counter() - t0, method, prompt, gen.logits if gen is not None else None,
    )


def attribute(
    model: Model,
    item: QAItem,
    config: AttnAttribConfig,
    *,
    extra_hooks: HookFactory | None = None,
) -> Attribution:
    """Generate the answer to ``item`` and attribute it to context sentences in the same pass.

    Args:
        model: a loaded model with a tokenizer.
        item: the QA item.
        config: :class:`AttnAttribConfig`.
        extra_hooks: further hooks for the same generation (e.g. steering).

    Raises:
        GenerationError: no heads, or a head out of range.
    """
    if not config.heads:
        raise GenerationError("ATTNATTRIB needs at least one head (see select_heads)")
    t0 = time.perf_counter()
    prompt = render(item, model.tokenizer, config.fmt)
    rec = AttentionRecorder(list(config.heads), len(prompt.ids))
    gen = generate(model, prompt.ids, config.max_new_tokens, recorder=rec, extra_hooks=extra_hooks)
    assert gen.attention is not None
    steps = max(1, min(config.answer_steps, gen.attention.shape[0]))
    token_scores = gen.attention[:steps].mean(dim=(0, 1))
    return finish(prompt, token_scores, config.agg, config.window, "attnattrib", gen, model.tokenizer, t0)


def head_entropies(model: Model, prompts: Sequence[QAPrompt], heads: Sequence[Head]) -> Tensor:
    """Mean entropy (nats) of each head's last-position attention renormalised over context tokens.

    One forward per prompt, recording only ``heads``. Returns ``[len(heads)]``.
    """
    tot = torch.zeros(len(heads))
    for p in prompts:
        rec = AttentionRecorder(list(heads), len(p.ids))
        generate(model, p.ids, 1, recorder=rec)
        row = rec.steps[0][:, context_mask(p)]  # [H, C]
        q = row / row.sum(-1, keepdim=True).clamp_min(1e-12)
        tot += -(q * q.clamp_min(1e-12).log()).sum(-1)
    return tot / max(1, len(prompts))


def select_heads(
    model: Model,
    circuit: Scores,
    probe: Sequence[QAItem],
    *,
    k_candidates: int = 12,
    n_heads: int = 2,
    fmt: Fmt = "chat",
) -> tuple[tuple[Head, ...], dict[str, Any]]:
    """The documented head-selection rule (see the module docstring, step 1).

    The defaults (12 candidates, keep 2) are the values ``benchmarks/qa.py`` picks on its dev
    split for SmolLM2 (short and long contexts pooled); pick them again on your own dev data for
    another model.

    Args:
        model: the model.
        circuit: head scores with axes ``(layer, head)`` — the context-use effects.
        probe: probe items whose prompts are used for the entropies (no gold labels are read).
        k_candidates: how many top-effect heads to consider.
        n_heads: how many to keep (their attention is averaged by :func:`attribute`).
        fmt: prompt format of the probe prompts.

    Returns:
        ``(heads, info)`` with ``info`` holding the candidates, effects and entropies.

    Raises:
        GenerationError: scores without ``(layer, head)`` axes, or an empty probe.
    """
    if circuit.axes[:2] != ("layer", "head"):
        raise GenerationError(f"select_heads needs (layer, head) scores, got axes {circuit.axes}")
    if not probe:
        raise GenerationError("select_heads needs at least one probe item")
    vals = circuit.values.reshape(circuit.values.shape[0], circuit.values.shape[1], -1).mean(-1)
    lay = [int(x) for x in circuit.labels.get("layer_index", [str(i) for i in range(vals.shape[0])])]
    hd = [int(x) for x in circuit.labels.get("head_index", [str(i) for i in range(vals.shape[1])])]
    flat = vals.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:k_candidates].tolist()
    cands = [(lay[i // vals.shape[1]], hd[i % vals.shape[1]]) for i in order]
    effects = [float(flat[i]) for i in order]
    ent = head_entropies(model, [render(it, model.tokenizer, fmt) for it in probe], cands)
    rank = sorted(range(len(cands)), key=lambda i: (round(float(ent[i]), 6), -effects[i]))
    chosen = tuple(cands[i] for i in rank[:n_heads])
    info = {"candidates": [list(c) for c in cands], "effects": effects, "entropies": ent.tolist(),
            "rule": f"top-{k_candidates} context-effect heads, keep {n_heads} lowest context-attention entropy"}
    return chosen, info


def answer_source(item: QAItem, result: Attribution, tokenizer: Any) -> str:
    """Where a generated answer came from: ``"context"`` (its first token is the context answer's),
    ``"memory"`` (the closed-book answer's, when that differs), or ``"other"``.

    Attribution accuracy only means something on answers that were copied from the context: an
    answer given from memory against the context, or a generation that starts with ``'The'``, has
    no source sentence to find.
    """
    if not result.answer_tokens:
        return "other"
    first = result.answer_tokens[0]

    def tok0(text: str | None) -> int | None:
        if not text:
            return None
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return ids[0] if ids else None

    if first == tok0(item.answer):
        return "context"
    if item.memory is not None and first == tok0(item.memory):
        return "memory"
    return "other"


def accuracy_by_source(items: Sequence[QAItem], results: Sequence[Attribution], tokenizer: Any) -> dict[str, Any]:
    """Top-1 sentence accuracy over the items answered from the context, and the others apart.

    Returns:
        ``{"hits": h, "n_context": n, "sources": [...] per item, "memory": [indices], "other": [indices]}``;
        accuracy is ``hits / n_context`` (items not answered from the context are not counted).
    """
    sources = [answer_source(it, r, tokenizer) for it, r in zip(items, results, strict=True)]
    ctx = [i for i, s in enumerate(sources) if s == "context"]
    return {
        "hits": sum(results[i].top_sentence == items[i].gold for i in ctx),
        "n_context": len(ctx),
        "sources": sources,
        "memory": [i for i, s in enumerate(sources) if s == "memory"],
        "other": [i for i, s in enumerate(sources) if s == "other"],
    }
