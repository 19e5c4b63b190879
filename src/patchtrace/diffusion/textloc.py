"""Which single layer decides the glyph a model draws (Staniszewski et al., ICLR 2025, on cross-attention UNets).

Prompt A asks for one glyph, prompt B (same template) for another. With the same noise, patch one
cross-attention layer at a time: that layer reads B's text states, every other layer A's. A layer
*localizes the text* when the image now shows B's glyph (the glyph classifier agrees with B) while
everything else of A's image is preserved (the other attributes' classifiers, pixel MSE/PSNR and SSIM
to A's image). The localized layers' share of the model's parameters is the paper's headline number
(SDXL: 3 of 70 layers, 0.61%). For joint-attention models see :mod:`patchtrace.diffusion.joint`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.hooks import layer_states


def ssim(x: Any, y: Any, c1: float = 0.01**2, c2: float = 0.03**2) -> Any:
    """Mean SSIM per image of ``(n, C, H, W)`` images in [0, 1] (3×3 uniform windows)."""
    import torch.nn.functional as F

    def mu(t: Any) -> Any:
        return F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)

    mx, my = mu(x), mu(y)
    vx, vy, cxy = mu(x * x) - mx**2, mu(y * y) - my**2, mu(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def param_fraction(adapter: T2IAdapter, layers: Sequence[int]) -> float:
    """Parameters of the given cross-attention modules over all UNet parameters."""
    total = sum(p.numel() for p in adapter.pipe.unet.parameters())
    return sum(p.numel() for j in layers for p in adapter.layers[j].attn.parameters()) / total


def text_localization(adapter: T2IAdapter, prompts_a: Sequence[str], prompts_b: Sequence[str],
                      agree_b: Callable[[Any, Any], Any] | None, preserve: Callable[[Any, Any], Any] | None = None,
                      seeds: Sequence[int] = (0,)) -> dict[str, Any]:  # fmt: skip
    """Per cross-attention layer: agreement with B, preservation of A (classifiers, MSE, PSNR, SSIM).

    ``agree_b(images, prompt_index)`` scores B's glyph; ``preserve(images, prompt_index)`` (optional)
    scores A's other attributes. Returns a dict of per-layer tensors and A's/B's own images.
    """
    import torch

    if agree_b is None:
        raise DiffusionError("no glyph scorer given: pass agree_b (the glyph classifier's agreement with B)")
    pa, pb, seeds = list(prompts_a), list(prompts_b), list(seeds)
    if len(pa) != len(pb):
        raise DiffusionError(f"{len(pa)} A prompts but {len(pb)} B prompts")
    ea, eb = adapter.encode(pa), adapter.encode(pb)
    P, S = len(pa), len(seeds)
    idx = [p for p in range(P) for _ in range(S)]
    lat = adapter.latents(seeds).repeat(P, 1, 1, 1)
    ca, cb = ea.rows(idx), eb.rows(idx)
    img_a, img_b = adapter.generate(ca, lat), adapter.generate(cb, lat)
    pidx = torch.tensor(idx)
    rows: dict[str, list[float]] = {"agree_b": [], "preserve": [], "mse": [], "psnr": [], "ssim": []}
    for j in range(adapter.n_layers):
        with layer_states(adapter.layers, {j: cb.pos}):
            img = adapter.generate(ca, lat)
        mse = ((img - img_a) ** 2).flatten(1).mean(1)
        rows["agree_b"].append(float(agree_b(img, pidx).float().mean()))
        rows["preserve"].append(float(preserve(img, pidx).float().mean()) if preserve else float("nan"))
        rows["mse"].append(float(mse.mean()))
        rows["psnr"].append(float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()))
        rows["ssim"].append(float(ssim(img, img_a).mean()))
    out: dict[str, Any] = {k: torch.tensor(v) for k, v in rows.items()}
    out["agree_b_plain_a"] = float(agree_b(img_a, pidx).float().mean())
    out["agree_b_plain_b"] = float(agree_b(img_b, pidx).float().mean())
    out["images_a"], out["images_b"] = img_a, img_b
    return out
