"""Factual recall: "The capital of France is" → " Paris", corrupted by a different subject.

The corrupt prompt swaps in another country whose name has the same number of tokens, so positions
align; the wrong answer is that country's capital. With a model, :func:`factual` keeps only the
facts the model gets right (the answer is its top-1 next token on the clean prompt and the wrong
capital is its top-1 on the corrupt prompt) and records how many were kept in ``task.params``.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from patchtrace.tasks.base import Example, Task

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


def factual(n: int = 16, seed: int = 0, model: Any = None, template: int = 0) -> Task:
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
    tok = getattr(model, "tokenizer", None)
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
        kept = [e for e in cands if _model_gets_right(model, e)]
    kept = kept[:n]
    params = {"n": n, "seed": seed, "template": template, "candidates": len(cands), "kept": len(kept)}
    return Task("factual", kept, params, "country → capital recall; corrupt = another country")


def _model_gets_right(model: Any, ex: Example) -> bool:
    tok = model.tokenizer
    ans = tok(ex.answer, add_special_tokens=False).input_ids
    wrong = tok(ex.wrong, add_special_tokens=False).input_ids
    ids = torch.tensor([tok(ex.clean).input_ids, tok(ex.corrupt).input_ids], device=model.device)
    with torch.no_grad():
        top = model.runner.forward(ids, last_only=True).logits[:, -1].argmax(-1).tolist()  # type: ignore[union-attr]
    return top[0] == ans[0] and top[1] == wrong[0]
