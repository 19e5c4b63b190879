"""Exact activation patching (methods.md §1), over any grid of sites, on the sweep engine.

Denoising (default) runs the corrupt prompt and restores one clean activation at a time: it asks
whether a component is *sufficient* to bring the behaviour back. Noising runs the clean prompt and
patches in a corrupt activation: is the component *necessary*? The two are not symmetric, so the
direction is recorded with every result.

The result's ``values`` are effects ``M(patched) − M(base)`` averaged over examples;
``extras['patched']`` holds the mean patched metric, and :meth:`Scores.normalized` gives the
normalized recovery (0 = corrupt baseline, 1 = clean).

A built-in sanity check patches the clean run into itself at a few sites and records the largest
change (it must be ~0) as ``provenance['sanity_max_abs']``.

Example:
    >>> from patchtrace import load_model, make_task, SiteSpec           # doctest: +SKIP
    >>> m = load_model()                                                  # doctest: +SKIP
    >>> s = run(m, make_task("ioi", n=16), SiteSpec("head", per_unit=True))  # doctest: +SKIP
    >>> s.top_k(3)                                                        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from patchtrace.engine.checkpoint import Checkpoint, guard_finished, run_key
from patchtrace.engine.sweep import (
    EngineError,
    Patch,
    Scorer,
    base_points,
    collect,
    plan_sweep,
    resolve,
    run_patches,
)
from patchtrace.grid import Grid, GridError
from patchtrace.metrics import Metric, warn_zero_gap
from patchtrace.models.load import Model
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import SiteSpec
from patchtrace.tasks.base import Task, TokenizedTask

Direction = Literal["denoise", "noise"]

#: Batch rows (patches × examples) per checkpointed block of a sweep.
ROWS_PER_BLOCK = 2048


@dataclass(frozen=True)
class PatchingConfig:
    """Settings of an activation-patching sweep.

    Attributes:
        direction: ``denoise`` (clean into corrupt) or ``noise`` (corrupt into clean).
        metric: metric name (:data:`patchtrace.metrics.METRICS`).
        fast: use the engine's fast path; False runs one full forward per patch (same numbers).
        max_memory: working-memory budget in bytes (None: a quarter of available memory).
        sanity_check: patch clean into clean at a few sites and record the largest change.
        block_rows: batch rows (patches × examples) per checkpointed block.
    """

    direction: Direction = "denoise"
    metric: str = "logit_diff"
    fast: bool = True
    max_memory: int | None = None
    sanity_check: bool = True
    block_rows: int = ROWS_PER_BLOCK


def build_grid(model: Model, spec: SiteSpec, tok: TokenizedTask) -> Grid:
    """The grid of ``spec`` for this model and task (positions may be negative; they are resolved per
    example group by the engine).

    Raises:
        EngineError: ``positions="all"`` with examples of different lengths, or a bad layer/unit.
    """
    T = tok.uniform_length()
    if spec.positions == "all" and T is None:
        lens = tok.lengths
        raise EngineError(
            f"positions='all' needs prompts of one length; example 0 has {lens[0]} tokens but example "
            f"{next(i for i, n in enumerate(lens) if n != lens[0])} has a different length. "
            "Use positions='last' or a list of negative positions"
        )
    try:
        return Grid.from_spec(spec, model.dims, T)
    except GridError as e:
        raise EngineError(str(e)) from None


def result_labels(grid: Grid, tok: TokenizedTask) -> dict[str, list[str]]:
    """The labels a result carries: the grid's (model indices, fixed coordinates) plus, when every
    prompt has one length, the tokens of example 0 at the swept positions (for reports)."""
    labels = grid.labels()
    T = tok.uniform_length()
    if "pos" in grid.axes and T is not None:
        poss = grid.coords[grid.axes.index("pos")]
        if all(-T <= p < T for p in poss):
            labels["pos"] = [tok.tokens[0][p] for p in poss]
    return labels


def run(
    model: Model,
    task: Task | TokenizedTask,
    sites: SiteSpec,
    config: PatchingConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> Scores:
    """Exact activation patching of every cell of ``sites``.

    Args:
        model: a loaded model.
        task: a task (tokenized and validated here) or an already tokenized one.
        sites: the grid to sweep.
        config: :class:`PatchingConfig`.
        out_dir: if given, finished blocks are checkpointed there and a rerun resumes.
        on_progress: called as ``on_progress(done, total)`` in patches.
        overwrite: replace a finished result of a *different* run in ``out_dir`` (otherwise refused).

    Raises:
        CheckpointError: ``out_dir`` is in use by another run, or holds another run's result.

    Returns:
        :class:`Scores` of effects with axes from the grid.
    """
    cfg = config or PatchingConfig()
    tok = task if isinstance(task, TokenizedTask) else task.tokenize(model.tokenizer)
    grid = build_grid(model, sites, tok)
    key = run_key(
        {"model": model.weights_hash(), "task": tok.task.hash(), "sites": str(sites), "config": asdict(cfg), "m": "ap"}
    )
    ckpt = Checkpoint(out_dir, key, overwrite) if out_dir is not None else None  # takes the folder's lock
    try:
        if out_dir is not None:
            guard_finished(out_dir, key, overwrite)
        return _sweep(model, tok, sites, cfg, grid, key, ckpt, on_progress, out_dir)
    finally:
        if ckpt is not None:
            ckpt.close()


def _sweep(
    model: Model,
    tok: TokenizedTask,
    sites: SiteSpec,
    cfg: PatchingConfig,
    grid: Grid,
    key: str,
    ckpt: Checkpoint | None,
    on_progress: Callable[[int, int], None] | None,
    out_dir: str | Path | None,
) -> Scores:
    """The body of :func:`run` once the grid is built and the folder is held."""
    metric = Metric(cfg.metric)
    N = len(tok)
    n_cells = len(grid)
    patched = torch.zeros(N, n_cells)
    clean_metric = torch.zeros(N)
    corrupt_metric = torch.zeros(N)
    sites_list = grid.sites()
    points = {s.point for s in sites_list}
    sanity = 0.0
    done = 0
    groups = tok.groups()
    total = n_cells * len(groups)
    cols = metric.columns(tok.answer, tok.wrong)
    # one patch per cell and example group (positions resolved against that group's length)
    group_patches_all = [[Patch((resolve(s, model, tok.lengths[g[0]]),)) for s in sites_list] for g in groups]
    plans = [
        plan_sweep(
            model, gp, len(g), tok.lengths[g[0]], fast=cfg.fast, max_memory=cfg.max_memory,
            ncols=None if cols is None else len(cols),
        )
        for g, gp in zip(groups, group_patches_all, strict=True)
    ]  # raises before any compute if the memory budget cannot hold a patch
    # checkpoint blocks of ~ROWS_PER_BLOCK batch rows: large enough that the engine's staggered
    # batches stay efficient, small enough that an interrupted sweep loses little
    block_size = max(1, cfg.block_rows // max(1, N))

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if on_progress:
            on_progress(done, total)

    for gi, idx in enumerate(groups):
        ids_c, ids_k = tok.ids("clean", idx).to(model.device), tok.ids("corrupt", idx).to(model.device)
        group_patches = group_patches_all[gi]
        need = points | (base_points(group_patches, model) if cfg.fast else set())
        clean, corrupt = collect(model, ids_c, need), collect(model, ids_k, need)
        ref = torch.log_softmax(clean.logits, -1) if metric.name == "kl" else None
        scorer = Scorer(metric, tok.answer[idx].to(model.device), tok.wrong[idx].to(model.device), ref)
        clean_metric[idx] = scorer(clean.logits, 1, False)[0].cpu()
        corrupt_metric[idx] = scorer(corrupt.logits, 1, False)[0].cpu()
        base, source, base_ids = (corrupt, clean, ids_k) if cfg.direction == "denoise" else (clean, corrupt, ids_c)
        if cfg.sanity_check:
            some = group_patches[:: max(1, len(group_patches) // 3)][:3]
            # clean into clean: every patch is a no-op, so force the engine to compute them
            same = run_patches(
                model, ids_c, clean, clean, some, scorer, fast=cfg.fast, max_memory=cfg.max_memory, skip_noops=False
            )
            sanity = max(sanity, float((same - clean_metric[idx][None]).abs().max()))
        for b0 in range(0, n_cells, block_size):
            bkey = gi * 100000 + b0 // block_size
            cached = ckpt.load(bkey) if ckpt is not None else None
            if cached is not None:
                vals = cached["patched"]
                tick(vals.shape[0])
            else:
                vals = run_patches(
                    model, base_ids, base, source, group_patches[b0 : b0 + block_size], scorer,
                    fast=cfg.fast, max_memory=cfg.max_memory, on_chunk=tick,
                ).cpu()
                if ckpt is not None:
                    ckpt.save(bkey, {"patched": vals})
            patched[idx, b0 : b0 + block_size] = vals.T
    warn_zero_gap(clean_metric, corrupt_metric, f"task {tok.task.name!r}")
    base_metric = corrupt_metric if cfg.direction == "denoise" else clean_metric
    effects = (patched - base_metric[:, None]).view(N, *grid.shape)
    patched_mean = patched.mean(0).view(grid.shape)
    values = effects.mean(0)
    prov = make_provenance(model, tok.task, "activation_patching", cfg)
    prov["sites"] = str(sites)
    prov["run_key"] = key
    prov["sanity_max_abs"] = sanity
    prov["direction"] = cfg.direction
    prov["plan"] = [pl.describe() for pl in plans]
    scores = Scores(
        values=values,
        axes=grid.axes,
        site_kind=sites.kind,
        value_name="effect",
        metric=cfg.metric,
        baselines={"clean": float(clean_metric.mean()), "corrupt": float(corrupt_metric.mean())},
        labels=result_labels(grid, tok),
        per_example=effects,
        extras={"patched": patched_mean, "clean_per_example": clean_metric, "corrupt_per_example": corrupt_metric},
        provenance=prov,
    )
    if ckpt is not None:
        scores.save(out_dir)  # type: ignore[arg-type]
        ckpt.clear()
    return scores
