"""Joint-attention (SD3 MMDiT) text-stream patching: which layer decides *what text* is drawn.

In an MMDiT block image tokens and text tokens attend jointly; the text tokens' own keys and values
come from ``add_k_proj``/``add_v_proj`` of the text stream, which *evolves* through the blocks. So
feeding another prompt's encoder states into a layer (LocoGen's intervention) is not the right
counterfactual here (Staniszewski et al., ICLR 2025): instead run prompt B once, **cache the
text-token keys and values of every layer at every denoising step**, and in the run of prompt A
(same noise) write B's cached values into the chosen layers from step ``t_start`` on — text stream
only, image tokens untouched, conditional half of guidance only.

:func:`joint_layers` lists the blocks in forward order; :func:`record_text_kv` and
:func:`patch_text_kv` are scoped hook contexts (nothing left afterwards), as are :func:`record_pooled` and
:func:`patch_pooled` for the pooled text embedding (SD3's other text path: the adaptive norms of every
block, through the time embedding); :func:`text_patch_generate` runs the B-cache and the patched A-run
with shared noise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from patchtrace.diffusion.adapters import DiffusionError

#: pipeline class name -> joint-attention family
JOINT_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "SmallJointPipeline": "sd3"}


@dataclass(frozen=True)
class JointLayer:
    """One joint-attention block: its ``Attention`` (with ``add_k_proj``/``add_v_proj``), heads, name."""

    index: int
    name: str
    attn: Any
    heads: int


def joint_layers(pipe: Any) -> list[JointLayer]:
    """The joint-attention layers of an SD3-style pipeline in forward order (refuses others by name)."""
    name = type(pipe).__name__
    if name.startswith("IF"):
        raise DiffusionError(f"pipeline {name!r}: DeepFloyd IF's added-KV attention is not supported; "
                             f"supported: {sorted(JOINT_FAMILIES)}")  # fmt: skip
    if name not in JOINT_FAMILIES:
        raise DiffusionError(f"pipeline {name!r} has no supported joint attention; supported: {sorted(JOINT_FAMILIES)}")
    tr = pipe.transformer
    names = {id(m): n for n, m in tr.named_modules()}
    out: list[JointLayer] = []
    for block in tr.transformer_blocks:
        attn = block.attn
        if getattr(attn, "add_k_proj", None) is None:
            continue
        out.append(JointLayer(len(out), names[id(attn)], attn, attn.heads))
    if not out:
        raise DiffusionError(f"{type(tr).__name__} has no joint-attention layers with a text stream")
    return out


@contextmanager
def _steps(transformer: Any) -> Iterator[list[int]]:
    """A counter of transformer calls (one per denoising step: both guidance halves are one batch)."""
    step = [-1]
    h = transformer.register_forward_pre_hook(lambda m, a, k: step.__setitem__(0, step[0] + 1), with_kwargs=True)
    try:
        yield step
    finally:
        h.remove()


@contextmanager
def record_text_kv(pipe: Any, layers: Sequence[JointLayer]) -> Iterator[dict[tuple[int, int, str], Any]]:
    """Within the block, every ``add_k_proj``/``add_v_proj`` output is kept: ``cache[(layer, step, 'k'|'v')]``."""
    cache: dict[tuple[int, int, str], Any] = {}
    handles = []
    with _steps(pipe.transformer) as step:
        try:
            for layer in layers:
                for which, mod in (("k", layer.attn.add_k_proj), ("v", layer.attn.add_v_proj)):
                    def keep(m: Any, a: Any, out: Any, j: int = layer.index, w: str = which) -> None:
                        cache[(j, step[0], w)] = out.detach().clone()

                    handles.append(mod.register_forward_hook(keep))
            yield cache
        finally:
            for h in handles:
                h.remove()


@contextmanager
def patch_text_kv(pipe: Any, layers: Sequence[JointLayer], cache: dict, patch: Sequence[int], t_start: int,
                  n_cond: int, heads: Sequence[int] | None = None) -> Iterator[None]:  # fmt: skip
    """Within the block, layers ``patch`` read B's cached text K/V from step ``t_start`` on (conditional rows;
    only ``heads`` if given)."""
    handles = []
    with _steps(pipe.transformer) as step:
        try:
            for j in patch:
                if not 0 <= j < len(layers):
                    raise DiffusionError(f"joint-attention layer {j} does not exist (the model has {len(layers)})")
                layer = layers[j]
                for which, mod in (("k", layer.attn.add_k_proj), ("v", layer.attn.add_v_proj)):
                    def put(m: Any, a: Any, out: Any, j: int = j, w: str = which, layer: JointLayer = layer) -> Any:
                        if step[0] < t_start:
                            return out
                        src = cache[(j, step[0], w)]
                        if src.shape != out.shape:
                            raise DiffusionError(f"cached text K/V {tuple(src.shape)} != {tuple(out.shape)}: "
                                                 "prompts A and B must have the same token length")  # fmt: skip
                        out = out.clone()
                        rows = slice(out.shape[0] - n_cond, out.shape[0])
                        if heads is None:
                            out[rows] = src[rows]
                        else:
                            d = out.shape[-1] // layer.heads
                            for h in heads:
                                out[rows, :, h * d : (h + 1) * d] = src[rows, :, h * d : (h + 1) * d]
                        return out

                    handles.append(mod.register_forward_hook(put))
            yield
        finally:
            for h in handles:
                h.remove()


#: Where an SD3-style transformer projects the pooled text vector into its time embedding (diffusers'
#: module name): the adaptive-norm text path that every block reads, beside attention.
POOLED_PROJECTION = "time_text_embed.text_embedder"


def pooled_projection(pipe: Any) -> Any:
    """The pooled text projection module of ``pipe``'s transformer (:data:`POOLED_PROJECTION`).

    Raises:
        DiffusionError: the transformer has none (a UNet, or a joint model without pooled text).
    """
    try:
        return pipe.transformer.get_submodule(POOLED_PROJECTION)
    except AttributeError:
        raise DiffusionError(f"the 'pooled' site needs a joint-attention pipeline: "
                             f"{type(getattr(pipe, 'transformer', pipe)).__name__} has no pooled text "
                             f"projection ({POOLED_PROJECTION})") from None


@contextmanager
def record_pooled(pipe: Any, n_cond: int) -> Iterator[list[Any]]:
    """Within the block, the conditional rows of the first transformer call's ``pooled_projections`` are kept.

    SD3 feeds this pooled text embedding through ``time_text_embed.text_embedder`` into the time
    embedding, which every block's adaptive norms read: a path to the image that bypasses attention."""
    kept: list[Any] = []

    def keep(m: Any, a: Any, k: dict) -> None:
        if not kept:
            kept.append(k["pooled_projections"][-n_cond:].detach().clone())

    h = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield kept
    finally:
        h.remove()


