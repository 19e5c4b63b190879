"""Extractive QA as a patching task: the context-answering run against the memory-answering run.

:func:`qa_patching_task` turns conflict items into a :class:`~patchtrace.tasks.base.Task`: clean =
the counterfactual context (the model copies "Lyon"), corrupt = the same prompt with the answer
sentence replaced by a distractor of the *same token length* (:func:`same_length_distractor`; the
model falls back to memory, "Paris"); answer = the context answer, wrong = the memory answer.
Patching then localizes context use (and, with the roles swapped, memory use):
:mod:`patchtrace.qa.circuit` runs both directions. The task is registered as ``extractive_qa``
(:func:`patchtrace.tasks.make_task`).

Example:
    >>> from patchtrace import load_model
    >>> m = load_model()
    >>> task = qa_patching_task(2, seed=0, model=m, n_sentences=(4, 4))
    >>> task.params["candidates"], task.params["kept"] == len(task) > 0   # contrastive items kept
    (6, True)
    >>> ex = task.examples[0]
    >>> ex.answer in ex.clean, ex.answer in ex.corrupt   # the context answer is only in the clean context
    (True, False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from patchtrace.qa.dataset import qa_dataset
from patchtrace.qa.generators import capital_sentence
from patchtrace.qa.items import QAItem
from patchtrace.qa.prompts import Fmt, render
from patchtrace.tasks.base import Example, Task, TaskError
from patchtrace.tasks.factual import CAPITALS
from patchtrace.tasks.filtering import logit_differences

if TYPE_CHECKING:
    from patchtrace.models.load import Model


def same_length_distractor(item: QAItem, tokenizer: Any, fmt: Fmt = "chat") -> QAItem | None:
    """``item`` with its gold sentence replaced by a true-capital distractor of the same token length.

    The replacement is about a country not in the context and not the subject, so the question is
    no longer answerable from the context. Returns None when no candidate has the right length.
    """
    target = len(render(item, tokenizer, fmt).ids)
    used = set(item.context.split())
    for c in sorted(CAPITALS, key=lambda x: (len(x), x)):
        if c == item.subject or c in used or CAPITALS[c] in used:
            continue
        cand = item.replace_sentence(item.gold, capital_sentence(c, CAPITALS[c]))
        if len(render(cand, tokenizer, fmt).ids) == target:
            return cand
    return None


def contrastive(model: Model, examples: list[Example]) -> list[Example]:
    """The examples whose clean run prefers the answer over the wrong token and whose corrupt run the
    reverse (last-position logit difference > 0 and < 0; one batched pass over all prompts)."""
    tok = model.tokenizer
    prompts = [tok(p).input_ids for ex in examples for p in (ex.clean, ex.corrupt)]
    a = [tok(ex.answer, add_special_tokens=False).input_ids[0] for ex in examples for _ in range(2)]
    w = [tok(ex.wrong, add_special_tokens=False).input_ids[0] for ex in examples for _ in range(2)]
    ld = logit_differences(model, prompts, a, w)
    return [ex for j, ex in enumerate(examples) if ld[2 * j] > 0 and ld[2 * j + 1] < 0]


def qa_patching_task(
    n: int = 16, seed: int = 0, model: Model | None = None, fmt: Fmt = "chat", variant: str = "context",
    n_sentences: tuple[int, int] = (3, 5), equal_length: bool = True,
) -> Task:
    """Conflict items as a patching task: context-answering run vs memory-answering run.

    ``variant="context"``: clean = counterfactual context (answer " Lyon"), corrupt = answer
    sentence swapped for a same-length distractor (the model answers " Paris"), answer = context
    answer, wrong = memory answer. Denoising then scores components for *context use*.
    ``variant="memory"``: the roles swapped (clean = the memory run, answer = memory answer), so
    denoising scores components for *memory use*.

    Examples are kept when the clean run prefers its answer over the wrong one and the corrupt run
    the reverse (:func:`contrastive`); ``params`` records the counts.

    ``equal_length=True`` takes the ``n`` examples from the most populated prompt lengths first:
    the patching engine batches equal-length examples (``TokenizedTask.groups()``), so a task of
    one or two lengths sweeps in one or two batches instead of one per example.

    Raises:
        TaskError: no model/tokenizer (token lengths must be aligned), or an unknown variant.
    """
    if model is None or model.tokenizer is None:
        raise TaskError("qa_patching_task needs a model with a tokenizer to align token lengths")
    if variant not in ("context", "memory"):
        raise TaskError(f"unknown variant {variant!r}; use 'context' or 'memory'")
    tok = model.tokenizer
    exs: list[Example] = []
    for it in qa_dataset(n * 3, seed, model, fmt, kinds=("conflict",), n_sentences=n_sentences).items:
        alt = same_length_distractor(it, tok, fmt)
        if alt is None or it.memory is None:
            continue
        ctx_p, mem_p = render(it, tok, fmt).text, render(alt, tok, fmt).text
        meta = {"subject": it.subject, "gold": it.gold, "sentences": list(it.sentences), "distractor": alt.sentences[it.gold]}
        exs.append(Example(ctx_p, mem_p, it.answer, it.memory, meta) if variant == "context"
                   else Example(mem_p, ctx_p, it.memory, it.answer, meta))
    cand = len(exs)
    exs = contrastive(model, exs)
    if equal_length:
        by_len: dict[int, list[Example]] = {}
        for ex in exs:
            by_len.setdefault(len(tok(ex.clean).input_ids), []).append(ex)
        exs = [ex for _, grp in sorted(by_len.items(), key=lambda kv: (-len(kv[1]), kv[0])) for ex in grp]
    exs = exs[:n]
    params = {"n": n, "seed": seed, "fmt": fmt, "variant": variant, "candidates": cand, "kept": len(exs),
              "n_sentences": list(n_sentences), "equal_length": equal_length}
    return Task(f"extractive_qa_{variant}", exs, params,
                "extractive QA conflict: counterfactual context vs the same prompt with the answer sentence swapped out")
