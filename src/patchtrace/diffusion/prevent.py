"""Prevention: a closed-form edit of the localized layers so that a forbidden glyph is never drawn.

The paper (Staniszewski et al., ICLR 2025) stops a model from writing a chosen (toxic) word by acting
only on the layers that decide *which text* is drawn. Here the action is a weight edit, so it costs
nothing at inference: the ``W_k``/``W_v`` of the localized cross-attention layers are changed so that
the text states of prompts naming the **forbidden** glyph produce the keys and values that the same
prompts naming a **neutral** glyph produce, while the states of every other prompt keep theirs::

    W* = argmin_W  Σ_forbidden ‖W x_i − W_old y_i‖²  +  Σ_keep ‖W x_j − W_old x_j‖²  +  λ ‖W − W_old‖²_F

with ``x_i`` every token state of a forbidden prompt, ``y_i`` the same token of its neutral twin (same
template, glyph word swapped), and ``x_j`` every token of prompts with other glyphs (the preservation
set). This is LocoEdit's closed form (:func:`.locoedit.solve`) with the two sets stacked. Every token is
used (padding too), not only the last one: the glyph word sits mid-prompt and a causal text encoder
carries it into every later token, and cross-attention reads them all. Twins must tokenize to the same length (token ``i`` of one is token ``i`` of the
other); a forbidden/neutral pair of different token lengths is refused by name.

The edit is a :class:`~patchtrace.weights.patch.WeightPatch` (checksummed, base-model hash, exactly
reversible). :func:`evaluate_prevention` measures the rate of prevention on paraphrases never seen by
the solve (other caption templates) and the preservation of all other prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.locoedit import LAMBDA, solve_patch

#: caption templates the solve sees; the others are the paraphrases of the evaluation
FIT_TEMPLATES = (0, 1)
EVAL_TEMPLATES = (2, 3)


def _check_words(adapter: T2IAdapter, forbidden: str, neutral: str) -> None:
    from patchtrace.diffusion.small.data import GLYPH_WORDS
    from patchtrace.diffusion.small.prompts import check_attribute

    check_attribute("glyph", forbidden)
    check_attribute("glyph", neutral)
    if forbidden == neutral:
        raise DiffusionError(f"forbidden and neutral glyph are both {forbidden!r}")
    tok = adapter.tokenizers()[0]
    la, lb = (len(tok(GLYPH_WORDS[g], add_special_tokens=False).input_ids) for g in (forbidden, neutral))
    if la != lb:
        raise DiffusionError(f"forbidden glyph {forbidden!r} is {la} tokens and neutral {neutral!r} is {lb}: "
                             "twin prompts must have the same token length; choose a neutral glyph of equal length")  # fmt: skip


def prompt_sets(forbidden: str, neutral: str, templates: Sequence[int], seed: int = 0,
                per_template: int = 6) -> tuple[list[str], list[str], list[str], list[Any], list[Any]]:  # fmt: skip
    """Forbidden prompts, their neutral twins, other-glyph prompts; and the forbidden/other specs."""
    import numpy as np

    from patchtrace.diffusion.small.data import all_specs, caption

    rng = np.random.default_rng(seed)
    pool = all_specs(False)
    bad = [s for s in pool if s.glyph == forbidden]
    good = [s for s in pool if s.glyph != forbidden]
    fs, os_ = [], []
    for t in templates:
        for i in range(per_template):
            fs.append((bad[int(rng.integers(len(bad)))], t, i % 2))
            os_.append((good[int(rng.integers(len(good)))], t, i % 2))
    forb = [caption(s, t, v) for s, t, v in fs]
    twins = [caption(replace(s, glyph=neutral), t, v) for s, t, v in fs]
    others = [caption(s, t, v) for s, t, v in os_]
    return forb, twins, others, [s for s, _, _ in fs], [s for s, _, _ in os_]


def token_states(adapter: T2IAdapter, prompts: Sequence[str]) -> Any:
    """Every token's text state, padding included, ``(prompts × tokens, d_text)``.

    Padding is included: cross-attention reads every position, and a causal encoder's padding states
    carry the whole prompt (the glyph word too)."""
    pos = adapter.encode(list(prompts)).pos
    return pos.reshape(-1, pos.shape[-1])


def prevention_patch(adapter: T2IAdapter, layers: Sequence[int], forbidden: str, neutral: str,
                     lam: float = LAMBDA, per_template: int = 6, seed: int = 0) -> Any:  # fmt: skip
    """The closed-form edit of ``to_k``/``to_v`` of cross-attention ``layers`` as a ``WeightPatch``.

    Raises:
        DiffusionError: an unknown glyph, forbidden == neutral, words of different token lengths,
            no layers, a layer that does not exist.
    """
    import torch


    _check_words(adapter, forbidden, neutral)
    if not layers:
        raise DiffusionError("prevention needs at least one layer to edit")
    for j in layers:
        if not 0 <= j < adapter.n_layers:
            raise DiffusionError(f"cross-attention layer {j} does not exist (the UNet has {adapter.n_layers})")
    forb, twins, others, _, _ = prompt_sets(forbidden, neutral, FIT_TEMPLATES, seed, per_template)
    xf, yf, xo = token_states(adapter, forb), token_states(adapter, twins), token_states(adapter, others)
    x, y = torch.cat([xf, xo]), torch.cat([yf, xo])
    targets = [(f"{adapter.layers[j].name}.{proj}.weight", x, y) for j in layers for proj in ("to_k", "to_v")]
    return solve_patch(adapter.pipe.unet, targets, lam,
                       {"method": "prevent", "layers": list(layers), "lambda": lam, "forbidden": forbidden,
                        "neutral": neutral, "fit_templates": list(FIT_TEMPLATES)})  # fmt: skip


def evaluate_prevention(adapter: Any, scorer: Any, patch: Any, forbidden: str, neutral: str,
                        seeds: Sequence[int] = (0, 1), per_template: int = 6, seed: int = 7) -> dict[str, Any]:  # fmt: skip
    """Before/after on paraphrases (templates the solve never saw): forbidden glyph drawn, neutral drawn,
    other attributes of the forbidden prompts, every attribute of other prompts, PSNR/SSIM of other
    prompts' images to the unedited ones. Returns numbers and the images (forbidden before/after).
    ``adapter``: a :class:`~.adapters.T2IAdapter` or a joint-attention pipeline."""

    from patchtrace.diffusion.small.data import ATTRIBUTES
    from patchtrace.diffusion.small.evaluate import prompt_accuracy
    from patchtrace.diffusion.textloc import psnr, ssim

    forb, _, others, fspecs, ospecs = prompt_sets(forbidden, neutral, EVAL_TEMPLATES, seed, per_template)
    seeds = list(seeds)
    joint = not isinstance(adapter, T2IAdapter)

    def gen(prompts: list[str], specs: list[Any]) -> tuple[dict[str, float], Any]:
        if not joint:
            return prompt_accuracy(adapter, scorer, prompts, specs, seeds)
        from patchtrace.diffusion.smalljoint.evaluate import generate

        imgs = generate(adapter, prompts, seeds)
        rows = [s for s in specs for _ in seeds]
        return {a: sum(p == getattr(s, a) for p, s in zip(scorer.predict(imgs * 2 - 1, a), rows)) / len(rows)
                for a in ATTRIBUTES}, imgs  # fmt: skip

    def measure() -> tuple[Any, Any, dict[str, float], dict[str, float]]:
        acc_f, img_f = gen(forb, fspecs)
        acc_o, img_o = gen(others, ospecs)
        return img_f, img_o, acc_f, acc_o

    bf, bo, acc_bf, acc_bo = measure()
    with patch.applied(adapter.transformer if joint else adapter.pipe.unet):
        af, ao, acc_af, acc_ao = measure()

    def rate(img: Any, glyph: str) -> float:
        return sum(p == glyph for p in scorer.predict(img * 2 - 1, "glyph")) / img.shape[0]

    rest = [a for a in ATTRIBUTES if a != "glyph"]
    return {
        "layers": patch.meta.get("layers"), "forbidden": forbidden, "neutral": neutral,
        "forbidden_drawn_before": rate(bf, forbidden), "forbidden_drawn_after": rate(af, forbidden),
        "neutral_drawn_before": rate(bf, neutral), "neutral_drawn_after": rate(af, neutral),
        "forbidden_other_attrs_before": sum(acc_bf[a] for a in rest) / len(rest),
        "forbidden_other_attrs_after": sum(acc_af[a] for a in rest) / len(rest),
        "others_all_attrs_before": sum(acc_bo.values()) / len(acc_bo),
        "others_all_attrs_after": sum(acc_ao.values()) / len(acc_ao),
        "others_psnr": psnr(ao, bo),
        "others_ssim": float(ssim(ao, bo).mean()),
        "images": {"forbidden_before": bf, "forbidden_after": af, "others_before": bo, "others_after": ao},
        "prompts": {"forbidden": forb, "others": others},
    }  # fmt: skip


def joint_prevention_patch(pipe: Any, layers: Sequence[int], forbidden: str, neutral: str, lam: float = LAMBDA,
                           per_template: int = 4, seeds: Sequence[int] = (0,), steps: int = 10,
                           guidance: float = 3.0, seed: int = 0, pooled: bool = False) -> Any:  # fmt: skip
    """The same closed form on a joint-attention model's text-stream ``add_k_proj``/``add_v_proj``.

    A block's text tokens are not the text encoder's output: they evolve through the blocks and depend
    on the image and the step. So the rows are *recorded*: every conditional text-token input of the
    edited projections at every denoising step, from runs of the forbidden prompts (``x``), of their
    neutral twins with the same noise (``y``, same token positions) and of other-glyph prompts (kept).

    With ``pooled`` the first linear layer of the pooled text projection
    (``time_text_embed.text_embedder.linear_1``, SD3's adaptive-norm text path) is edited the same way:
    its input, the pooled text vector of a forbidden prompt, is mapped to what its neutral twin's gives
    (``layers`` may then be empty).
    """
    import torch

    from patchtrace.diffusion.joint import POOLED_PROJECTION, joint_layers, pooled_projection
    from patchtrace.diffusion.small.data import GLYPH_WORDS
    from patchtrace.diffusion.small.prompts import check_attribute
    from patchtrace.diffusion.smalljoint.evaluate import generate

    check_attribute("glyph", forbidden)
    check_attribute("glyph", neutral)
    if forbidden == neutral:
        raise DiffusionError(f"forbidden and neutral glyph are both {forbidden!r}")
    la, lb = (len(pipe.tokenizer(GLYPH_WORDS[g], add_special_tokens=False).input_ids) for g in (forbidden, neutral))
    if la != lb:
        raise DiffusionError(f"forbidden glyph {forbidden!r} is {la} tokens and neutral {neutral!r} is {lb}: "
                             "twin prompts must have the same token length; choose a neutral glyph of equal length")  # fmt: skip
    jl = joint_layers(pipe)
    if not layers and not pooled:
        raise DiffusionError("prevention needs at least one layer (or the pooled projection) to edit")
    for j in layers:
        if not 0 <= j < len(jl):
            raise DiffusionError(f"joint-attention layer {j} does not exist (the model has {len(jl)})")
    forb, twins, others, _, _ = prompt_sets(forbidden, neutral, FIT_TEMPLATES, seed, per_template)

    # the module whose input is recorded -> the weights solved from it
    mods: dict[str, tuple[Any, list[str]]] = {
        jl[j].name: (jl[j].attn.add_k_proj, [f"{jl[j].name}.{p}.weight" for p in ("add_k_proj", "add_v_proj")]) for j in layers}
    if pooled:
        mods["pooled"] = (pooled_projection(pipe).linear_1, [f"{POOLED_PROJECTION}.linear_1.weight"])

    def record(prompts: list[str]) -> dict[str, Any]:
        seen: dict[str, list[Any]] = {k: [] for k in mods}
        n_cond = len(prompts) * len(seeds)
        hs = [m.register_forward_pre_hook(
            lambda m, a, k=k: seen[k].append(a[0][-n_cond:].reshape(-1, a[0].shape[-1]).detach().clone()))
            for k, (m, _) in mods.items()]  # fmt: skip
        try:
            with torch.no_grad():
                generate(pipe, prompts, seeds, steps, guidance)
        finally:
            for h in hs:
                h.remove()
        return {k: torch.cat(v) for k, v in seen.items()}

    xf, yf, xo = record(forb), record(twins), record(others)
    targets = [(w, torch.cat([xf[k], xo[k]]), torch.cat([yf[k], xo[k]])) for k, (_, ws) in mods.items() for w in ws]
    return solve_patch(pipe.transformer, targets, lam,
                       {"method": "prevent-joint", "layers": list(layers), "pooled": pooled, "lambda": lam,
                        "forbidden": forbidden, "neutral": neutral, "fit_templates": list(FIT_TEMPLATES)})  # fmt: skip
