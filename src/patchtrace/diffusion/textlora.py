"""LoRA on the localized layers only, against LoRA on every attention layer, to draw the glyph better.

The paper (Staniszewski et al., ICLR 2025) fine-tunes a text-to-image model for text rendering with
LoRA attached only to the few layers text localization found (SDXL: 3 of 70 cross-attention layers)
and matches LoRA on every attention layer at a fraction of the trainable parameters. Here, on the
small UNet model: LoRA (peft, through :func:`patchtrace.weights.lora.train_lora` by full module names)
on ``to_q``/``to_k``/``to_v``/``to_out.0`` of

- **localized**: the localized cross-attention layers only, or
- **all**: every attention module of the UNet (self- and cross-attention),

trained with the small model's own denoising loss (x0 prediction, glyph/box pixels weighted), the text
encoder frozen. Scored on *hard prompts* — the held-out (glyph, colour) combinations the base model
never saw — and on training combinations: glyph accuracy, the other attributes' accuracy
(preservation), trainable parameters and wall time. Each run ends as a merged
:class:`~patchtrace.weights.patch.WeightPatch`; the UNet itself is left exactly as it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter

PROJ = ("to_q", "to_k", "to_v", "to_out.0")
ARMS = ("localized", "all")


def lora_modules(adapter: T2IAdapter, arm: str, layers: Sequence[int] = ()) -> list[str]:
    """Full module names of the projections LoRA goes on, for arm ``localized`` (needs ``layers``) or ``all``."""
    if arm not in ARMS:
        raise DiffusionError(f"LoRA arm {arm!r} is not one of {list(ARMS)}")
    if arm == "localized":
        if not layers:
            raise DiffusionError("arm 'localized' needs the localized layers (e.g. from `patchtrace t2i textloc`)")
        for j in layers:
            if not 0 <= j < adapter.n_layers:
                raise DiffusionError(f"cross-attention layer {j} does not exist (the UNet has {adapter.n_layers})")
        return [f"{adapter.layers[j].name}.{p}" for j in sorted(set(layers)) for p in PROJ]
    unet = adapter.pipe.unet
    attns = [n for n, m in unet.named_modules() if type(m).__name__ == "Attention"]
    return [f"{n}.{p}" for n in attns for p in PROJ]


def make_batches(steps: int, batch: int, seed: int) -> list[tuple[Any, list[str]]]:
    """``steps`` seeded batches ``(x0, captions)`` of training combinations (10% empty captions for guidance)."""
    import numpy as np
    import torch

    from patchtrace.diffusion.small import data

    rng = np.random.default_rng(seed)
    specs = data.all_specs(held_out=False)
    out = []
    for _ in range(steps):
        x, caps, _ = data.sample_batch(rng, batch, specs)
        drop = rng.random(len(caps)) < 0.1
        out.append((torch.from_numpy(x), ["" if d else c for c, d in zip(caps, drop)]))
    return out


def denoise_loss(pipe: Any, fg_weight: float = 20.0, seed: int = 0) -> Any:
    """The small model's training loss for LoRA: x0 prediction, foreground pixels weighted ``fg_weight``×."""
    import torch

    from patchtrace.diffusion.small.model import build_scheduler

    alphas = build_scheduler("ddpm").alphas_cumprod
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(model: Any, batch: Any) -> Any:
        x0, caps = batch
        with torch.no_grad():
            cond, _ = pipe.encode_prompt(caps, pipe.unet.device, 1, False)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
        pred = model(xt, t, encoder_hidden_states=cond).sample
        fg = ((x0 - x0[..., :1, :1]).abs().sum(1, keepdim=True) > 0.01).float()
        return (((pred - x0) ** 2) * (1 + (fg_weight - 1) * fg)).mean()

    return loss_fn


def accuracy_sets(adapter: T2IAdapter, scorer: Any, seeds: Sequence[int], n: int = 24, seed: int = 3) -> dict[str, Any]:
    """Per-attribute accuracy on ``n`` hard (held-out) and ``n`` training combinations, and the images."""
    import numpy as np

    from patchtrace.diffusion.small.data import all_specs, caption
    from patchtrace.diffusion.small.evaluate import prompt_accuracy

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, held in (("hard", True), ("train", False)):
        pool = all_specs(held)
        specs = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
        prompts = [caption(s, i % 4, i % 2) for i, s in enumerate(specs)]
        acc, imgs = prompt_accuracy(adapter, scorer, prompts, specs, list(seeds))
        out[name], out[f"{name}_images"] = acc, imgs
    return out


def text_lora(adapter: T2IAdapter, scorer: Any, arm: str, layers: Sequence[int] = (), steps: int = 100,
              lr: float = 1e-3, rank: int = 4, batch: int = 32, seed: int = 0, seeds: Sequence[int] = (0, 1),
              n_eval: int = 24) -> dict[str, Any]:  # fmt: skip
    """Train one arm, then score it against the unchanged model: accuracies, trainable parameters, time.

    Raises:
        DiffusionError: an unknown arm, no layers for ``localized``, a layer that does not exist, steps < 1.
    """
    from patchtrace.weights.lora import train_lora

    names = lora_modules(adapter, arm, layers)
    if steps < 1:
        raise DiffusionError(f"LoRA steps {steps}: need at least 1")
    unet = adapter.pipe.unet
    t0 = time.perf_counter()
    run = train_lora(unet, names, make_batches(steps, batch, seed), denoise_loss(adapter.pipe, seed=seed), steps,
                     lr=lr, r=rank, alpha=float(rank), seed=seed)  # fmt: skip
    seconds = time.perf_counter() - t0
    unet.eval()
    with run.patch.applied(unet):
        after = accuracy_sets(adapter, scorer, seeds, n_eval)
    return {"arm": arm, "layers": list(layers) if arm == "localized" else "all attention", "modules": len(names),
            "trainable": run.trainable, "total": run.total, "trainable_fraction": run.trainable / run.total,
            "seconds": round(seconds, 1), "loss_first": run.losses[0], "loss_last": sum(run.losses[-10:]) / min(10, len(run.losses)),
            "after": after, "patch": run.patch}  # fmt: skip
