"""Which single layer decides the glyph a model draws (Staniszewski et al., ICLR 2025, on cross-attention UNets).

Prompt A asks for one glyph, prompt B (same template) for another. With the same noise, patch one
cross-attention layer at a time: that layer reads B's text states, every other layer A's. A layer
*localizes the text* when the image now shows B's glyph (the glyph classifier agrees with B) while
everything else of A's image is preserved (the other attributes' classifiers, pixel MSE/PSNR and SSIM
to A's image). The localized layers' share of the model's parameters is the paper's headline number
(SDXL: 3 of 70 layers, 0.61%). For joint-attention models see :mod:`patchtrace.diffusion.joint`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.hooks import layer_states


def ssim(x: Any, y: Any, c1: float = 0.01**2, c2: float = 0.03**2) -> Any:
    """Mean SSIM per image of ``(n, C, H, W)`` images in [0, 1] (3×3 uniform windows)."""
    import torch.nn.functional as F

    def mu(t: Any) -> Any:
        return F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)

    mx, my = mu(x), mu(y)
    vx, vy, cxy = mu(x * x) - mx**2, mu(y * y) - my**2, mu(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def psnr(x: Any, y: Any) -> float:
    """Mean PSNR (dB) over ``(n, C, H, W)`` image pairs in [0, 1]; identical pairs count as 100 dB."""
    import torch

    mse = ((x - y) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def _add_row(rows: dict[str, list[float]], img: Any, img_a: Any, pidx: Any, agree_b: Callable[..., Any],
             preserve: Callable[..., Any] | None) -> None:
    """One patched cell's agreement with B, preservation of A, and MSE/PSNR/SSIM to A's images."""
    rows["agree_b"].append(float(agree_b(img, pidx).float().mean()))
    rows["preserve"].append(float(preserve(img, pidx).float().mean()) if preserve else float("nan"))
    rows["mse"].append(float(((img - img_a) ** 2).flatten(1).mean(1).mean()))
    rows["psnr"].append(psnr(img, img_a))
    rows["ssim"].append(float(ssim(img, img_a).mean()))


def param_fraction(adapter: T2IAdapter, layers: Sequence[int]) -> float:
    """Parameters of the given cross-attention modules over all UNet parameters."""
    total = sum(p.numel() for p in adapter.pipe.unet.parameters())
    return sum(p.numel() for j in layers for p in adapter.layers[j].attn.parameters()) / total


def text_localization(adapter: T2IAdapter, prompts_a: Sequence[str], prompts_b: Sequence[str],
                      agree_b: Callable[[Any, Any], Any] | None, preserve: Callable[[Any, Any], Any] | None = None,
                      seeds: Sequence[int] = (0,)) -> dict[str, Any]:  # fmt: skip
    """Per cross-attention layer: agreement with B, preservation of A (classifiers, MSE, PSNR, SSIM).

    ``agree_b(images, prompt_index)`` scores B's glyph; ``preserve(images, prompt_index)`` (optional)
    scores A's other attributes. Returns a dict of per-layer tensors and A's/B's own images.
    """
    import torch

    if agree_b is None:
        raise DiffusionError("no glyph scorer given: pass agree_b (the glyph classifier's agreement with B)")
    pa, pb, seeds = list(prompts_a), list(prompts_b), list(seeds)
    if len(pa) != len(pb):
        raise DiffusionError(f"{len(pa)} A prompts but {len(pb)} B prompts")
    ea, eb = adapter.encode(pa), adapter.encode(pb)
    P, S = len(pa), len(seeds)
    idx = [p for p in range(P) for _ in range(S)]
    lat = adapter.latents(seeds).repeat(P, 1, 1, 1)
    ca, cb = ea.rows(idx), eb.rows(idx)
    img_a, img_b = adapter.generate(ca, lat), adapter.generate(cb, lat)
    pidx = torch.tensor(idx)
    rows: dict[str, list[float]] = {"agree_b": [], "preserve": [], "mse": [], "psnr": [], "ssim": []}
    images = []
    for j in range(adapter.n_layers):
        with layer_states(adapter.layers, {j: cb.pos}):
            img = adapter.generate(ca, lat)
        images.append(img)
        _add_row(rows, img, img_a, pidx, agree_b, preserve)
    out: dict[str, Any] = {k: torch.tensor(v) for k, v in rows.items()}
    out["agree_b_plain_a"] = float(agree_b(img_a, pidx).float().mean())
    out["agree_b_plain_b"] = float(agree_b(img_b, pidx).float().mean())
    out["images_a"], out["images_b"], out["images"] = img_a, img_b, images
    return out


def kv_fraction(adapter: T2IAdapter, layers: Sequence[int]) -> float:
    """The paper's count: the patched ``to_k``/``to_v`` weights of ``layers`` over all UNet parameters.

    (SDXL: 3 layers × 2 × 2048 × 1280 = 15.7 M of 2.57 B = 0.61%; the whole attention modules would be more.)
    """
    total = sum(p.numel() for p in adapter.pipe.unet.parameters())
    return sum(p.numel() for j in layers for m in (adapter.layers[j].to_k, adapter.layers[j].to_v)
               for p in m.parameters()) / total  # fmt: skip


def joint_fractions(pipe: Any, layers: Sequence[int], pooled: bool = False) -> tuple[float, float]:
    """For a joint-attention pipeline: (text ``add_k_proj``/``add_v_proj`` of ``layers``, whole attention
    modules of ``layers``) over all transformer parameters. SD3: 1 layer × 2 × 1536² ≈ 4.7 M of 2 B = 0.23%.
    With ``pooled`` both add the pooled text projection (``time_text_embed.text_embedder``: the linear
    layers that map the pooled text vector into the time embedding), counted the same way."""
    from patchtrace.diffusion.joint import joint_layers, pooled_projection

    jl = joint_layers(pipe)
    total = sum(p.numel() for p in pipe.transformer.parameters())
    kv = sum(p.numel() for j in layers for m in (jl[j].attn.add_k_proj, jl[j].attn.add_v_proj) for p in m.parameters())
    whole = sum(p.numel() for j in layers for p in jl[j].attn.parameters())
    extra = sum(p.numel() for p in pooled_projection(pipe).parameters()) if pooled else 0
    return (kv + extra) / total, (whole + extra) / total


def cell_sites(cell: Any, n_layers: int) -> tuple[list[int], bool]:
    """A joint textloc cell (``j`` of ``(j, head)``) as (text-K/V layers patched, pooled embedding patched):
    ``3``, ``(0, 1, 2)``, ``"all"``, ``"pooled"``, or ``("pooled", layers)`` / ``("pooled", "all")``."""
    if cell == "pooled":
        return [], True
    if isinstance(cell, tuple) and cell and cell[0] == "pooled":
        rest, _ = cell_sites(cell[1], n_layers)
        return rest, True
    if cell == "all":
        return list(range(n_layers)), False
    return (list(cell), False) if isinstance(cell, tuple) else ([int(cell)], False)


def _group_label(g: Sequence[int]) -> str:
    if len(g) == 1:
        return f"L{g[0]}"
    return f"L{min(g)}-{max(g)}" if list(g) == list(range(min(g), max(g) + 1)) else "L" + "+".join(map(str, g))


def joint_text_localization(pipe: Any, prompts_a: Sequence[str], prompts_b: Sequence[str],
                            agree_b: Callable[[Any, Any], Any], preserve: Callable[[Any, Any], Any] | None = None,
                            seeds: Sequence[int] = (0,), steps: int = 10, guidance: float = 3.0,
                            per_head: bool = False, extra: bool = True, groups: Sequence[Sequence[int]] = (),
                            pooled_with: Sequence[Sequence[int] | str] = ()) -> dict[str, Any]:  # fmt: skip
    """:func:`text_localization` for joint attention: one layer (or one head of one layer) at a time reads
    prompt B's cached text-token K/V at every step; B is run once and its cache reused for every layer.

    Rows (``labels``) are layers ``L0 …``, or ``(layer, head)`` pairs ``L0.H0 …`` when ``per_head``; with
    ``extra`` two more: ``all`` (every layer's text K/V from B) and ``pooled`` (only B's pooled text
    embedding, which SD3 feeds to every block's adaptive norms through the time embedding, not through
    attention) — together they say whether the text reaches the image through the joint attention at all;
    and one row per group of layers in ``groups`` (``L0-2`` for ``[0, 1, 2]``), patched together; and one
    row per entry of ``pooled_with`` (a group of layers or ``"all"``) patched *together with* B's pooled
    embedding (``pooled+L0-2``, ``pooled+all``): with the ``pooled`` row they show how the glyph splits
    between the adaptive-norm path and the text K/V.
    """
    import torch

    from patchtrace.diffusion.joint import joint_layers, patch_pooled, patch_text_kv, record_pooled, record_text_kv

    if agree_b is None:
        raise DiffusionError("no glyph scorer given: pass agree_b (the glyph classifier's agreement with B)")
    pa, pb, seeds = list(prompts_a), list(prompts_b), list(seeds)
    if len(pa) != len(pb):
        raise DiffusionError(f"{len(pa)} A prompts but {len(pb)} B prompts")
    layers = joint_layers(pipe)
    cfg = pipe.transformer.config
    noise = torch.stack([torch.randn((cfg.in_channels, cfg.sample_size, cfg.sample_size),
                                     generator=torch.Generator().manual_seed(s)) for s in seeds])  # fmt: skip
    ra, rb = [p for p in pa for _ in seeds], [p for p in pb for _ in seeds]
    lat = noise.repeat(len(pa), 1, 1, 1)
    args = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "pt", "latents": lat}
    pidx = torch.tensor([p for p in range(len(pa)) for _ in seeds])
    with torch.no_grad():
        img_a = pipe(prompt=ra, **args).images
        with record_text_kv(pipe, layers) as cache, record_pooled(pipe, len(rb)) as pooled_b:
            img_b = pipe(prompt=rb, **args).images
        cells: list[tuple[Any, Any]] = [(j, h) for j in range(len(layers)) for h in range(layers[j].heads)] \
            if per_head else [(j, None) for j in range(len(layers))]  # fmt: skip
        labels = [f"L{j}" if h is None else f"L{j}.H{h}" for j, h in cells]
        for g in groups:
            cells.append((tuple(g), None))
            labels.append(_group_label(g))
        if extra:
            cells += [("all", None), ("pooled", None)]
            labels += ["all", "pooled"]
        for pw in pooled_with:
            if isinstance(pw, str):  # "all"
                cells.append((("pooled", "all"), None))
                labels.append("pooled+all")
            else:
                cells.append((("pooled", tuple(pw)), None))
                labels.append("pooled+" + _group_label(pw))
        rows: dict[str, list[float]] = {"agree_b": [], "preserve": [], "mse": [], "psnr": [], "ssim": []}
        images = []
        for j, h in cells:
            patch, pooled = cell_sites(j, len(layers))
            with ExitStack() as stack:
                stack.enter_context(patch_text_kv(pipe, layers, cache, patch, 0, n_cond=len(ra),
                                                  heads=None if h is None else [h]))  # fmt: skip
                if pooled:
                    stack.enter_context(patch_pooled(pipe, pooled_b[0], 0, len(ra)))
                img = pipe(prompt=ra, **args).images
            images.append(img)
            _add_row(rows, img, img_a, pidx, agree_b, preserve)
    out: dict[str, Any] = {k: torch.tensor(v) for k, v in rows.items()}
    out["cells"], out["labels"] = cells, labels
    out["agree_b_plain_a"] = float(agree_b(img_a, pidx).float().mean())
    out["agree_b_plain_b"] = float(agree_b(img_b, pidx).float().mean())
    out["images_a"], out["images_b"], out["images"] = img_a, img_b, images
    return out
