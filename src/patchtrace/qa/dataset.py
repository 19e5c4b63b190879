"""QA items filtered against a model, so that each kind's memory side is what it claims.

A generated ``conflict`` item only probes context-vs-memory if the model actually knows the true
capital closed-book; a ``nomemory`` item only if the model does not already produce the context's
city without the context. :func:`qa_dataset` asks the model (the same prompt with no context, one
batched pass: :func:`~patchtrace.tasks.filtering.greedy_next_tokens`) and keeps the items that pass,
recording per kind how many were generated and kept.

Example:
    >>> from patchtrace import load_model
    >>> ds = qa_dataset(2, seed=0, model=load_model())
    >>> sorted(ds.counts), ds.counts["conflict"]["generated"]      # twice as many generated as wanted
    (['agree', 'conflict', 'nomemory'], 4)
    >>> all(0 < c["kept"] <= 2 for c in ds.counts.values()), len(ds.of_kind("conflict")) <= 2
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from patchtrace.qa.generators import make_qa_items
from patchtrace.qa.items import KINDS, QAItem
from patchtrace.qa.prompts import Fmt, render
from patchtrace.tasks.filtering import greedy_next_tokens

if TYPE_CHECKING:
    from patchtrace.models.load import Model


@dataclass
class QADataset:
    """Items of the three kinds, filtered against the model, with the counts kept.

    Attributes:
        items: all kept items.
        counts: per kind, ``{"generated": g, "kept": k}`` and the filter used.
        fmt: the prompt format the filter used.
    """

    items: list[QAItem]
    counts: dict[str, dict[str, Any]]
    fmt: str = "chat"

    def of_kind(self, kind: str) -> list[QAItem]:
        return [it for it in self.items if it.kind == kind]


def closed_book_answers(model: Model, items: Sequence[QAItem], fmt: Fmt = "chat") -> list[int]:
    """The model's greedy next token on each item's prompt *without* its context (one pass per subject)."""
    tok = model.tokenizer
    subjects = sorted({it.subject for it in items})
    first = {it.subject: it for it in reversed(items)}
    top = greedy_next_tokens(model, [render(first[s], tok, fmt, sentences=None).ids for s in subjects])
    by_subject = dict(zip(subjects, top, strict=True))
    return [by_subject[it.subject] for it in items]


def qa_dataset(
    n_per_kind: int = 20, seed: int = 0, model: Model | None = None, fmt: Fmt = "chat", kinds: Sequence[str] = KINDS,
    n_sentences: tuple[int, int] = (3, 5),
) -> QADataset:
    """The three kinds, filtered so that the memory side is what the kind claims.

    With a model, the closed-book answer (same prompt, no context) is checked: ``agree`` and
    ``conflict`` keep subjects the model knows (closed-book top-1 = the true capital), so in a
    conflict the memory answer differs from the context answer; ``nomemory`` keeps items whose
    closed-book top-1 is *not* the context answer. Counts kept per kind go into ``counts``.

    Args:
        n_per_kind: items wanted per kind (twice as many are generated when filtering).
        seed: generator seed.
        model: the model to filter with (None: no filtering).
        fmt: prompt format of the closed-book prompts.
        kinds: which kinds.
        n_sentences: inclusive range of context sentences (see :func:`~patchtrace.qa.generators.make_qa_items`).
    """
    tok: Any = model.tokenizer if model is not None else None
    items: list[QAItem] = []
    counts: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        cand = make_qa_items(kind, n_per_kind * 2 if model is not None else n_per_kind, seed, tok, n_sentences)
        kept = cand
        if model is not None:
            closed = closed_book_answers(model, cand, fmt)
            if kind == "nomemory":
                ans = [tok(it.answer, add_special_tokens=False).input_ids[0] for it in cand]
                kept = [it for it, c, a in zip(cand, closed, ans, strict=True) if c != a]
            else:
                mem = [tok(it.memory, add_special_tokens=False).input_ids[0] for it in cand]
                kept = [it for it, c, m in zip(cand, closed, mem, strict=True) if c == m]
        kept = kept[:n_per_kind]
        counts[kind] = {"generated": len(cand), "kept": len(kept),
                        "filter": "closed-book top-1 != context answer" if kind == "nomemory" else "closed-book top-1 == true capital"}
        items.extend(kept)
    return QADataset(items, counts, fmt)
