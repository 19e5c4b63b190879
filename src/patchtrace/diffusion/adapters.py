"""Adapters for diffusers text-to-image pipelines: cross-attention layers in forward order, prompts in.

A UNet's text conditioning enters only through the *cross-attention* layers: each computes keys
``K = c W_k`` and values ``V = c W_v`` from the text encoder's states ``c`` (shape ``batch × tokens ×
d_text``; the text-token axis is 1) while its queries come from the image. LocoGen (Basu et al. 2024)
localizes an attribute by feeding *different prompts to different layers*, so an adapter must know
those layers **in the order the forward pass visits them** — down blocks, mid block, up blocks, and
within a block its transformer blocks — which is not the lexicographic order of module names
(``transformer_blocks.10`` sorts before ``transformer_blocks.2``; the paper's code sorts names).

The adapter recognizes a pipeline by its class name (:data:`FAMILIES`) and refuses any other by
name: SD 1.x/2.x (``StableDiffusionPipeline``), SDXL (``StableDiffusionXLPipeline``: two text
encoders whose states are concatenated for cross-attention, plus pooled embeddings and size ids
that enter through the time embedding, never through cross-attention), and the project's own small
pixel-space model (:class:`patchtrace.diffusion.small.pipeline.SmallT2IPipeline`, SD-shaped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from patchtrace.errors import PatchtraceError


class DiffusionError(PatchtraceError, ValueError):
    """A pipeline, layer window, prompt, attribute or step that the diffusion methods cannot use."""


#: pipeline class name -> family ("sd": one CLIP encoder; "sdxl": two encoders + pooled/time ids)
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "SmallT2IPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}


@dataclass(frozen=True)
class CrossAttnLayer:
    """One cross-attention layer of a UNet.

    Attributes:
        index: position in forward order (0 = first visited).
        name: module path of the ``Attention`` module (``up_blocks.1.attentions.0.transformer_blocks.0.attn2``).
        attn: the ``Attention`` module; ``attn.to_k`` / ``attn.to_v`` map text states to keys/values.
        heads: attention heads.
        text_dim: width of the text states it reads (``cross_attention_dim``).
        inner_dim: width of its keys/values (``heads × head_dim``).
        block: ``down``, ``mid`` or ``up``.
    """

    index: int
    name: str
    attn: Any
    heads: int
    text_dim: int
    inner_dim: int
    block: str

    @property
    def to_k(self) -> Any:
        return self.attn.to_k

    @property
    def to_v(self) -> Any:
        return self.attn.to_v

    #: axis of the text tokens in the states ``c`` that ``to_k``/``to_v`` read
    token_axis = 1


def cross_attention_layers(unet: Any) -> list[CrossAttnLayer]:
    """The cross-attention layers of a ``UNet2DConditionModel`` in forward order (from its block structure).

    Raises :class:`DiffusionError` if the UNet has none (nothing for a prompt to be patched into).
    """
    names = {id(m): n for n, m in unet.named_modules()}
    groups = [("down", b) for b in unet.down_blocks]
    if getattr(unet, "mid_block", None) is not None:
        groups.append(("mid", unet.mid_block))
    groups += [("up", b) for b in unet.up_blocks]
    out: list[CrossAttnLayer] = []
    for where, block in groups:
        for t2d in getattr(block, "attentions", None) or []:
            for tb in getattr(t2d, "transformer_blocks", None) or []:
                attn = getattr(tb, "attn2", None)
                if attn is None or not getattr(attn, "is_cross_attention", False):
                    continue
                out.append(
                    CrossAttnLayer(
                        index=len(out),
                        name=names[id(attn)],
                        attn=attn,
                        heads=attn.heads,
                        text_dim=attn.to_k.in_features,
                        inner_dim=attn.to_k.out_features,
                        block=where,
                    )
                )
    if not out:
        raise DiffusionError(f"{type(unet).__name__} has no cross-attention layers: no prompt reaches it per layer")
    return out


def family_of(pipe: Any) -> str:
    """The adapter family of a pipeline, or a :class:`DiffusionError` naming the unsupported class."""
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise DiffusionError(
            f"pipeline {name!r} is not supported for per-layer prompt interventions; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[name]


@dataclass
class Conditioning:
    """What a pipeline call is conditioned on, one row per image (the pipeline's own encodings).

    ``pos``: the prompt's states for cross-attention; ``neg``: the empty/negative prompt's (the
    unconditional half of classifier-free guidance); ``pooled``/``neg_pooled``: SDXL's pooled embeds.
    """

    pos: Any
    neg: Any
    pooled: Any = None
    neg_pooled: Any = None

    def rows(self, idx: Any) -> Conditioning:
        """The rows ``idx`` (a list of row indices) of every tensor."""
        pick = (lambda t: None if t is None else t[idx])  # noqa: E731
        return Conditioning(pick(self.pos), pick(self.neg), pick(self.pooled), pick(self.neg_pooled))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        import torch

        def join(ts: list[Any]) -> Any:
            return None if ts[0] is None else torch.cat(ts)

        return Conditioning(
            join([c.pos for c in items]),
            join([c.neg for c in items]),
            join([c.pooled for c in items]),
            join([c.neg_pooled for c in items]),
        )


class T2IAdapter:
    """A supported pipeline with its cross-attention layers, prompt encoding and a plain generate.

    Args:
        pipe: a diffusers pipeline of a family in :data:`FAMILIES` (or the small model's).
        steps: denoising steps of every generation; guidance: classifier-free guidance scale (> 1).
    """

    def __init__(self, pipe: Any, steps: int = 10, guidance: float = 3.0) -> None:
        self.pipe = pipe
        self.family = family_of(pipe)
        self.layers = cross_attention_layers(pipe.unet)
        if guidance <= 1.0:
            raise DiffusionError(f"guidance {guidance} <= 1 has no unconditional half; use a scale > 1")
        if steps < 1:
            raise DiffusionError(f"steps must be >= 1, got {steps}")
        self.steps, self.guidance = steps, guidance

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def tokenizers(self) -> list[Any]:
        toks = [self.pipe.tokenizer]
        if self.family == "sdxl" and getattr(self.pipe, "tokenizer_2", None) is not None:
            toks.append(self.pipe.tokenizer_2)
        return [t for t in toks if t is not None]

    def check_prompts(self, prompts: list[str], what: str = "prompt") -> None:
        """Refuse a prompt longer than an encoder's token limit (it would be silently truncated)."""
        for tok in self.tokenizers():
            limit = tok.model_max_length
            for p in prompts:
                n = len(tok(p).input_ids)
                if n > limit:
                    raise DiffusionError(f"{what} {p!r} has {n} tokens, over the text encoder's limit of {limit}")

    def encode(self, prompts: list[str]) -> Conditioning:
        """The pipeline's own encoding of ``prompts`` (and of the empty negative prompt), one row each."""
        import torch

        self.check_prompts(prompts)
        dev = self.pipe.unet.device
        with torch.no_grad():
            if self.family == "sdxl":
                pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                    prompt=prompts, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=True
                )
                return Conditioning(pos, neg, pooled, neg_pooled)
            pos, neg = self.pipe.encode_prompt(prompts, dev, 1, True)
        return Conditioning(pos, neg)

    def latents(self, seeds: list[int]) -> Any:
        """Initial noise per seed (one row each), the same for every intervention of a comparison."""
        import torch

        unet = self.pipe.unet
        size = unet.config.sample_size  # latent side (the pipelines' default height // vae scale)
        shape = (unet.config.in_channels, size, size)
        rows = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        sigma = getattr(self.pipe.scheduler, "init_noise_sigma", 1.0)
        return torch.stack(rows).to(unet.device, unet.dtype) * sigma

    def generate(self, cond: Conditioning, latents: Any) -> Any:
        """One pipeline call on pre-encoded rows; images ``(rows, 3, H, W)`` in [0, 1]."""
        import torch

        kwargs: dict[str, Any] = {
            "prompt_embeds": cond.pos,
            "negative_prompt_embeds": cond.neg,
            "latents": latents,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "output_type": "pt",
        }
        if self.family == "sdxl":
            kwargs["pooled_prompt_embeds"] = cond.pooled
            kwargs["negative_pooled_prompt_embeds"] = cond.neg_pooled
        with torch.no_grad():
            out = self.pipe(**kwargs)
        return out.images if not isinstance(out, tuple) else out[0]
