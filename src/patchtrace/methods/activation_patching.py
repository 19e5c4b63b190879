"""Exact activation patching, over any grid of sites, as a sweep job of the engine.

Denoising (default) runs the corrupt prompt and restores one clean activation at a time: it asks
whether a component is *sufficient* to bring the behaviour back. Noising runs the clean prompt and
patches in a corrupt activation: is the component *necessary*? The two are not symmetric, so the
direction is recorded with every result.

The result's ``values`` are effects ``M(patched) − M(base)`` averaged over examples;
``extras['patched']`` holds the mean patched metric, and :meth:`Scores.normalized` gives the
normalized recovery (0 = corrupt baseline, 1 = clean).

A built-in sanity check patches the base run into itself at a few sites and records the largest
change (it must be ~0) as ``provenance['sanity_max_abs']``.

Example:
    Denoise the nine heads of layer 23 on two IOI prompts (the bundled SmolLM2):

    >>> from patchtrace import load_model, make_task, SiteSpec
    >>> m = load_model()
    >>> s = run(m, make_task("ioi", n=2), SiteSpec("head", per_unit=True, layers=(23,)))
    >>> s.axes, tuple(s.values.shape)
    (('layer', 'head'), (1, 9))
    >>> s.baselines["clean"] > 0 > s.baselines["corrupt"]   # the corrupt prompt names the wrong person
    True
    >>> site, effect = s.top_k(1)[0]
    >>> str(site), effect > 0                               # L23.H3, a name mover, restores the most
    ('head[23].h3@-1', True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from patchtrace.engine.checkpoint import run_key
from patchtrace.engine.job import Block, Executor, execute
from patchtrace.engine.joins import patch_base_points
from patchtrace.engine.patch import CellPatches
from patchtrace.engine.sweep import (
    EngineError,
    RunCache,
    Scorer,
    before_difference,
    collect,
    first_difference,
    plan_sweep,
    run_patches,
)
from patchtrace.grid import Grid, GridError
from patchtrace.methods.registry import register_method
from patchtrace.methods.validate import check_bool, check_direction, check_int, check_metric
from patchtrace.metrics import Metric, warn_zero_gap
from patchtrace.models.load import Model
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import HookPoint, SiteSpec
from patchtrace.tasks.base import Task, TaskError, TokenizedTask

Direction = Literal["denoise", "noise"]

#: Batch rows (patches × examples) per checkpointed block of a sweep.
ROWS_PER_BLOCK = 2048


@dataclass(frozen=True, kw_only=True)
class PatchingConfig:
    """Settings of an activation-patching sweep (keyword-only; checked when built).

    Attributes:
        direction: ``denoise`` (clean into corrupt) or ``noise`` (corrupt into clean).
        metric: metric name (:data:`patchtrace.metrics.METRICS`).
        fast: use the engine's fast path; False runs one full forward per patch (same numbers).
        max_memory: working-memory budget in bytes (None: a quarter of available memory).
        sanity_check: patch the base run into itself at a few sites and record the largest change.
        block_rows: batch rows (patches × examples) per checkpointed block.

    Raises:
        ConfigError: a field of the wrong type or out of range (e.g. ``direction="sideways"``).
    """

    direction: Direction = "denoise"
    metric: str = "logit_diff"
    fast: bool = True
    max_memory: int | None = None
    sanity_check: bool = True
    block_rows: int = ROWS_PER_BLOCK

    def __post_init__(self) -> None:
        check_direction(self)
        check_metric(self)
        check_bool(self, "fast")
        check_int(self, "max_memory", low=1, optional=True)
        check_bool(self, "sanity_check")
        check_int(self, "block_rows", low=1)


def refuse_zero_gap(tok: TokenizedTask, idx: Sequence[int], clean: torch.Tensor, corrupt: torch.Tensor,
                    tol: float = 1e-6) -> None:
    """Refuse examples whose clean and corrupt metric coincide (a zero baseline gap): every effect on
    them is zero by construction and their recovery divides by zero. With
    ``tok.allow_degenerate`` they run, and :func:`~patchtrace.metrics.warn_zero_gap` names them.

    Raises:
        TaskError: such examples (names them, their metric, and how to run anyway).
    """
    if tok.allow_degenerate:
        return
    local = ((clean.float() - corrupt.float()).abs() <= tol).nonzero().flatten().tolist()
    if local:
        bad = [int(idx[i]) for i in local]
        shown = ", ".join(str(i) for i in bad[:8]) + ("" if len(bad) <= 8 else f", ... ({len(bad)} in all)")
        raise TaskError(
            f"task {tok.task.name!r}: example(s) {shown} have a zero baseline gap (clean = corrupt metric "
            f"{float(clean[local[0]]):+.4g}), so their effects are zero by construction; fix or drop them "
            "(or run them anyway: allow_degenerate=True in tokenize, --allow-degenerate on `patchtrace patch`)"
        )


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
    executor: Executor | None = None,
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
        executor: where the blocks run (default: this process; a
            :class:`~patchtrace.engine.executors.ray_executor.RayExecutor` gives the same result bit for bit).

    Raises:
        CheckpointError: ``out_dir`` is in use by another run, or holds another run's result.

    Returns:
        :class:`Scores` of effects with axes from the grid.
    """
    cfg = config or PatchingConfig()
    tok = task if isinstance(task, TokenizedTask) else task.tokenize(model.tokenizer)
    job = PatchingJob(model, tok, sites, cfg)
    return execute(job, out_dir=out_dir, overwrite=overwrite, on_progress=on_progress, executor=executor)


