"""Cross-attention discovery in forward order, scoped interventions, bit-exact identity, refusals."""

from __future__ import annotations

import pytest
import torch
from t2i_reference import call_order, swap_encoder_states

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter, cross_attention_layers
from patchtrace.diffusion.hooks import layer_states, neuron_values

PROMPTS = ["a red two on a white background", "a blue letter x on the left"]
ALT = ["a green four on a black background", "a yellow seven in a box"]


def _hooks_left(module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def _unet_inputs(pipe, family):
    unet = pipe.unet
    s, c = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(1, c, s, s, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 5, unet.config.cross_attention_dim)
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 16), "time_ids": torch.zeros(1, 6)}
    return x, ehs, kw


@pytest.mark.parametrize("which", ["sd", "sdxl", "small_random"])
def test_layers_in_forward_order(which, request):
    pipe = request.getfixturevalue(which)
    family = "sdxl" if which == "sdxl" else "sd"
    x, ehs, kw = _unet_inputs(pipe, family)
    truth = call_order(pipe.unet, x, torch.tensor(10), ehs, **kw)
    layers = cross_attention_layers(pipe.unet)
    assert [layer.name for layer in layers] == truth
    assert [layer.index for layer in layers] == list(range(len(truth)))
    for layer in layers:
        assert layer.text_dim == pipe.unet.config.cross_attention_dim
        assert layer.inner_dim == layer.attn.to_v.out_features == layer.heads * (layer.inner_dim // layer.heads)
    if which == "sdxl":  # the pitfall: sorting module names is not forward order
        assert sorted(truth) != truth
        assert len(layers) == 44


@pytest.mark.parametrize("which", ["sd", "sdxl", "small_random"])
def test_original_prompt_everywhere_is_bit_exact(which, request):
    pipe = request.getfixturevalue(which)
    a = T2IAdapter(pipe, steps=2)
    lat = a.latents([0, 1])
    plain = pipe(prompt=PROMPTS, latents=lat, num_inference_steps=2, guidance_scale=3.0, output_type="pt").images
    cond = a.encode(PROMPTS)
    with layer_states(a.layers, {j: cond.pos for j in range(a.n_layers)}):
        ours = a.generate(cond, lat)
    assert torch.equal(plain, ours)
    assert _hooks_left(pipe.unet) == 0


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_window_matches_naive_reference(which, request):
    pipe = request.getfixturevalue(which)
    a = T2IAdapter(pipe, steps=2)
    lat = a.latents([3, 4])
    orig, alt = a.encode(PROMPTS), a.encode(ALT)
    window = [1, 2, 3]
    with layer_states(a.layers, {j: alt.pos for j in window}):
        ours = a.generate(orig, lat)
    names = {a.layers[j].name: alt.pos for j in window}
    with swap_encoder_states(pipe.unet, names):
        ref = a.generate(orig, lat)
    plain = a.generate(orig, lat)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, plain)  # the window changed something: the comparison can fail


def test_unconditional_half_untouched(sd):
    a = T2IAdapter(sd, steps=1)
    orig, alt = a.encode(PROMPTS), a.encode(ALT)
    seen = []
    with layer_states(a.layers, {0: alt.pos}):  # the spy is registered after, so it sees what to_k reads
        h = a.layers[0].to_k.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        try:
            a.generate(orig, a.latents([0, 1]))
        finally:
            h.remove()
    assert torch.equal(seen[0][:2], orig.neg)  # unconditional rows: as the pipeline passed them
    assert torch.equal(seen[0][2:], alt.pos)  # conditional rows: replaced


def test_scoped_even_on_error(sd):
    a = T2IAdapter(sd, steps=1)
    cond = a.encode(PROMPTS)
    with pytest.raises(RuntimeError, match="boom"), layer_states(a.layers, {0: cond.pos}):
        assert _hooks_left(sd.unet) == 2
        raise RuntimeError("boom")
    assert _hooks_left(sd.unet) == 0
    idx = torch.tensor([0, 3])
    with neuron_values(a.layers, {(1, "k"): (idx, torch.zeros(cond.pos.shape[1], 2))}, n_cond=2):
        assert _hooks_left(sd.unet) == 1
    assert _hooks_left(sd.unet) == 0


def test_neuron_values_set_conditional_rows_only(sd):
    a = T2IAdapter(sd, steps=1)
    cond = a.encode(PROMPTS)
    idx = torch.tensor([0, 3])
    val = torch.full((cond.pos.shape[1], 2), 7.0)
    outs = []
    layer = a.layers[1]
    with neuron_values(a.layers, {(1, "k"): (idx, val)}, n_cond=2):
        h = layer.to_k.register_forward_hook(lambda m, args, o: outs.append((args[0], o)))
        try:
            a.generate(cond, a.latents([0, 1]))
        finally:
            h.remove()
    inp, out = outs[0]
    naive = inp @ layer.to_k.weight.T
    assert torch.all(out[2:, :, idx] == 7.0)
    keep = [i for i in range(out.shape[-1]) if i not in (0, 3)]
    assert torch.allclose(out[2:, :, keep], naive[2:, :, keep], atol=1e-6)
    assert torch.allclose(out[:2], naive[:2], atol=1e-6)


def test_refusals(sd):
    class KandinskyPipeline:
        unet = sd.unet

    with pytest.raises(DiffusionError, match="KandinskyPipeline"):
        T2IAdapter(KandinskyPipeline())
    from diffusers import UNet2DConditionModel

    flat = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None, layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16,
    )  # fmt: skip
    with pytest.raises(DiffusionError, match="no cross-attention"):
        cross_attention_layers(flat)
    a = T2IAdapter(sd, steps=1)
    with pytest.raises(DiffusionError, match="over the text encoder's limit of 16"):
        a.encode(["a red two " * 6])
    with pytest.raises(DiffusionError, match="layer 9 does not exist"), layer_states(a.layers, {9: torch.zeros(1)}):
        pass