@contextmanager
def patch_pooled(pipe: Any, pooled_b: Any, t_start: int, n_cond: int) -> Iterator[None]:
    """Within the block, the conditional rows of ``pooled_projections`` are B's (``pooled_b``) from step ``t_start`` on."""
    with _steps(pipe.transformer) as step:

        def put(m: Any, a: Any, k: dict) -> tuple | None:
            if step[0] < t_start:
                return None
            if pooled_b.shape[0] != n_cond:
                raise DiffusionError(f"B's pooled embedding has {pooled_b.shape[0]} rows, A has {n_cond}")
            k["pooled_projections"] = k["pooled_projections"].clone()
            k["pooled_projections"][-n_cond:] = pooled_b
            return a, k

        h = pipe.transformer.register_forward_pre_hook(put, with_kwargs=True)
        try:
            yield
        finally:
            h.remove()


def text_patch_generate(pipe: Any, prompt_a: list[str], prompt_b: list[str], patch: Sequence[int], t_start: int,
                        steps: int, guidance: float, latents: Any, heads: Sequence[int] | None = None,
                        pooled: bool = False, **kw: Any) -> Any:  # fmt: skip
    """Images of prompt A with layers ``patch`` reading prompt B's text K/V from step ``t_start`` (same noise);
    with ``pooled`` B's pooled text embedding (the adaptive-norm path) is written in from ``t_start`` too."""
    import torch

    if not 0 <= t_start < steps:
        raise DiffusionError(f"t_start {t_start} is beyond the scheduler's {steps} steps (0 … {steps - 1})")
    if len(prompt_a) != len(prompt_b):
        raise DiffusionError(f"{len(prompt_a)} A prompts but {len(prompt_b)} B prompts")
    layers = joint_layers(pipe)
    args = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "pt", "latents": latents, **kw}
    n = len(prompt_a)
    with torch.no_grad():
        with record_text_kv(pipe, layers) as cache, record_pooled(pipe, n) as pooled_b:
            pipe(prompt=prompt_b, **args)
        with ExitStack() as stack:
            stack.enter_context(patch_text_kv(pipe, layers, cache, patch, t_start, n_cond=n, heads=heads))
            if pooled:
                stack.enter_context(patch_pooled(pipe, pooled_b[0], t_start, n))
            return pipe(prompt=prompt_a, **args).images
