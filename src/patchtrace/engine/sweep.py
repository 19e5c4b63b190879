"""The sweep engine: run many exact patches, as few FLOPs as exactness allows.

A *patch* is a tuple of interventions (:mod:`patchtrace.interventions`) applied together in a *base*
run — most often sites replaced by their values in a *source* run (denoising: base = corrupt,
source = clean; noising: the reverse), but also ablations, mixes, added vectors, and values read
from another layer, position or prompt. For every patch the engine returns the metric per example.
It is the one place where patched forwards happen; activation patching, causal tracing and DBM's
exact evaluation call it through sweep jobs (:mod:`patchtrace.engine.job`), and a cross-layer or
cross-prompt write (back-patching, a Patchscopes-style readout) is an intervention it runs like any
other (``tests/engine/test_interventions.py`` checks both against an independent reference).

The engine's pieces: recorded runs (:mod:`~patchtrace.engine.cache`), patches and their resolution
(:mod:`~patchtrace.engine.patch`), the writes themselves (:mod:`~patchtrace.engine.apply`), where
rows join the batch (:mod:`~patchtrace.engine.joins`) and memory planning
(:mod:`~patchtrace.engine.plan`); this module runs batches of patches.

Why it is fast (and still exact). Patching a site at layer ``L`` and positions ``≥ p`` changes
nothing below layer ``L`` and, with causal attention, nothing at positions ``< p``. So:

(a) **resume at the patched layer**: the run starts from the base run's cached residual stream
    entering layer ``L``;
(b) **suffix only**: only positions ``p..T-1`` are computed, attending to the base run's cached
    keys/values of positions ``< p`` (positions are absolute, so rotary and learned position
    embeddings come out the same);
(c) **many patches per batch**: rows are ``patch × example``; the prefix keys/values are shared;
(d) **answer columns only**: when the metric reads a few logits (logit difference), only those
    columns of the unembedding are computed, at the last position only (a masked LM: at the mask
    position, ``Scorer.pos``).

Encoders (BERT, RoBERTa) attend in both directions: a patch at position ``p`` changes every position
of the layers above it, so (b) does not hold and is turned off (every patch recomputes all positions,
and the sweep plan says so); (a), (c) and (d) still hold.

The *plain* path runs every patch as a full forward from the embeddings (still batched); it is used
when ``fast=False`` and serves as the in-library cross-check. The test-suite checks both against an
independent reference written with hooks on the Hugging Face modules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from patchtrace.engine.apply import intervention_hook, select
from patchtrace.engine.cache import RunCache, collect
from patchtrace.engine.joins import base_points, is_shortcut, join_key, joins, patch_base_points
from patchtrace.engine.patch import EngineError, Patch, Scorer, resolve, resolve_patch
from patchtrace.engine.plan import (
    DEFAULT_BUDGET_CAP,
    SweepPlan,
    default_budget,
    patches_per_chunk,
    plan_sweep,
    row_bytes,
)
from patchtrace.kinds import needs_explicit_attention
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn, RunOutput
from patchtrace.sites import HookPoint


def run_patches(
    model: Model,
    base_ids: Tensor,
    base: RunCache,
    source: RunCache,
    patches: Sequence[Patch],
    scorer: Scorer,
    *,
    fast: bool = True,
    base_hooks: dict[HookPoint, list[HookFn]] | None = None,
    max_memory: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    skip_noops: bool = True,
    runs: Mapping[str, RunCache] | None = None,
    source_ids: Tensor | None = None,
) -> Tensor:
    """Run every patch; return the metric ``[P, N]``.

    Args:
        model: the model.
        base_ids: ``[N, T]`` token ids of the base run.
        base: the base run's cache (from :func:`collect`, with ``base_hooks`` applied); activations
            the fast path needs and the cache lacks are recorded by one extra base forward.
        source: the source run's cache (run name ``"source"``), holding every point patched from it.
        patches: patches (sites or interventions); negative positions are resolved here.
        scorer: metric of the readout logits (the last position, or ``scorer.pos``).
        fast: use the fast path (a)–(d); False runs plain full forwards.
        base_hooks: hooks present in the base run too (e.g. causal-tracing noise); they must be
            position-aware through ``ctx.pos_offset``.
        max_memory: working-memory budget in bytes (default: :func:`default_budget`).
        on_chunk: called with the number of patches finished after each chunk (progress bars).
        skip_noops: return the base metric, uncomputed, for plain patches whose source values
            equal the base's bit for bit (exact). Turn off to force computation (sanity checks).
        runs: more recorded runs interventions may read from, by name (``"base"`` and ``"source"``
            are always there): another prompt's run for cross-prompt patching.
        source_ids: the source run's token ids, when it was recorded with no hooks (and the base run
            too: ``base_hooks`` is None). Then, with causal attention, a plain patch whose sites all
            lie before the first token where the two runs differ is a no-op by causality
            (:func:`before_difference`): skipped without reading the caches, so the runs need not
            record those positions at all (:func:`first_difference` is the ``from_pos`` to use).

    Raises:
        EngineError: a site out of range, or a source point the runs did not record.
    """
    N, T = base_ids.shape
    all_runs: dict[str, RunCache] = {"base": base, "source": source, **(runs or {})}
    patches = [resolve_patch(pt, model, T, all_runs) for pt in patches]
    _check_sources(patches, all_runs)
    out = torch.empty(len(patches), N)
    causal = model.family.causal  # bidirectional attention: no suffix shortcut, every patch starts at position 0
    if fast and not causal and base.pos0:
        raise EngineError(f"{model.family.name} attends in both directions: record the base run from position 0 "
                          f"(collect(from_pos=0)), not {base.pos0}")
    budget = max_memory or default_budget(model)
    use_cols = fast and scorer.cols is not None
    ncols = len(scorer.cols) if use_cols and scorer.cols is not None else None
    if fast:
        missing = base_points(patches, model) - set(base.acts)
        if missing:
            extra = collect(model, base_ids, missing, hooks=base_hooks, from_pos=base.pos0)
            base = RunCache({**base.acts, **extra.acts}, base.kv, base.logits, base.pos0, base.T)
            all_runs["base"] = base
    groups: dict[int, list[int]] = defaultdict(list)
    base_metric: Tensor | None = None
    prefix = fast and skip_noops and causal and source_ids is not None and base_hooks is None
    d = first_difference(base_ids, source_ids) if prefix and source_ids is not None else 0
    for i, pt in enumerate(patches):
        if fast and skip_noops and (before_difference(pt, d) or _is_noop(pt, base, source)):
            # the source equals the base at every patched site: the patched run IS the base run
            if base_metric is None:
                base_metric = scorer(base.logits, 1, False)[0].cpu()
            out[i] = base_metric
            continue
        groups[pt.start_pos if fast and causal else 0].append(i)
    skipped = len(patches) - sum(len(g) for g in groups.values())
    if on_chunk is not None and skipped:
        on_chunk(skipped)  # no-op patches are finished work: a bar counts them now, not never
    for p, idx in sorted(groups.items()):
        idx.sort(key=lambda i: join_key(patches[i], model) if fast else (0, 0, 0))
        n = T - p
        per_chunk = patches_per_chunk(model, n, T, ncols if fast else None, N, budget, strict=max_memory is not None)
        for c0 in range(0, len(idx), per_chunk):
            sel = idx[c0 : c0 + per_chunk]
            chunk = [patches[i] for i in sel]
            if fast:
                vals = _run_chunk_fast(model, base_ids, base, all_runs, chunk, p, scorer, use_cols, base_hooks)
            else:
                vals = _run_chunk_plain(model, base_ids, all_runs, chunk, scorer, base_hooks)
            out[sel] = vals.cpu()
            if on_chunk is not None:
                on_chunk(len(chunk))
    return out


def _check_sources(patches: Sequence[Patch], runs: Mapping[str, RunCache]) -> None:
    for pt in patches:
        for iv in pt.interventions:
            s = iv.source_site
            if s is None or iv.source is None:
                continue
            run = runs.get(iv.source.run)
            if run is None:
                raise EngineError(f"{iv}: no run named {iv.source.run!r} (runs: {', '.join(runs)})")
            if s.point not in run.acts:
                raise EngineError(f"the {iv.source.run} run did not record {s.point}; cannot patch {iv.target} from it")


def first_difference(base_ids: Tensor, source_ids: Tensor) -> int:
    """The first position at which two ``[N, T]`` batches of token ids differ in any example (``T``
    if they are equal).

    With causal attention, every activation at a position before it is a function of the same
    tokens in both runs, so the runs agree there and patching one into the other changes nothing:
    those positions need not be recorded. For IOI pairs (the names differ at the second mention)
    that is most of the prompt."""
    if base_ids.shape != source_ids.shape:
        raise EngineError(f"base and source token ids differ in shape: {tuple(base_ids.shape)} vs "
                          f"{tuple(source_ids.shape)}")
    cols = (base_ids != source_ids).any(0).nonzero()
    return int(cols[0]) if len(cols) else int(base_ids.shape[1])


def before_difference(patch: Patch, d: int) -> bool:
    """True if ``patch`` is plain and every site lies at a position ``< d``, the first position where
    the (hook-free) runs differ (:func:`first_difference`): a no-op by causality, exactly."""
    return patch.plain and all(s.pos is not None and s.pos < d for s in patch.sites)


def _is_noop(patch: Patch, base: RunCache, source: RunCache) -> bool:
    """True if the patch replaces sites from the source run and, for every example, the source's
    values there are bitwise equal to the base run's. Patching then changes nothing, exactly:
    typically every position before the first token where the clean and corrupt prompts differ."""
    if not patch.plain:
        return False
    for site in patch.sites:
        a, b = base.acts.get(site.point), source.acts.get(site.point)
        if a is None or b is None or not torch.equal(select(a, site, base.pos0), select(b, site, source.pos0)):
            return False
    return True


def _hooks_for(
    chunk: Sequence[Patch], runs: Mapping[str, RunCache], N: int, P: int, skip: Callable[[int], bool],
    base_hooks: dict[HookPoint, list[HookFn]] | None,
) -> dict[HookPoint, list[HookFn]]:
    """Runner hooks: the base hooks, then one intervention hook per hook point for the patches the
    runner applies (``skip(i)``: patch ``i`` is built by the engine instead)."""
    hooks: dict[HookPoint, list[HookFn]] = defaultdict(list)
    for hp, fns in (base_hooks or {}).items():
        hooks[hp].extend(fns)
    entries: dict[HookPoint, list[tuple[int, Any]]] = defaultdict(list)
    for i, pt in enumerate(chunk):
        if skip(i):
            continue
        for iv in pt.interventions:
            entries[iv.target.point].append((i, iv))
    for hp, ents in entries.items():
        hooks[hp].append(intervention_hook(hp, ents, runs, N, P))
    return hooks


def _run_chunk_fast(
    model: Model,
    base_ids: Tensor,
    base: RunCache,
    runs: Mapping[str, RunCache],
    chunk: list[Patch],
    p: int,
    scorer: Scorer,
    use_cols: bool,
    base_hooks: dict[HookPoint, list[HookFn]] | None,
) -> Tensor:
    """Staggered batch: each block of patches joins where it first differs from the base run."""
    N, T = base_ids.shape
    keys = [join_key(pt, model) for pt in chunk]
    cols = scorer.cols if use_cols else None
    explicit = needs_explicit_attention(s.kind for pt in chunk for s in pt.sites)
    blocks: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        if i and key < keys[i - 1]:
            raise EngineError("internal: patches must be sorted by join key")
        blocks[key].append(i)
    hooks = _hooks_for(chunk, runs, N, -1, lambda i: is_shortcut(keys[i]), base_hooks)
    past = [(k[:, :, :p], v[:, :, :p]) for k, v in base.kv] if p > 0 else None
    rows = joins(model, base, runs, chunk, blocks, p, N, T)
    common = dict(pos_offset=p, past_kv=past, hooks=hooks, last_only=True, unembed_cols=cols, explicit_attention=explicit,
                  readout=scorer.pos)
    with torch.no_grad():
        if keys[0][0] < 0:  # embed patches: their rows start from the token ids
            n_embed = len(blocks[(-1, 0, 0)])
            res = model.runner.forward(base_ids[:, p:].repeat(n_embed, 1), joins=rows, **common)  # type: ignore[arg-type]
        else:
            stage, start_layer = min(rows, key=lambda k: (k[1], k[0] == "mid"))
            first = rows.pop((stage, start_layer)) if stage == "pre" else None
            h0 = first if first is not None else base.acts[HookPoint("resid_pre", start_layer)][:, base.local(p):][:0]
            if start_layer >= model.dims.n_layers:
                res = RunOutput(model.runner.unembed(model.runner.readout_rows(h0, scorer.pos, p), cols), h0, None)
            else:
                res = model.runner.forward(resid=h0, start_layer=start_layer, joins=rows, **common)  # type: ignore[arg-type]
    assert res.logits is not None
    return scorer(res.logits[:, -1], len(chunk), cols is not None)


def _run_chunk_plain(
    model: Model,
    base_ids: Tensor,
    runs: Mapping[str, RunCache],
    chunk: list[Patch],
    scorer: Scorer,
    base_hooks: dict[HookPoint, list[HookFn]] | None,
) -> Tensor:
    """Reference path inside the library: one full forward per patch (patches batched)."""
    P, N = len(chunk), base_ids.shape[0]
    hooks = _hooks_for(chunk, runs, N, P, lambda i: False, base_hooks)
    explicit = needs_explicit_attention(s.kind for pt in chunk for s in pt.sites)
    with torch.no_grad():
        res = model.runner.forward(base_ids.repeat(P, 1), hooks=hooks, last_only=True, explicit_attention=explicit,
                                   readout=scorer.pos)
    assert res.logits is not None
    return scorer(res.logits[:, -1], P, False)


__all__ = [
    "DEFAULT_BUDGET_CAP",
    "EngineError",
    "Patch",
    "RunCache",
    "Scorer",
    "SweepPlan",
    "base_points",
    "collect",
    "default_budget",
    "patch_base_points",
    "patches_per_chunk",
    "plan_sweep",
    "resolve",
    "resolve_patch",
    "row_bytes",
    "run_patches",
]
