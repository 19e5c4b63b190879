"""Indirect-object identification (Wang et al. 2022): "When Mary and John went to the store, John
gave a drink to" → " Mary".

The clean prompt repeats the subject S, so the answer is the indirect object IO. The corrupt prompt
puts IO in the second clause instead, so the model's answer flips to S; the metric contrasts IO with
S. Half the examples use the ABBA order and half BABA. Names, places and objects are chosen to be
single tokens for common BPE tokenizers (GPT-2, Llama/SmolLM), so all prompts of one template have
the same length and positions align across examples.
"""

from __future__ import annotations

import random

from patchtrace.tasks.base import Example, Task, TaskError

NAMES = (
    "Mary John Tom James Dan Sarah Paul Mike Kate Anna Lisa David Emma Alice Bob Jack Sam Ben Max "
    "Tim Amy Rose Jim Joe Mark Ryan Adam Alex Eric Lucy Jane Carl"
).split()
PLACES = "store park school house office market station garden restaurant hospital beach library".split()
OBJECTS = "drink book ring bag ball pen apple letter gift card cake".split()
TEMPLATE = "When {A} and {B} went to the {place}, {S} gave a {obj} to"


def ioi(n: int = 16, seed: int = 0) -> Task:
    """Generate ``n`` IOI examples deterministically from ``seed``.

    Args:
        n: number of examples (≥ 1).
        seed: RNG seed; the same (n, seed) always gives the same task.
    """
    if n < 1:
        raise TaskError(f"ioi: n must be ≥ 1 (got {n})")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        io, s = rng.sample(NAMES, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        a, b = (io, s) if i % 2 == 0 else (s, io)  # ABBA / BABA
        clean = TEMPLATE.format(A=a, B=b, place=place, S=s, obj=obj)
        corrupt = TEMPLATE.format(A=a, B=b, place=place, S=io, obj=obj)
        out.append(
            Example(clean, corrupt, " " + io, " " + s, meta={"io": io, "s": s, "order": "ABBA" if i % 2 == 0 else "BABA"})
        )
    return Task("ioi", out, {"n": n, "seed": seed}, "indirect-object identification; answer IO vs S")
