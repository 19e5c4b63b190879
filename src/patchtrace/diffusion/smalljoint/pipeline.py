"""The small joint-attention model as a pipeline with the SD3 call shape (so :mod:`..joint` serves both).

:class:`SmallJointPipeline` has ``transformer``, ``text_encoder``, ``tokenizer`` and ``scheduler``
attributes and runs classifier-free guidance as ``StableDiffusion3Pipeline`` does — one transformer
call per denoising step on ``[unconditional rows; conditional rows]`` — in pixel space (no VAE).
Images come back in [0, 1]. The same prompt-encoding path serves training and sampling.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from patchtrace.errors import PatchtraceError


class SmallJointPipeline:
    """Text-to-image in pixel space with the small ``SD3Transformer2DModel`` (see :mod:`.model`)."""

    def __init__(self, transformer: Any, text_encoder: Any, tokenizer: Any, scheduler: Any, use_pooled: bool = True) -> None:  # fmt: skip
        self.transformer, self.text_encoder = transformer, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        #: False: the pooled text embedding is replaced by zeros (a model trained with the recipe's
        #: ``pooled: False``), so the text reaches the image only through joint attention
        self.use_pooled = use_pooled

    def encode(self, prompts: list[str]) -> tuple[Any, Any]:
        """``(per-token states (n, tokens, 64), pooled projection (n, 64))`` of ``prompts``."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        out = self.text_encoder(ids.to(self.transformer.device), output_hidden_states=False)
        pooled = out.text_embeds if self.use_pooled else out.text_embeds.new_zeros(out.text_embeds.shape)
        return out.last_hidden_state, pooled

    def __call__(self, prompt: str | list[str], num_inference_steps: int = 10, guidance_scale: float = 3.0,
                 latents: Any = None, generator: Any = None, output_type: str = "pt", **_: Any) -> Any:  # fmt: skip
        """Images ``(n, 3, 16, 16)`` in [0, 1] of ``prompt`` (list), from ``latents`` or fresh noise."""
        import torch

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n, cfg = len(prompts), guidance_scale > 1.0
        with torch.no_grad():
            pos, pooled = self.encode(prompts)
            if cfg:
                neg, neg_pooled = self.encode([""] * n)
                pos, pooled = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
            if latents is None:
                c, s = self.transformer.config.in_channels, self.transformer.config.sample_size
                latents = torch.randn((n, c, s, s), generator=generator)
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                x_in = torch.cat([latents, latents]) if cfg else latents
                tt = torch.full((x_in.shape[0],), int(t))
                out = self.transformer(x_in, encoder_hidden_states=pos, pooled_projections=pooled, timestep=tt).sample
                if cfg:
                    u, c_ = out.chunk(2)
                    out = u + guidance_scale * (c_ - u)
                latents = self.scheduler.step(out, t, latents).prev_sample
        return SimpleNamespace(images=(latents / 2 + 0.5).clamp(0, 1))


def _parts() -> tuple[Any, Any, Any, Any]:
    from patchtrace.diffusion.small.model import build_scheduler, build_tokenizer
    from patchtrace.diffusion.smalljoint import model

    tok = build_tokenizer()
    return model.build_transformer(), model.build_text_encoder(len(tok)), tok, build_scheduler("ddim")


def load_state(tr: Any, te: Any, tensors: dict[str, Any]) -> None:
    """Load ``transformer.*`` / ``text_encoder.*`` tensors into the two modules (strict)."""
    tr.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("transformer.")})
    te.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")})


def build_small_joint(weights: Path | None = None) -> SmallJointPipeline:
    """The small joint-attention pipeline with committed (or given) weights, sha256-checked."""
    from safetensors.torch import load_file

    from patchtrace.diffusion.smalljoint.train import WEIGHTS_DIR

    path = weights or WEIGHTS_DIR / "small_joint.safetensors"
    if not path.exists():
        raise PatchtraceError(f"small joint model weights {path} not found "
                              "(train: python -m patchtrace.diffusion.smalljoint.train)")  # fmt: skip
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise PatchtraceError(f"{path} has no {meta_path.name} with its sha256 next to it")
    meta = json.loads(meta_path.read_text())
    if hashlib.sha256(path.read_bytes()).hexdigest() != meta.get("sha256"):
        raise PatchtraceError(f"{path} does not match the sha256 recorded next to it (corrupted or replaced)")
    tr, te, tok, sched = _parts()
    load_state(tr, te, load_file(str(path)))
    return SmallJointPipeline(tr.eval(), te.eval(), tok, sched, meta.get("recipe", {}).get("pooled", True))


def random_small_joint(seed: int = 0) -> SmallJointPipeline:
    """The architecture with random weights (plumbing tests, no training)."""
    import torch

    torch.manual_seed(seed)
    tr, te, tok, sched = _parts()
    return SmallJointPipeline(tr.eval(), te.eval(), tok, sched)
