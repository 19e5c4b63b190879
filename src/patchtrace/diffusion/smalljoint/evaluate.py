"""How well the small joint-attention model draws what it is asked, per attribute (same scorers as the UNet's)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchtrace.diffusion.small.data import Spec, caption
from patchtrace.diffusion.small.evaluate import score_images


def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int = 10, guidance: float = 3.0) -> Any:
    """Images ``(len(prompts) * len(seeds), 3, 16, 16)`` in [0, 1], prompt-major, one noise per seed."""
    import torch

    cfg = pipe.transformer.config
    noise = torch.stack([torch.randn((cfg.in_channels, cfg.sample_size, cfg.sample_size),
                                     generator=torch.Generator().manual_seed(s)) for s in seeds])  # fmt: skip
    rows = [p for p in prompts for _ in seeds]
    return pipe(rows, num_inference_steps=steps, guidance_scale=guidance, latents=noise.repeat(len(prompts), 1, 1, 1)).images


def accuracy(pipe: Any, scorer: Any, specs: Sequence[Spec], seeds: Sequence[int], steps: int = 10) -> dict[str, float]:
    """Per attribute, the share of images whose classifier prediction is the prompted value (templates cycle)."""
    prompts = [caption(s, i % 4, i % 2) for i, s in enumerate(specs)]
    imgs = generate(pipe, prompts, seeds, steps)
    return score_images(scorer, imgs, specs, seeds)
