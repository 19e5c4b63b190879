"""A diffusers UNet is just another nn.Module: cross-attention K/V patches by glob, exact removal,
scoped application, and LoRA on named modules merged into a patch equal to peft's merge."""

from __future__ import annotations

import copy

import torch

from patchtrace.weights import WeightPatch, apply_state
from patchtrace.weights.lora import attach, merged_patch


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def test_unet_cross_attention_patch_and_lora():
    u = tiny_unet()
    base = {k: v.clone() for k, v in u.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    p = WeightPatch.extract(u, tuned, select="*attn2.to_[kv].weight")
    assert len(p.names) == 8 and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in p.names)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8)
    with torch.no_grad():
        clean = u(x, t, ctx).sample
        with p.applied(u):
            patched = u(x, t, ctx).sample
        assert not torch.allclose(patched, clean) and torch.equal(u(x, t, ctx).sample, clean)
        r = p.apply(u)
        assert torch.equal(u(x, t, ctx).sample, patched)
        p.remove(u, r)
    assert all(torch.equal(u.state_dict()[k], base[k]) for k in base)

    names = ["mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
    pm = attach(u, names, r=2, alpha=4)
    for _, m in pm.named_modules():  # give the adapters a non-zero update without training
        if hasattr(m, "lora_B") and "default" in m.lora_B:
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.5)
    assert {n for n, q in pm.named_parameters() if q.requires_grad} == {
        f"base_model.model.{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}
    lp = merged_patch(pm)
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    mine, _ = apply_state(lp, base)
    assert sorted(lp.names) == sorted(n + ".weight" for n in names)
    for n in merged:
        torch.testing.assert_close(mine[n], merged[n], rtol=0, atol=2e-6)
