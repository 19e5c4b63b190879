"""Text localization per layer: the layer patch equals a naive one; SSIM and the parameter fraction."""

from __future__ import annotations

import pytest
import torch
from t2i_reference import swap_encoder_states

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.textloc import param_fraction, ssim, text_localization

A, B = ["a red two on a white background"], ["a red seven on a white background"]


def test_per_layer_against_naive(sd):
    a = T2IAdapter(sd, steps=1)
    mean_green = lambda im, i: im[:, 1].mean((1, 2))  # noqa: E731
    r = text_localization(a, A, B, mean_green, seeds=[0])
    ea, eb = a.encode(A), a.encode(B)
    with swap_encoder_states(sd.unet, {a.layers[3].name: eb.pos}):
        ref = a.generate(ea, a.latents([0]))
    assert r["agree_b"][3] == pytest.approx(float(mean_green(ref, None)), abs=1e-6)
    assert r["mse"][3] == pytest.approx(float(((ref - r["images_a"]) ** 2).mean()), abs=1e-7)
    assert r["agree_b"].shape == (6,)


def test_ssim_and_fraction(sd):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert float(ssim(x, 1 - x).mean()) < 0.5
    a = T2IAdapter(sd, steps=1)
    total = sum(p.numel() for p in sd.unet.parameters())
    n0 = sum(p.numel() for p in a.layers[0].attn.parameters())
    assert param_fraction(a, [0]) == pytest.approx(n0 / total)
    with pytest.raises(DiffusionError, match="no glyph scorer"):
        text_localization(a, A, B, None)
