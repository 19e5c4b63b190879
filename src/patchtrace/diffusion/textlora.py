"""LoRA on the localized layers only, against LoRA on every attention layer, to draw the glyph better.

The paper (Staniszewski et al., ICLR 2025) fine-tunes a text-to-image model for text rendering with
LoRA attached only to the few layers text localization found (SDXL: 3 of 70 cross-attention layers)
and matches LoRA on every attention layer at a fraction of the trainable parameters. Here, on the
small UNet model: LoRA (peft, through :func:`patchtrace.weights.lora.train_lora` by full module names)
on ``to_q``/``to_k``/``to_v``/``to_out.0`` of

- **localized**: the localized cross-attention layers only, or
- **all**: every attention module of the UNet (self- and cross-attention),

trained with the small models' denoising loss (x0 prediction, the glyph's frame weighted), the text
encoder frozen. The same two arms exist on the small joint-attention model (:mod:`.smalljoint`), over
both streams' projections of its blocks' attention. Both are scored on *hard prompts* — the held-out
(glyph, colour) combinations the base model never saw — and on training combinations: glyph accuracy,
the other attributes' accuracy (preservation), trainable parameters and wall time. Each run ends as a
merged :class:`~patchtrace.weights.patch.WeightPatch`; the network itself is left exactly as it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.joint import POOLED_PROJECTION, pooled_projection

PROJ = ("to_q", "to_k", "to_v", "to_out.0")
#: a joint-attention block's text-stream projections (the last block has no ``to_add_out``)
JOINT_PROJ = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ARMS = ("localized", "all")


def _pipe(model: Any) -> Any:
    return model.pipe if isinstance(model, T2IAdapter) else model


#: the pooled text projection of an SD3-style transformer (its adaptive-norm text path)
POOLED_PROJ = (f"{POOLED_PROJECTION}.linear_1", f"{POOLED_PROJECTION}.linear_2")


def lora_modules(model: Any, arm: str, layers: Sequence[int] = (), pooled: bool = False) -> list[str]:
    """Full module names of the projections LoRA goes on, for arm ``localized`` (needs ``layers`` or
    ``pooled``) or ``all``.

    ``model`` is a :class:`~.adapters.T2IAdapter` (UNet: ``to_q/to_k/to_v/to_out.0`` of cross-attention
    layers) or a joint-attention pipeline (the blocks' attention: both streams' projections; with
    ``pooled`` in the localized arm, also the pooled text projection's two linear layers).
    """
    if arm not in ARMS:
        raise DiffusionError(f"LoRA arm {arm!r} is not one of {list(ARMS)}")
    pipe = _pipe(model)
    joint = hasattr(pipe, "transformer")
    proj: tuple[str, ...]
    if joint:
        from patchtrace.diffusion.joint import joint_layers

        names, proj = [la.name for la in joint_layers(pipe)], PROJ + JOINT_PROJ
    else:
        names, proj = [la.name for la in model.layers], PROJ
    if pooled:
        pooled_projection(pipe)  # refuses a pipeline without one
    if arm == "localized":
        if not layers and not pooled:
            raise DiffusionError("arm 'localized' needs the localized layers (e.g. from `patchtrace t2i textloc`)")
        for j in layers:
            if not 0 <= j < len(names):
                raise DiffusionError(f"layer {j} does not exist (the model has {len(names)} text-attention layers)")
        picked = [names[j] for j in sorted(set(layers))]
    else:
        root = pipe.transformer if joint else pipe.unet
        picked = [n for n, m in root.named_modules() if type(m).__name__ == "Attention"]
    mods = dict((pipe.transformer if joint else pipe.unet).named_modules())
    extra = list(POOLED_PROJ) if pooled and arm == "localized" else []
    return [f"{n}.{p}" for n in picked for p in proj if f"{n}.{p}" in mods] + extra


def make_batches(steps: int, batch: int, seed: int) -> list[tuple[Any, list[str], Any]]:
    """``steps`` seeded batches ``(x0, captions, positions)`` of training combinations, unjittered renders as
    both small models are trained on (10% empty captions for guidance)."""
    import numpy as np
    import torch

    from patchtrace.diffusion.small import data

    rng = np.random.default_rng(seed)
    specs = data.all_specs(held_out=False)
    out = []
    for _ in range(steps):
        x, caps, labels = data.sample_batch(rng, batch, specs, jitter=False)
        drop = rng.random(len(caps)) < 0.1
        out.append((torch.from_numpy(x), ["" if d else c for c, d in zip(caps, drop)], labels["position"]))
    return out


def denoise_loss(pipe: Any, region_weight: float = 10.0, seed: int = 0) -> Any:
    """The small models' denoising loss for LoRA: x0 prediction, the glyph's frame rectangle weighted
    ``region_weight``× (ink or not: issue 12 found an ink-only weight biased toward glyph-coloured blobs)."""
    import torch

    from patchtrace.diffusion.small.model import build_scheduler
    from patchtrace.diffusion.small.train import _region_mask

    alphas = build_scheduler("ddpm").alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    joint = hasattr(pipe, "transformer")

    def loss_fn(model: Any, batch: Any) -> Any:
        x0, caps, positions = batch
        with torch.no_grad():
            cond, pooled = pipe.encode(caps) if joint else (pipe.encode_prompt(caps, pipe.unet.device, 1, False)[0], None)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
        if joint:
            pred = model(xt, encoder_hidden_states=cond, pooled_projections=pooled, timestep=t).sample
        else:
            pred = model(xt, t, encoder_hidden_states=cond).sample
        w = 1 + (region_weight - 1) * _region_mask(positions)
        return (((pred - x0) ** 2) * w).mean()

    return loss_fn


def accuracy_sets(model: Any, scorer: Any, seeds: Sequence[int], n: int = 24, seed: int = 3) -> dict[str, Any]:
    """Per-attribute accuracy on ``n`` hard (held-out) and ``n`` training combinations, and the images."""
    import numpy as np

    from patchtrace.diffusion.small.data import ATTRIBUTES, all_specs, caption
    from patchtrace.diffusion.small.evaluate import prompt_accuracy

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, held in (("hard", True), ("train", False)):
        pool = all_specs(held)
        specs = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
        prompts = [caption(s, i % 4, i % 2) for i, s in enumerate(specs)]
        if isinstance(model, T2IAdapter):
            acc, imgs = prompt_accuracy(model, scorer, prompts, specs, list(seeds))
        else:
            from patchtrace.diffusion.smalljoint.evaluate import generate

            imgs = generate(model, prompts, list(seeds))
            acc = {a: sum(p == getattr(s, a) for p, s in zip(scorer.predict(imgs * 2 - 1, a), [s for s in specs for _ in seeds]))
                   / imgs.shape[0] for a in ATTRIBUTES}  # fmt: skip
        out[name], out[f"{name}_images"] = acc, imgs
    return out


def text_lora(adapter: Any, scorer: Any, arm: str, layers: Sequence[int] = (), steps: int = 100,
              lr: float = 1e-3, rank: int = 4, batch: int = 32, seed: int = 0, seeds: Sequence[int] = (0, 1),
              n_eval: int = 24, pooled: bool = False) -> dict[str, Any]:  # fmt: skip
    """Train one arm, then score it against the unchanged model: accuracies, trainable parameters, time.
    ``pooled``: the localized arm includes the pooled text projection (joint-attention pipelines).

    Raises:
        DiffusionError: an unknown arm, no layers for ``localized``, a layer that does not exist, steps < 1.
    """
    from patchtrace.weights.lora import train_lora

    names = lora_modules(adapter, arm, layers, pooled)
    if steps < 1:
        raise DiffusionError(f"LoRA steps {steps}: need at least 1")
    pipe = _pipe(adapter)
    net = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    batches = make_batches(steps, batch, seed)
    t0 = time.perf_counter()
    run = train_lora(net, names, batches, denoise_loss(pipe, seed=seed), steps, lr=lr, r=rank, alpha=float(rank), seed=seed)
    seconds = time.perf_counter() - t0
    net.eval()
    with run.patch.applied(net):
        after = accuracy_sets(adapter, scorer, seeds, n_eval)
    where: Any = (list(layers) + (["pooled"] if pooled else [])) if arm == "localized" else "all attention"
    return {"arm": arm, "layers": where, "modules": len(names),
            "steps": steps, "lr": lr, "rank": rank, "batch": batch,
            "trainable": run.trainable, "total": run.total, "trainable_fraction": run.trainable / run.total,
            "seconds": round(seconds, 1), "loss_first": run.losses[0], "loss_last": sum(run.losses[-10:]) / min(10, len(run.losses)),
            "after": after, "patch": run.patch}  # fmt: skip
