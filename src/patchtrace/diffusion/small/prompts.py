"""Prompt sets for the small model: an attribute's prompts, their altered twins, and edit prompt sets.

For ``style = boxed`` the altered prompt drops the style phrase (the attribute-free prompt: ``plain``
is never worded). For the other attributes every caption names a value, so the altered prompt names
another value (the next one in :data:`~.data.ATTRIBUTES`) — LocoGen's "altered prompt".
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from patchtrace.diffusion.adapters import DiffusionError
from patchtrace.diffusion.small.data import ATTRIBUTES, Spec, all_specs, caption


def check_attribute(attribute: str, value: str) -> None:
    """Refuse an attribute without a classifier, or a value it cannot take (names both)."""
    if attribute not in ATTRIBUTES:
        raise DiffusionError(f"no classifier for attribute {attribute!r}; the small model's are {sorted(ATTRIBUTES)}")
    if value not in ATTRIBUTES[attribute]:
        raise DiffusionError(f"attribute {attribute!r} has no value {value!r}; its values are {list(ATTRIBUTES[attribute])}")


def altered_value(attribute: str, value: str) -> str:
    vals = ATTRIBUTES[attribute]
    return vals[(vals.index(value) + 1) % len(vals)]


def attribute_prompts(attribute: str, value: str, n: int, seed: int = 0,
                      held_out: bool | None = False) -> tuple[list[str], list[str], list[Spec]]:  # fmt: skip
    """``n`` prompts whose ``attribute`` is ``value`` (random other attributes and paraphrases), their altered twins."""
    check_attribute(attribute, value)
    rng = np.random.default_rng(seed)
    pool = [s for s in all_specs(held_out) if getattr(s, attribute) == value]
    if not pool:
        raise DiffusionError(f"no {'held-out' if held_out else ''} combination has {attribute}={value}")
    specs = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    templates = rng.integers(0, 4, n)
    variants = rng.integers(0, 2, n)
    alt_value = "plain" if attribute == "style" else altered_value(attribute, value)
    prompts = [caption(s, int(t), int(v)) for s, t, v in zip(specs, templates, variants)]
    alts = [caption(replace(s, **{attribute: alt_value}), int(t), int(v)) for s, t, v in zip(specs, templates, variants)]
    return prompts, alts, specs
