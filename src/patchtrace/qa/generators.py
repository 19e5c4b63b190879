"""Generated extractive-QA items: capital-city facts in three kinds, no model needed.

Every context is 3–5 (``n_sentences``) one-sentence facts "The capital of X is Y.": one holds the
answer (its index is the gold source), the others are true-capital distractors of the same shape.
Answers are single tokens (cities, filtered per tokenizer), so scoring compares token ids.

* ``agree``    — the context states the true fact, so context and memory give the same answer;
* ``conflict`` — the context states a counterfactual ("The capital of France is Lyon."); a
  context-faithful model says Lyon, a memory-faithful one Paris;
* ``nomemory`` — the fact is about a made-up country ("The capital of Veldoria is Oslo."), so only
  the context can answer.

Which items a given model actually knows closed-book is decided by :mod:`patchtrace.qa.dataset`.

Example:
    >>> items = make_qa_items("conflict", n=2, seed=0)
    >>> items[0].kind, len(items[0].sentences) >= 3
    ('conflict', True)
"""

from __future__ import annotations

import random
from typing import Any

from patchtrace.qa.items import KINDS, QAItem
from patchtrace.tasks.base import TaskError
from patchtrace.tasks.factual import CAPITALS

#: Cities used as counterfactual or made-up capitals (filtered to single tokens per tokenizer).
CITIES: tuple[str, ...] = (
    "Lyon", "Milan", "Munich", "Osaka", "Sydney", "Toronto", "Chicago", "Boston", "Dallas", "Denver",
    "Seattle", "Houston", "Venice", "Naples", "Geneva", "Zurich", "Hamburg", "Porto", "Seville",
    "Valencia", "Florence", "Marseille", "Kyoto", "Shanghai", "Mumbai", "Dubai", "Toledo", "Miami",
    *(v for k, v in CAPITALS.items() if k != "Argentina"),
)
#: Made-up countries for the ``nomemory`` kind.
FAKE_COUNTRIES = (
    "Veldoria", "Quorland", "Zembria", "Taloria", "Mirvania", "Ostrelia", "Brakistan", "Florinia",
    "Gandoria", "Kelvania", "Norvania", "Pelomia", "Drovenia", "Sarkovia", "Luminar", "Vexland",
    "Torundi", "Calvaria", "Ezmeria", "Jorvath",
)
#: Countries whose capital's first token is not the whole name ("Buenos" Aires).
_MULTIWORD = frozenset({"Argentina"})


def _single_token(tok: Any, word: str) -> bool:
    return tok is None or len(tok(" " + word, add_special_tokens=False).input_ids) == 1


def capital_sentence(country: str, city: str) -> str:
    return f"The capital of {country} is {city}."


def make_qa_items(kind: str, n: int = 16, seed: int = 0, tokenizer: Any = None, n_sentences: tuple[int, int] = (3, 5)) -> list[QAItem]:
    """Generate up to ``n`` unfiltered items of one kind (no model needed).

    Args:
        kind: ``agree``, ``conflict`` or ``nomemory``.
        n: number of items (subjects are reused with fresh distractors if ``n`` exceeds them).
        seed: RNG seed.
        tokenizer: if given, only cities that are one token (with a leading space) are used.
        n_sentences: inclusive range of the number of context sentences.

    Raises:
        TaskError: unknown kind.
    """
    if kind not in KINDS:
        raise TaskError(f"unknown QA kind {kind!r}; kinds are {', '.join(KINDS)}")
    rng = random.Random(f"{kind}-{seed}")
    countries = [c for c in CAPITALS if c not in _MULTIWORD and _single_token(tokenizer, CAPITALS[c])]
    cities = sorted({c for c in CITIES if _single_token(tokenizer, c)})
    subjects = list(FAKE_COUNTRIES) if kind == "nomemory" else list(countries)
    items: list[QAItem] = []
    rounds = 0
    while len(items) < n and rounds < 50:
        rng.shuffle(subjects)
        for s in subjects:
            if len(items) >= n:
                break
            true = CAPITALS.get(s)
            if kind == "agree":
                ans = true
            else:
                ans = rng.choice([c for c in cities if c != true and c not in CAPITALS.values()] if kind == "conflict" else cities)
            assert ans is not None
            k = rng.randint(*n_sentences)
            others = rng.sample([c for c in countries if c != s and CAPITALS[c] != ans], k - 1)
            sents = [capital_sentence(o, CAPITALS[o]) for o in others]
            gold = rng.randrange(k)
            sents.insert(gold, capital_sentence(s, ans))
            items.append(QAItem(
                tuple(sents), f"What is the capital of {s}?", f"The capital of {s} is", " " + ans, gold, kind,
                None if true is None else " " + true, s, {"round": rounds},
            ))
        rounds += 1
    return items
