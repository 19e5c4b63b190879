"""The small model as a pipeline with the Stable Diffusion call shape (so one adapter serves both).

:class:`SmallT2IPipeline` has ``unet``, ``text_encoder``, ``tokenizer`` and ``scheduler`` attributes,
an ``encode_prompt`` with Stable Diffusion's signature and return value, and a ``__call__`` that runs
classifier-free guidance exactly as ``StableDiffusionPipeline`` does — unconditional rows first,
then conditional — but in pixel space (no VAE). Images come back in [0, 1].
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from patchtrace.errors import PatchtraceError


class SmallT2IPipeline:
    """Text-to-image in pixel space with the small UNet and CLIP text encoder (see :mod:`.model`)."""

    def __init__(self, unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any) -> None:
        self.unet, self.text_encoder, self.tokenizer, self.scheduler = unet, text_encoder, tokenizer, scheduler

    def _embed(self, prompts: list[str], device: Any) -> Any:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        return self.text_encoder(ids.to(device)).last_hidden_state

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: Any,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
    ) -> tuple[Any, Any]:
        """``(prompt_embeds, negative_prompt_embeds)`` like ``StableDiffusionPipeline.encode_prompt``."""
        import torch

        with torch.no_grad():
            if prompt_embeds is None:
                prompt_embeds = self._embed([prompt] if isinstance(prompt, str) else list(prompt), device)
            prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                neg = negative_prompt or ""
                negs = [neg] * prompt_embeds.shape[0] if isinstance(neg, str) else list(neg)
                negative_prompt_embeds = self._embed(negs, device)
        return prompt_embeds, negative_prompt_embeds

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 10,
        guidance_scale: float = 3.0,
        latents: Any = None,
        generator: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "pt",
    ) -> Any:
        """Generate; ``.images`` is ``(n, 3, 16, 16)`` in [0, 1]."""
        import torch

        dev = self.unet.device
        cfg = guidance_scale > 1.0
        pos, neg = self.encode_prompt(prompt or "", dev, 1, cfg, None, prompt_embeds, negative_prompt_embeds)
        n = pos.shape[0]
        if latents is None:
            c, s = self.unet.config.in_channels, self.unet.config.sample_size
            latents = torch.randn((n, c, s, s), generator=generator).to(dev)
        self.scheduler.set_timesteps(num_inference_steps)
        cond = torch.cat([neg, pos]) if cfg else pos
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                x_in = torch.cat([latents, latents]) if cfg else latents
                out = self.unet(x_in, t, encoder_hidden_states=cond).sample
                if cfg:
                    u, c_ = out.chunk(2)
                    out = u + guidance_scale * (c_ - u)
                latents = self.scheduler.step(out, t, latents).prev_sample
        return SimpleNamespace(images=(latents / 2 + 0.5).clamp(0, 1))


def build_small(weights: Path | None = None, check: bool = True) -> SmallT2IPipeline:
    """The small pipeline with committed (or given) weights; ``weights=None`` and no file: refused.

    The weights file's sha256 is checked against ``small_t2i.json`` next to it.
    """
    from safetensors.torch import load_file

    from patchtrace.diffusion.small import model
    from patchtrace.diffusion.small.train import WEIGHTS_DIR

    path = weights or WEIGHTS_DIR / "small_t2i.safetensors"
    if not path.exists():
        raise PatchtraceError(f"small model weights {path} not found (train: python -m patchtrace.diffusion.small.train)")
    if check:
        meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if meta.get("sha256") not in (None, digest):
            raise PatchtraceError(f"{path} does not match the sha256 recorded next to it (corrupted or replaced)")
    tok = model.build_tokenizer()
    te, unet = model.build_text_encoder(len(tok)), model.build_unet()
    tensors = load_file(str(path))
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    te.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")})
    return SmallT2IPipeline(unet.eval(), te.eval(), tok, model.build_scheduler("ddim"))


def random_small(seed: int = 0) -> SmallT2IPipeline:
    """The small pipeline's architecture with random weights (tests of the plumbing, no training)."""
    import torch

    from patchtrace.diffusion.small import model

    torch.manual_seed(seed)
    tok = model.build_tokenizer()
    te, unet = model.build_text_encoder(len(tok)), model.build_unet()
    return SmallT2IPipeline(unet.eval(), te.eval(), tok, model.build_scheduler("ddim"))
