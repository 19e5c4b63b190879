"""How well the small model draws what it is asked, per attribute, and how an edit changes that.

``accuracy`` generates one image per (caption, seed) and asks the attribute classifiers: the share of
images whose predicted value is the prompted one, per attribute — on training combinations and on
held-out ones (:data:`~.data.HELD_OUT`). ``edit_report`` compares a LocoEdit patch's images with the
unedited model's on the concept's prompts (efficacy: the attribute is gone) and on other prompts
(specificity: everything else still drawn as prompted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchtrace.diffusion.adapters import T2IAdapter
from patchtrace.diffusion.small.data import ATTRIBUTES, Spec, caption


def generate_specs(adapter: T2IAdapter, specs: Sequence[Spec], seeds: Sequence[int], template: int | None = None,
                   max_rows: int = 128) -> Any:  # fmt: skip
    """Images ``(len(specs) * len(seeds), 3, H, W)``: spec-major, caption template cycling if None."""
    import torch

    caps = [caption(s, i % 4 if template is None else template, i % 2) for i, s in enumerate(specs)]
    rows = [(c, s) for c in range(len(caps)) for s in range(len(seeds))]
    cond = adapter.encode(caps)
    lat = adapter.latents(list(seeds))
    out = []
    for i in range(0, len(rows), max_rows):
        chunk = rows[i : i + max_rows]
        out.append(adapter.generate(cond.rows([c for c, _ in chunk]), lat[[s for _, s in chunk]]))
    return torch.cat(out)


def accuracy(adapter: T2IAdapter, scorer: Any, specs: Sequence[Spec], seeds: Sequence[int]) -> dict[str, float]:
    """Per attribute, the share of generated images whose classifier prediction is the prompted value."""
    imgs = generate_specs(adapter, specs, seeds)
    return score_images(scorer, imgs, specs, seeds)


def prompt_accuracy(adapter: T2IAdapter, scorer: Any, prompts: Sequence[str], specs: Sequence[Spec],
                    seeds: Sequence[int]) -> tuple[dict[str, float], Any]:  # fmt: skip
    """Per attribute, accuracy of images of explicit ``prompts`` against ``specs``; and the images."""
    cond = adapter.encode(list(prompts))
    P, S = len(prompts), len(seeds)
    imgs = adapter.generate(cond.rows([p for p in range(P) for _ in range(S)]), adapter.latents(list(seeds)).repeat(P, 1, 1, 1))
    return score_images(scorer, imgs, specs, seeds), imgs


def score_images(scorer: Any, imgs: Any, specs: Sequence[Spec], seeds: Sequence[int]) -> dict[str, float]:
    """Per attribute, the share of ``imgs`` (in [0, 1], spec-major then seed) the classifier reads as prompted."""
    out = {}
    for a in ATTRIBUTES:
        pred = scorer.predict(imgs * 2 - 1, a)
        want = [getattr(s, a) for s in specs for _ in seeds]
        out[a] = sum(p == w for p, w in zip(pred, want)) / len(want)
    return out
