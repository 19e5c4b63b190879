"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" → a year > 32.

Answers are *sets* of tokens. With a tokenizer that has two-digit tokens (GPT-2), the answer set is
the two-digit years above YY and the wrong set those at or below. With a digit-level tokenizer
(Llama, SmolLM2) the next token is the tens digit: the answer set is the digits above YY's tens digit
and the wrong set the digits below it. The corrupt prompt uses the year 1701 (everything is greater),
as in the paper. The metric ``logit_diff`` then contrasts mean answer vs mean wrong logits.
"""

from __future__ import annotations

import random
from typing import Any

from patchtrace.tasks.base import Example, Task

NOUNS = "war expedition reign drought project voyage siege strike".split()
TEMPLATE = "The {noun} lasted from the year 17{yy} to the year 17"


def greater_than(n: int = 16, seed: int = 0, tokenizer: Any = None) -> Task:
    """Generate ``n`` greater-than examples.

    Args:
        n: number of examples.
        seed: RNG seed.
        tokenizer: decides two-digit vs digit-level answers (default: digit-level).
    """
    rng = random.Random(seed)
    two_digit = tokenizer is not None and len(tokenizer(" 1732", add_special_tokens=False).input_ids) <= 2 and len(
        tokenizer("32", add_special_tokens=False).input_ids
    ) == 1
    out = []
    for _ in range(n):
        noun = rng.choice(NOUNS)
        if two_digit:
            yy = rng.randint(2, 97)
            ans = tuple(f"{y:02d}" for y in range(yy + 1, 100))
            wrong = tuple(f"{y:02d}" for y in range(0, yy + 1))
        else:
            tens = rng.randint(1, 8)
            yy = tens * 10 + rng.randint(0, 9)
            ans = tuple(str(d) for d in range(tens + 1, 10))
            wrong = tuple(str(d) for d in range(0, tens))
        clean = TEMPLATE.format(noun=noun, yy=f"{yy:02d}")
        corrupt = TEMPLATE.format(noun=noun, yy="01")
        out.append(Example(clean, corrupt, ans, wrong, {"yy": yy}))
    return Task(
        "greater_than",
        _equalize(out),
        {"n": n, "seed": seed, "two_digit": two_digit},
        "greater-than over years; answers = later years (or tens digits)",
    )


def _equalize(exs: list[Example]) -> list[Example]:
    """Answer sets differ in size across examples; trim each to the common minimum (nearest kept)."""
    na = min(len(e.answer) for e in exs)
    nw = min(len(e.wrong) for e in exs)
    res = []
    for e in exs:
        a = tuple(e.answer)[:na]  # the smallest greater values
        w = tuple(e.wrong)[-nw:]  # the largest smaller-or-equal values
        res.append(Example(e.clean, e.corrupt, a, w, e.meta))
    return res
