"""Training-free editing of the glyph a model draws: patch the localized layers from step ``t_start``.

Once text localization (:mod:`.textloc`) has found the few layers that decide *which text* is drawn,
the paper (Staniszewski et al., ICLR 2025) edits the text of a generated image without any training:
run prompt A (``"a red two …"``) with the same noise, but let the localized layers read prompt B
(``"a red seven …"``) — only from denoising step ``t_start`` on. The first steps lay out the image
(background, position, colours) from A; the glyph is then drawn from B. ``t_start = 0`` writes B's
glyph most reliably but also lets B move the layout; a later start keeps more of A (the paper: step 4
of 50 for SDXL, 2 of 28 for SD3).

Success is the glyph classifier's agreement with B; preservation is the other attributes of A (their
classifiers) and the pixel similarity to A's own image (PSNR, SSIM). :func:`text_edit` gives one row
per ``t_start``. UNets (cross-attention, :class:`~.adapters.T2IAdapter`) patch the text states the
layers' ``to_k``/``to_v`` read; joint-attention pipelines use :func:`.joint.text_patch_generate`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from patchtrace.diffusion.adapters import CrossAttnLayer, DiffusionError, T2IAdapter
from patchtrace.diffusion.hooks import _cond_rows


def glyph_pairs(glyph_a: str, glyph_b: str, n: int, seed: int = 0,
                held_out: bool | None = False) -> tuple[list[str], list[str], list[Any]]:  # fmt: skip
    """``n`` prompt pairs A/B that differ only in the glyph (same template, other attributes random)."""
    from patchtrace.diffusion.small.data import caption
    from patchtrace.diffusion.small.prompts import attribute_prompts, check_attribute

    check_attribute("glyph", glyph_a)
    check_attribute("glyph", glyph_b)
    _, _, specs = attribute_prompts("glyph", glyph_a, n, seed=seed, held_out=held_out)
    pa = [caption(s, i % 4, i % 2) for i, s in enumerate(specs)]
    pb = [caption(replace(s, glyph=glyph_b), i % 4, i % 2) for i, s in enumerate(specs)]
    return pa, pb, specs


def check_sites(pipe: Any, layers: Sequence[int], pooled: bool = False) -> None:
    """Refuse, before any image is drawn, a layer the pipeline does not have, or the pooled site on a
    pipeline without one (only joint-attention transformers feed a pooled text embedding to their blocks)."""
    from patchtrace.diffusion.joint import joint_layers, pooled_projection

    if pooled:
        pooled_projection(pipe)  # refuses a pipeline without one
    if hasattr(pipe, "transformer"):
        n = len(joint_layers(pipe))
    else:
        from patchtrace.diffusion.adapters import cross_attention_layers

        n = len(cross_attention_layers(pipe.unet))
    bad = [j for j in layers if not 0 <= j < n]
    if bad:
        raise DiffusionError(f"layer {bad[0]} does not exist (the model has {n} text-attention layers)")


def check_t_start(t_start: int, steps: int) -> None:
    """Refuse a ``t_start`` outside the scheduler's steps (names both)."""
    if not 0 <= t_start < steps:
        raise DiffusionError(f"t_start {t_start} is beyond the scheduler's {steps} steps (0 … {steps - 1})")


@contextmanager
def layer_states_from(unet: Any, layers: list[CrossAttnLayer], states: Mapping[int, Any], t_start: int) -> Iterator[None]:
    """Like :func:`.hooks.layer_states`, but only from the ``t_start``-th UNet call (denoising step) on.

    One UNet call per step holds both guidance halves, so the call count is the step index.
    """
    step = [-1]
    handles = [unet.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))]
    try:
        for j, st in states.items():
            if not 0 <= j < len(layers):
                raise DiffusionError(f"cross-attention layer {j} does not exist (the UNet has {len(layers)})")
            attn = layers[j].attn
            if getattr(attn, "norm_cross", None) is not None:
                st = attn.norm_encoder_hidden_states(st)

            def pre(module: Any, args: tuple, st: Any = st) -> tuple | None:
                if step[0] < t_start:
                    return None
                x = args[0].clone()
                x[_cond_rows(x.shape[0], st.shape[0])] = st.to(x.dtype)
                return (x, *args[1:])

            handles += [layers[j].to_k.register_forward_pre_hook(pre), layers[j].to_v.register_forward_pre_hook(pre)]
        yield
    finally:
        for h in handles:
            h.remove()


