"""The small text-to-image model's parts: word-level tokenizer, CLIP text encoder, pixel-space UNet.

Everything is built from a config in code (no download), so the recipe in
:mod:`patchtrace.diffusion.small.train` reproduces the committed weights from nothing. The UNet is
diffusers' ``UNet2DConditionModel`` working directly on ``16×16`` RGB pixels (no VAE) with
cross-attention to the text encoder's states at the 8×8 and 4×4 resolutions: 7 cross-attention
layers in forward order (2 down, 1 mid, 4 up) — enough layers for LocoGen windows to mean something,
small enough to train on two CPU cores.
"""

from __future__ import annotations

from typing import Any

from patchtrace.diffusion.small.data import SIZE, vocabulary

#: special tokens; ids 0..3. EOS is not id 2, so CLIP pools at the EOS token (not argmax of ids)
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
MAX_LEN = 20
TEXT_DIM = 64


def build_tokenizer(max_len: int = MAX_LEN) -> Any:
    """A word-level fast tokenizer over the captions' vocabulary, padding to :data:`MAX_LEN`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in vocabulary():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_len,
    )


def build_text_encoder(vocab_size: int) -> Any:
    """A 3-layer ``CLIPTextModel`` (width 64) from config, randomly initialized."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModel(cfg)


def build_unet() -> Any:
    """The pixel-space ``UNet2DConditionModel`` (about 0.7M parameters), randomly initialized."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def build_scheduler(kind: str = "ddim") -> Any:
    """The noise schedule shared by training (DDPM) and sampling (DDIM)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}
    if kind == "ddpm":
        return DDPMScheduler(**kwargs)
    return DDIMScheduler(**kwargs, clip_sample=True, set_alpha_to_one=True)
