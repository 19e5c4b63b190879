"""The small joint-attention (SD3-style MMDiT) model's parts: text encoder and ``SD3Transformer2DModel``.

Built from configs in code (no download). The transformer is diffusers' ``SD3Transformer2DModel``
working directly on ``16×16`` RGB pixels with patch size 2 (64 image tokens) and a text stream of
:data:`~patchtrace.diffusion.small.model.MAX_LEN` tokens from a small ``CLIPTextModelWithProjection``
(its per-token states are the joint-attention context, its pooled projection the ``pooled_projections``
that enter through the time embedding, as in SD3). Every block attends jointly over image and text
tokens, so the text stream *evolves* through the blocks — the reason joint attention needs per-layer,
per-step text K/V caching (:mod:`patchtrace.diffusion.joint`) rather than LocoGen's prompt swap.

The tokenizer and the noise schedule are the small UNet model's (:mod:`patchtrace.diffusion.small.model`),
so both architectures see the same words, the same data and the same schedule.
"""

from __future__ import annotations

from typing import Any

from patchtrace.diffusion.small.data import ATTRIBUTES, SIZE
from patchtrace.diffusion.small.model import MAX_LEN

WIDTH = 64
#: transformer shape: 6 joint-attention blocks of 4 heads × 16
ARCH: dict[str, Any] = {"num_layers": 6, "heads": 4, "head_dim": 16, "patch_size": 2}


def build_text_encoder(vocab_size: int) -> Any:
    """A 2-layer ``CLIPTextModelWithProjection`` (width 64), randomly initialized."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LEN, projection_dim=WIDTH,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    return CLIPTextModelWithProjection(cfg)


def build_transformer(arch: dict[str, Any] = ARCH) -> Any:
    """The pixel-space ``SD3Transformer2DModel`` (about 0.5 M parameters), randomly initialized."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=SIZE, patch_size=arch["patch_size"], in_channels=3, out_channels=3,
        num_layers=arch["num_layers"], attention_head_dim=arch["head_dim"], num_attention_heads=arch["heads"],
        joint_attention_dim=WIDTH, caption_projection_dim=arch["heads"] * arch["head_dim"],
        pooled_projection_dim=WIDTH, pos_embed_max_size=SIZE // arch["patch_size"],
    )  # fmt: skip


def build_aux_heads() -> Any:
    """Training-only linear heads: every attribute's value from the text encoder's pooled output.

    Issue 12's diagnosis was that a text encoder trained only through the denoising loss barely
    separates the glyph words (11% of its output moves when the glyph word changes, against 76% for the
    colour word). These heads make the pooled text state name every attribute, the glyph included.
    """
    from torch import nn

    return nn.ModuleDict({a: nn.Linear(WIDTH, len(v)) for a, v in ATTRIBUTES.items()})