def score_edit(scorer: Any, images: Any, images_a: Any, specs: Sequence[Any], glyph_b: str, seeds_per: int) -> dict[str, float]:
    """Success (glyph == B), preservation (A's other attributes), PSNR and SSIM to A's images."""

    from patchtrace.diffusion.small.data import ATTRIBUTES
    from patchtrace.diffusion.textloc import psnr, ssim

    rows = [s for s in specs for _ in range(seeds_per)]
    x = images * 2 - 1
    success = sum(p == glyph_b for p in scorer.predict(x, "glyph")) / len(rows)
    others = [a for a in ATTRIBUTES if a != "glyph"]
    keep = sum(sum(p == getattr(s, a) for p, s in zip(scorer.predict(x, a), rows)) for a in others)
    return {"success": success, "preserve": keep / (len(rows) * len(others)),
            "psnr": psnr(images, images_a),
            "ssim": float(ssim(images, images_a).mean())}  # fmt: skip


def patched_images(pipe: Any, prompts_a: Sequence[str], prompts_b: Sequence[str], layers: Sequence[int], t_start: int,
                   seeds: Sequence[int], steps: int, guidance: float = 3.0, pooled: bool = False) -> Any:  # fmt: skip
    """Images of A with ``layers`` reading B from ``t_start`` (rows prompt-major × seeds), any supported pipeline.

    ``pooled`` (joint-attention pipelines only): B's pooled text embedding is written in from ``t_start`` too."""
    import torch

    check_t_start(t_start, steps)
    pa, pb, seeds = list(prompts_a), list(prompts_b), list(seeds)
    if len(pa) != len(pb):
        raise DiffusionError(f"{len(pa)} A prompts but {len(pb)} B prompts")
    check_sites(pipe, layers, pooled)
    if hasattr(pipe, "transformer"):
        from patchtrace.diffusion.joint import text_patch_generate

        lat = _noise(pipe.transformer.config, seeds).repeat(len(pa), 1, 1, 1)
        ra = [p for p in pa for _ in seeds]
        rb = [p for p in pb for _ in seeds]
        return text_patch_generate(pipe, ra, rb, list(layers), t_start, steps, guidance, lat, pooled=pooled)
    a = T2IAdapter(pipe, steps=steps, guidance=guidance)
    idx = [p for p in range(len(pa)) for _ in seeds]
    ca, cb = a.encode(pa).rows(idx), a.encode(pb).rows(idx)
    lat = a.latents(seeds).repeat(len(pa), 1, 1, 1)
    with torch.no_grad(), layer_states_from(pipe.unet, a.layers, {j: cb.pos for j in layers}, t_start):
        return a.generate(ca, lat)


def _noise(config: Any, seeds: Sequence[int]) -> Any:
    import torch

    shape = (config.in_channels, config.sample_size, config.sample_size)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def text_edit(pipe: Any, scorer: Any, glyph_a: str, glyph_b: str, layers: Sequence[int], t_starts: Sequence[int],
              n: int = 4, seeds: Sequence[int] = (0, 1), steps: int = 10, guidance: float = 3.0,
              pooled: bool = False) -> dict[str, Any]:  # fmt: skip
    """One row per ``t_start`` (success, preservation, PSNR, SSIM), plus plain A and plain B, with images.
    ``pooled``: also patch B's pooled text embedding (joint-attention pipelines; it may be the only site).

    Raises:
        DiffusionError: an unknown glyph, a ``t_start`` outside ``0 … steps-1``, a layer that does not exist.
    """
    pa, pb, specs = glyph_pairs(glyph_a, glyph_b, n)
    for t in t_starts:
        check_t_start(t, steps)
    check_sites(pipe, layers, pooled)  # before plain A and B are drawn
    seeds = list(seeds)
    plain_a = patched_images(pipe, pa, pa, [], 0, seeds, steps, guidance)
    plain_b = patched_images(pipe, pb, pb, [], 0, seeds, steps, guidance)
    rows, images = [], [plain_a, plain_b]
    for name, img in (("plain A", plain_a), ("plain B", plain_b)):
        rows.append({"t_start": name, **score_edit(scorer, img, plain_a, specs, glyph_b, len(seeds))})
    for t in t_starts:
        img = patched_images(pipe, pa, pb, layers, t, seeds, steps, guidance, pooled)
        rows.append({"t_start": t, **score_edit(scorer, img, plain_a, specs, glyph_b, len(seeds))})
        images.append(img)
    return {"rows": rows, "images": images, "prompts_a": pa, "prompts_b": pb, "layers": list(layers), "pooled": pooled}
