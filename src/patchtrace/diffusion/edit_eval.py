"""Efficacy and specificity of a LocoEdit patch on the small model (the paper's two questions).

- **efficacy**: on fresh prompts stating the edited attribute (all paraphrase templates, other
  attributes random), the share of images that still show it — before and after the edit;
- **specificity**: on the same prompts, the accuracy of every *other* attribute; and on unrelated
  prompts (the attribute set to other values), the accuracy of every attribute — before and after.

The patch is applied with :meth:`WeightPatch.applied` (scoped, bit-exact restore), so the pipeline is
unchanged afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchtrace.diffusion.adapters import T2IAdapter


def _unrelated(attribute: str, value: str, n: int, seed: int) -> tuple[list[str], list[Any]]:
    import numpy as np

    from patchtrace.diffusion.small.data import all_specs, caption

    rng = np.random.default_rng(seed)
    pool = [s for s in all_specs(False) if getattr(s, attribute) != value]
    specs = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    return [caption(s, int(t), int(v)) for s, t, v in zip(specs, rng.integers(0, 4, n), rng.integers(0, 2, n))], specs


def evaluate_edit(adapter: T2IAdapter, scorer: Any, patch: Any, attribute: str, value: str,
                  seeds: Sequence[int], n: int = 12, seed: int = 11) -> dict[str, Any]:  # fmt: skip
    """Before/after numbers of the edit (see module docstring); ``n`` prompts per set."""
    from patchtrace.diffusion.small.evaluate import prompt_accuracy
    from patchtrace.diffusion.small.prompts import attribute_prompts

    concept, _, specs = attribute_prompts(attribute, value, n, seed=seed)
    other, other_specs = _unrelated(attribute, value, n, seed + 1)
    seeds = list(seeds)

    def measure() -> tuple[dict[str, float], dict[str, float]]:
        acc_c, _ = prompt_accuracy(adapter, scorer, concept, specs, seeds)
        acc_o, _ = prompt_accuracy(adapter, scorer, other, other_specs, seeds)
        return acc_c, acc_o

    before_c, before_o = measure()
    with patch.applied(adapter.pipe.unet):
        after_c, after_o = measure()
    others = [a for a in before_c if a != attribute]

    def mean(d: dict[str, float], keys: Sequence[str]) -> float:
        return round(sum(d[k] for k in keys) / len(keys), 4)

    return {
        "attribute": f"{attribute}={value}",
        "layers": patch.meta.get("layers"),
        "concept_shows_attribute_before": before_c[attribute],
        "concept_shows_attribute_after": after_c[attribute],
        "efficacy": round(before_c[attribute] - after_c[attribute], 4),
        "concept_other_attributes_before": mean(before_c, others),
        "concept_other_attributes_after": mean(after_c, others),
        "unrelated_all_attributes_before": mean(before_o, list(before_o)),
        "unrelated_all_attributes_after": mean(after_o, list(after_o)),
        "specificity_drop": round(mean(before_o, list(before_o)) - mean(after_o, list(after_o)), 4),
        "per_attribute_after_concept": after_c,
        "per_attribute_after_unrelated": after_o,
    }
