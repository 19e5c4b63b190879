"""LocoGen: which cross-attention layers carry a visual attribute (Basu et al., ICML 2024).

Each cross-attention layer reads the prompt separately, so different layers can be *given different
prompts*. For an attribute (a style, a colour ...) take prompts that state it and the same prompts
without it (or with another value). A window of ``m`` consecutive layers (forward order) receives
the attribute-free prompt's text states; every other layer receives the original prompt's. If the
generated image loses the attribute, the window is where the UNet reads it. The attribute's score
(the small model's classifier probability, a CLIP score for SD) is averaged over seeds and prompts;
its **drop** against the unintervened image is the window's localization score.

As in the paper's code the pipeline itself is called with the altered prompt (this matters only for
SDXL, whose pooled embedding enters through the time embedding); the conditional half of guidance
is intervened on, the unconditional half never.

Speed: all conditions (no intervention, each window, all layers) share the initial noise and the
timesteps, and the text of every distinct prompt is encoded once. The fast path stacks conditions ×
prompts × seeds as rows of *one* pipeline call (chunks of ``max_rows``), each row with its own
per-layer states; the naive path is the paper's loop, one pipeline call per (condition, prompt,
seed). The unconditional half is the same for every window only at the first step — after it the
windows' latents differ, so it is computed per row (a claim of "compute it once" for all steps would
change the result).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchtrace.diffusion.adapters import Conditioning, DiffusionError, T2IAdapter
from patchtrace.diffusion.hooks import layer_states

#: score_fn(images in [0, 1] of shape (n, 3, H, W), prompt index per image (n,)) -> score per image (n,)
ScoreFn = Callable[[Any, Any], Any]


def windows(n_layers: int, m: int) -> list[tuple[int, ...]]:
    """All windows of ``m`` consecutive layers (``n_layers - m + 1`` of them), in forward order."""
    if m < 1:
        raise DiffusionError(f"window size must be >= 1, got {m}")
    if m > n_layers:
        raise DiffusionError(f"window of {m} layers is larger than the {n_layers} cross-attention layers")
    return [tuple(range(i, i + m)) for i in range(n_layers - m + 1)]


def window_labels(ws: Sequence[tuple[int, ...]]) -> list[str]:
    return [f"L{w[0]}" if len(w) == 1 else f"L{w[0]}-{w[-1]}" for w in ws]


@dataclass
class LocoGenResult:
    """What :func:`locogen` found.

    ``scores``: a :class:`~patchtrace.results.Scores` over the ``window`` axis (value: score drop;
    baselines ``clean`` = unintervened score, ``corrupt`` = score with every layer given the altered
    prompt). ``images``: ``(conditions, prompts, seeds, 3, H, W)`` with conditions = unintervened,
    each window, all layers. ``condition_scores``: ``(conditions, prompts, seeds)``.
    """

    scores: Any
    images: Any
    condition_scores: Any
    windows: list[tuple[int, ...]]
    prompts: list[str]
    alt_prompts: list[str]
    seeds: list[int]
    layer_names: list[str] = field(default_factory=list)

    @property
    def condition_labels(self) -> list[str]:
        return ["original", *window_labels(self.windows), "all layers"]

    def best_window(self) -> tuple[int, ...]:
        """The window whose intervention drops the attribute score most."""
        return self.windows[int(self.scores.values.argmax())]


def _check(adapter: T2IAdapter, prompts: list[str], alt: list[str], score_fn: ScoreFn | None) -> None:
    if score_fn is None:
        raise DiffusionError("no scorer given for the attribute: pass score_fn (a classifier or CLIP score)")
    if not prompts:
        raise DiffusionError("no prompts given")
    if len(prompts) != len(alt):
        raise DiffusionError(f"{len(prompts)} prompts but {len(alt)} altered prompts; pair them one to one")
    adapter.check_prompts(prompts, "prompt")
    adapter.check_prompts(alt, "altered prompt")


def _conditions(n_layers: int, ws: list[tuple[int, ...]]) -> list[frozenset[int]]:
    """Per condition, the layers that read the altered prompt."""
    return [frozenset(), *(frozenset(w) for w in ws), frozenset(range(n_layers))]


def _rows_generate(
    adapter: T2IAdapter,
    orig: Conditioning,
    alt: Conditioning,
    latents: Any,
    rows: list[tuple[int, int, int]],
    conds: list[frozenset[int]],
) -> Any:
    """One pipeline call for ``rows`` = (condition, prompt, seed): per-row per-layer states."""
    import torch

    p_idx = [p for _, p, _ in rows]
    cond = alt.rows(p_idx)
    states = {}
    for j in range(adapter.n_layers):
        use_alt = torch.tensor([j in conds[c] for c, _, _ in rows]).view(-1, 1, 1)
        states[j] = torch.where(use_alt, alt.pos[p_idx], orig.pos[p_idx])
    with layer_states(adapter.layers, states):
        return adapter.generate(cond, latents[[s for _, _, s in rows]])


def locogen(
    adapter: T2IAdapter,
    prompts: Sequence[str],
    alt_prompts: Sequence[str],
    score_fn: ScoreFn | None,
    *,
    window: int = 2,
    seeds: Sequence[int] = (0, 1, 2, 3),
    batched: bool = True,
    max_rows: int = 64,
    checkpoint: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LocoGenResult:
    """Localize an attribute over windows of ``window`` consecutive cross-attention layers.

    Args:
        adapter: the pipeline (:class:`~patchtrace.diffusion.adapters.T2IAdapter`).
        prompts: prompts stating the attribute; alt_prompts: the same without it (or with another value), paired.
        score_fn: the attribute's score of images (see :data:`ScoreFn`); required.
        window: layers per window; seeds: initial-noise seeds (shared by every condition).
        batched: one pipeline call per chunk of ``max_rows`` rows (fast) or one per row (the paper's loop).
        checkpoint: folder for per-condition results; a rerun with the same inputs resumes there.

    Raises:
        DiffusionError: no scorer, a window larger than the layer count, prompts over the token
            limit or unpaired — all before any denoising step.
    """
    import torch

    from patchtrace.engine.checkpoint import Checkpoint, run_key

    prompts, alt_prompts, seeds = list(prompts), list(alt_prompts), list(seeds)
    _check(adapter, prompts, alt_prompts, score_fn)
    ws = windows(adapter.n_layers, window)
    assert score_fn is not None
    orig, alt = adapter.encode(prompts), adapter.encode(alt_prompts)
    latents = adapter.latents(seeds)
    conds = _conditions(adapter.n_layers, ws)
    P, S = len(prompts), len(seeds)
    per_cond = [[(c, p, s) for p in range(P) for s in range(S)] for c in range(len(conds))]
    group = max(1, max_rows // (P * S)) if batched else 1
    ck = None
    if checkpoint is not None:
        key = run_key({"p": prompts, "a": alt_prompts, "s": seeds, "w": window, "steps": adapter.steps,
                       "g": adapter.guidance, "layers": [la.name for la in adapter.layers],
                       "pipe": type(adapter.pipe).__name__})  # fmt: skip
        ck = Checkpoint(checkpoint, key)
    images: list[Any] = [None] * len(conds)
    try:
        for start in range(0, len(conds), group):
            todo = list(range(start, min(start + group, len(conds))))
            cached = [ck.load(c) if ck else None for c in todo]
            if all(x is not None for x in cached):
                for c, x in zip(todo, cached):
                    images[c] = x["images"]  # type: ignore[index]
            else:
                rows = [r for c in todo for r in per_cond[c]]
                if batched:
                    out = torch.cat([_rows_generate(adapter, orig, alt, latents, rows[i : i + max_rows], conds)
                                     for i in range(0, len(rows), max_rows)])  # fmt: skip
                else:
                    out = torch.cat([_rows_generate(adapter, orig, alt, latents, [r], conds) for r in rows])
                for k, c in enumerate(todo):
                    images[c] = out[k * P * S : (k + 1) * P * S].reshape(P, S, *out.shape[1:]).contiguous()
                    if ck:
                        ck.save(c, {"images": images[c]})
            if on_progress:
                on_progress(min(start + group, len(conds)), len(conds))
    finally:
        if ck:
            ck.close()
    imgs = torch.stack(images)
    pidx = torch.arange(P).repeat_interleave(S)
    cs = torch.stack([score_fn(imgs[c].flatten(0, 1), pidx).reshape(P, S) for c in range(len(conds))]).float()
    return LocoGenResult(
        scores=_scores(cs, ws, prompts, alt_prompts, seeds, adapter),
        images=imgs,
        condition_scores=cs,
        windows=ws,
        prompts=prompts,
        alt_prompts=alt_prompts,
        seeds=seeds,
        layer_names=[la.name for la in adapter.layers],
    )


def _scores(cs: Any, ws: list, prompts: list, alt: list, seeds: list, adapter: T2IAdapter) -> Any:
    from patchtrace.results import Scores, library_version

    base = cs[0]
    drops = (base.unsqueeze(0) - cs[1:-1]).flatten(1).T  # (P*S, W)
    return Scores(
        values=drops.mean(0),
        axes=("window",),
        site_kind="cross_attn",
        value_name="score_drop",
        metric="attribute_score",
        baselines={"clean": float(base.mean()), "corrupt": float(cs[-1].mean())},
        labels={"window": window_labels(ws)},
        per_example=drops,
        extras={"score": cs[1:-1].flatten(1).mean(1)},
        provenance={
            "library": "patchtrace",
            "version": library_version(),
            "method": "locogen",
            "pipeline": type(adapter.pipe).__name__,
            "config": {"window": len(ws[0]), "steps": adapter.steps, "guidance": adapter.guidance},
            "prompts": prompts,
            "alt_prompts": alt,
            "seeds": {"noise": seeds},
        },
    )