@dataclass
class _GroupState:
    """One equal-length group's recorded runs and scorer (kept for one group at a time)."""

    base_ids: torch.Tensor
    runs: dict[str, RunCache]
    scorer: Scorer
    source_ids: torch.Tensor | None  # given: patches before the first differing token are skipped unread


class PatchingJob:
    """Activation patching as an engine sweep job: blocks of cells per equal-length example group.

    Each block is up to ``config.block_rows`` batch rows (cells × examples) of one group: large enough
    that the engine's staggered batches stay efficient, small enough that an interrupted sweep loses
    little. The plan (every group's memory plan included) is made in the constructor, before any
    compute, so a refused budget or a bad site fails at once.
    """

    def __init__(self, model: Model, tok: TokenizedTask, sites: SiteSpec, cfg: PatchingConfig) -> None:
        self.model, self.tok, self.sites, self.cfg = model, tok, sites, cfg
        self.grid = build_grid(model, sites, tok)
        self.metric = Metric(cfg.metric)
        self.key = run_key(
            {"model": model.weights_hash(), "task": tok.task.hash(), "sites": str(sites), "config": asdict(cfg),
             "m": "ap"}
        )
        self.groups = tok.groups()
        # where the metric reads: the last position, or a masked LM's mask position (checked here, before compute)
        self.readouts = [tok.readout(g, mask=not model.family.causal) for g in self.groups]
        n_cells = len(self.grid)
        # built when read (a block's worth at a time); the plan below reads, and so checks, every one
        self.patches = [CellPatches(self.grid, model, tok.lengths[g[0]]) for g in self.groups]
        cols = self.metric.columns(tok.answer, tok.wrong)
        self.plans = [
            plan_sweep(model, gp, len(g), tok.lengths[g[0]], fast=cfg.fast, max_memory=cfg.max_memory,
                       ncols=None if cols is None else len(cols))
            for g, gp in zip(self.groups, self.patches, strict=True)
        ]  # raises before any compute if the memory budget cannot hold a patch
        per = max(1, cfg.block_rows // max(1, len(tok)))
        self._blocks: list[Block] = []
        self._where: list[tuple[int, int, int]] = []
        for gi in range(len(self.groups)):
            for b0 in range(0, n_cells, per):
                b1 = min(n_cells, b0 + per)
                self._where.append((gi, b0, b1))
                self._blocks.append(Block(len(self._blocks), b1 - b0, f"group {gi}, cells {b0}-{b1 - 1}"))
        self._state: tuple[int, _GroupState] | None = None
        self._baselines: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def blocks(self) -> list[Block]:
        return self._blocks

    def _group(self, gi: int) -> _GroupState:
        """The runs of group ``gi`` (recorded once; the previous group's are dropped)."""
        if self._state is not None and self._state[0] == gi:
            return self._state[1]
        self._state = None
        m, tok, cfg, idx = self.model, self.tok, self.cfg, self.groups[gi]
        ids_c, ids_k = tok.ids("clean", idx).to(m.device), tok.ids("corrupt", idx).to(m.device)
        # keep only the positions read: the fast path skips (unread) plain patches before the first
        # token where clean and corrupt differ, so the runs start at the earliest patch after it
        d = first_difference(ids_c, ids_k) if cfg.fast and m.family.causal else 0
        points: set[HookPoint] = set()  # what the patches read from the source run
        need: set[HookPoint] = set()  # ... and from the base run (the fast path's joins)
        live: list[int] = []  # indices of the patches that are not no-ops
        p0 = tok.lengths[idx[0]]
        for i, pt in enumerate(self.patches[gi]):  # one pass: each patch is built when read
            points.update(s.point for s in pt.sites)
            if cfg.fast:
                need |= patch_base_points(pt, m)
            if not before_difference(pt, d):
                live.append(i)
                p0 = min(p0, pt.start_pos)
        need |= points
        p0 = max(0, d - 1) if not live else p0
        p0 = p0 if m.family.causal else 0  # bidirectional attention reads every position
        ro = self.readouts[gi]
        # the source run keeps only the patched points (no resid_pre, no keys/values): nothing resumes from it
        denoise = cfg.direction == "denoise"
        clean = collect(m, ids_c, need if not denoise else points, from_pos=p0, readout=ro, base=not denoise)
        corrupt = collect(m, ids_k, need if denoise else points, from_pos=p0, readout=ro, base=denoise)
        ref = torch.log_softmax(clean.logits, -1) if self.metric.name == "kl" else None
        scorer = Scorer(self.metric, tok.answer[idx].to(m.device), tok.wrong[idx].to(m.device), ref,
                        pos=None if ro is None else ro.to(m.device))
        c_m, k_m = scorer(clean.logits, 1, False)[0].cpu(), scorer(corrupt.logits, 1, False)[0].cpu()
        refuse_zero_gap(tok, idx, c_m, k_m)  # before any patch of this group is run
        sanity = 0.0
        if cfg.sanity_check and live:
            some = [self.patches[gi][i] for i in live[:: max(1, len(live) // 3)][:3]]
            # the base run into itself: every patch is a no-op, so force the engine to compute them
            b_ids, b_run, b_m = (ids_k, corrupt, k_m) if denoise else (ids_c, clean, c_m)
            same = run_patches(m, b_ids, b_run, b_run, some, scorer, fast=cfg.fast, max_memory=cfg.max_memory,
                               skip_noops=False)
            sanity = float((same - b_m[None]).abs().max())
        self._baselines[gi] = (c_m, k_m, sanity)
        if denoise:
            st = _GroupState(ids_k, {"base": corrupt, "source": clean}, scorer, ids_c if d else None)
        else:
            st = _GroupState(ids_c, {"base": clean, "source": corrupt}, scorer, ids_k if d else None)
        self._state = (gi, st)
        return st

    def run_block(self, block: Block, on_progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
        gi, b0, b1 = self._where[block.index]
        st = self._group(gi)
        vals = run_patches(
            self.model, st.base_ids, st.runs["base"], st.runs["source"], self.patches[gi][b0:b1], st.scorer,
            fast=self.cfg.fast, max_memory=self.cfg.max_memory, on_chunk=on_progress, source_ids=st.source_ids,
        )
        return {"patched": vals.cpu()}

    def merge(self, results: Sequence[dict[str, torch.Tensor]]) -> Scores:
        tok, cfg, grid = self.tok, self.cfg, self.grid
        N, n_cells = len(tok), len(grid)
        patched = torch.zeros(N, n_cells)
        for (gi, b0, b1), r in zip(self._where, results, strict=True):
            patched[self.groups[gi], b0:b1] = r["patched"].T
        clean_metric, corrupt_metric = torch.zeros(N), torch.zeros(N)
        sanity = 0.0
        for gi, idx in enumerate(self.groups):
            if gi not in self._baselines:  # every block of this group was resumed from disk
                self._group(gi)
            c_m, k_m, san = self._baselines[gi]
            clean_metric[idx], corrupt_metric[idx] = c_m, k_m
            sanity = max(sanity, san)
        self._state = None
        warn_zero_gap(clean_metric, corrupt_metric, f"task {tok.task.name!r}")
        base_metric = corrupt_metric if cfg.direction == "denoise" else clean_metric
        effects = (patched - base_metric[:, None]).view(N, *grid.shape)
        prov = make_provenance(self.model, tok.task, "activation_patching", cfg)
        prov.update({"sites": str(self.sites), "run_key": self.key, "sanity_max_abs": sanity,
                     "direction": cfg.direction, "plan": [pl.describe() for pl in self.plans]})
        return Scores(
            values=effects.mean(0),
            axes=grid.axes,
            site_kind=self.sites.kind,
            value_name="effect",
            metric=cfg.metric,
            baselines={"clean": float(clean_metric.mean()), "corrupt": float(corrupt_metric.mean())},
            labels=result_labels(grid, tok),
            per_example=effects,
            extras={"patched": patched.mean(0).view(grid.shape), "clean_per_example": clean_metric,
                    "corrupt_per_example": corrupt_metric},
            provenance=prov,
        )


def _tiny_inputs(model: Model) -> tuple[Task, SiteSpec]:
    """Two IOI examples and the heads of two layers at the last position (for the contract tests)."""
    from patchtrace.tasks import make_task

    return make_task("ioi", n=2, seed=0), SiteSpec("head", per_unit=True, positions="last", layers=(0, 2))


register_method(
    "activation_patching", PatchingConfig, run, result=Scores, sweep=True,
    description="exact effect of patching each site (denoise: clean into corrupt; noise: the reverse)",
    tiny_config=lambda: PatchingConfig(sanity_check=False), tiny_inputs=_tiny_inputs,
    plain_baselines=("clean", "corrupt"),
    invalid_configs=({"direction": "sideways"}, {"metric": "accuracy"}, {"max_memory": 0}, {"block_rows": 0}),
)
