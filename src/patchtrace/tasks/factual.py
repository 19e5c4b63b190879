"""Factual recall: "The capital of France is" → " Paris", corrupted by a different subject.

The corrupt prompt swaps in another country whose name has the same number of tokens, so positions
align; the wrong answer is that country's capital. With a model, :func:`factual` keeps only the
facts the model gets right (the answer is its top-1 next token on the clean prompt and the wrong
capital is its top-1 on the corrupt prompt) and records how many were kept in ``task.params``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from patchtrace.tasks.base import Example, Task
from patchtrace.tasks.filtering import greedy_next_tokens

if TYPE_CHECKING:
    from patchtrace.models.load import Model

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Russia": "Moscow",
    "China": "Beijing",
    "England": "London",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Cuba": "Havana",
    "India": "Delhi",
    "Turkey": "Ankara",
    "Belgium": "Brussels",
    "Argentina": "Buenos",
    "Iran": "Tehran",
}
TEMPLATES = ("The capital of {c} is", "{c}'s capital city is")


def factual(n: int = 16, seed: int = 0, model: Model | None = None, template: int = 0) -> Task:
    """Country → capital recall.

    Args:
        n: maximum number of examples (fewer if fewer facts qualify).
        seed: RNG seed for the order and the corrupting subjects.
        model: a loaded :class:`~patchtrace.models.load.Model`; if given, only facts it gets right
            on both prompts are kept, and ``params['kept']`` / ``params['candidates']`` say how many.
        template: which prompt template (0: "The capital of X is", 1: "X's capital city is").
    """
    rng = random.Random(seed)
    tpl = TEMPLATES[template]
    countries = list(CAPITALS)
    rng.shuffle(countries)
    tok = model.tokenizer if model is not None else None
    if tok is not None:  # answers must be single tokens (Task.tokenize refuses others)
        countries = [c for c in countries if len(tok(" " + CAPITALS[c], add_special_tokens=False).input_ids) == 1]

    def ntok(s: str) -> int:
        return len(tok(tpl.format(c=s)).input_ids) if tok is not None else len(s.split())

    cands = []
    for c in countries:
        others = [o for o in countries if o != c and ntok(o) == ntok(c) and CAPITALS[o] != CAPITALS[c]]
        if not others:
            continue
        o = rng.choice(others)
        cands.append(Example(tpl.format(c=c), tpl.format(c=o), " " + CAPITALS[c], " " + CAPITALS[o], {"subject": c, "other": o}))
    kept = cands
    if model is not None:
        kept = known_facts(model, cands)
    kept = kept[:n]
    params = {"n": n, "seed": seed, "template": template, "candidates": len(cands), "kept": len(kept)}
    return Task("factual", kept, params, "country → capital recall; corrupt = another country")


def known_facts(model: Model, examples: list[Example]) -> list[Example]:
    """The examples whose clean prompt the model continues with the answer and whose corrupt prompt
    with the wrong capital (greedy next token; one batched pass, :mod:`patchtrace.tasks.filtering`)."""
    tok = model.tokenizer
    prompts = [tok(p).input_ids for e in examples for p in (e.clean, e.corrupt)]
    top = greedy_next_tokens(model, prompts)
    keep = []
    for j, e in enumerate(examples):
        ans = tok(e.answer, add_special_tokens=False).input_ids[0]
        wrong = tok(e.wrong, add_special_tokens=False).input_ids[0]
        if top[2 * j] == ans and top[2 * j + 1] == wrong:
            keep.append(e)
    return keep
