"""Tiny random-weight Stable Diffusion 1.x-style and SDXL-style pipelines, built from configs (no download).

They exercise the adapters on the real diffusers pipeline classes — same call path, same guidance
layout, same prompt encoding — in a fraction of a second on CPU. The tokenizer is the small model's
word-level one (a real CLIP BPE tokenizer needs vocabulary files from the hub). The SDXL-style UNet
has 11 transformer blocks in its inner attention, so module-name order (``transformer_blocks.10``
before ``transformer_blocks.2``) differs from forward order, as it does in the real SDXL.
"""

from __future__ import annotations

from typing import Any


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


def _clip(hidden: int, projection: bool = False, layers: int = 2) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from patchtrace.diffusion.small.model import build_tokenizer

    cfg = CLIPTextConfig(
        vocab_size=len(build_tokenizer()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=hidden,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _unet(seed: int, **arch: Any) -> Any:
    """Seed torch, then build a tiny two-level ``UNet2DConditionModel`` in eval mode.

    The shape both UNet pipelines share (8×8 latents, 4 channels, widths 16/32, one plain and one
    cross-attention level) lives here; ``arch`` carries what differs between SD 1.x and SDXL.
    Seeding here, right before the UNet, keeps the weights identical to building it inline.
    """
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet: Any = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **arch,
    )
    return unet.eval()


def tiny_sd(seed: int = 0) -> Any:
    """A ``StableDiffusionPipeline`` with random tiny weights: 6 cross-attention layers, 16×16 images."""
    from diffusers import StableDiffusionPipeline

    from patchtrace.diffusion.small.model import build_tokenizer

    unet = _unet(seed, layers_per_block=2, cross_attention_dim=16, attention_head_dim=2)
    return StableDiffusionPipeline(
        vae=_vae().eval(),
        text_encoder=_clip(16),
        tokenizer=build_tokenizer(16),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl(seed: int = 0) -> Any:
    """A ``StableDiffusionXLPipeline`` with random tiny weights: two text encoders, pooled embeds, 44 layers."""
    from diffusers import StableDiffusionXLPipeline

    from patchtrace.diffusion.small.model import build_tokenizer

    unet = _unet(
        seed,
        layers_per_block=1,
        transformer_layers_per_block=(1, 11),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16,
        cross_attention_dim=24,
    )
    return StableDiffusionXLPipeline(
        vae=_vae().eval(),
        text_encoder=_clip(8),
        text_encoder_2=_clip(16, projection=True),
        tokenizer=build_tokenizer(16),
        tokenizer_2=build_tokenizer(16),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def tiny_sd3(seed: int = 0) -> Any:
    """A ``StableDiffusion3Pipeline`` with random tiny weights: 3 joint-attention (MMDiT) blocks, no T5."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from patchtrace.diffusion.small.model import build_tokenizer

    torch.manual_seed(seed)
    tr: Any = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
    )  # fmt: skip
    vae: Any = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    pipe: Any = StableDiffusion3Pipeline(
        transformer=tr.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
        text_encoder=_clip(16, projection=True), tokenizer=build_tokenizer(16),
        text_encoder_2=_clip(16, projection=True), tokenizer_2=build_tokenizer(16),
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
