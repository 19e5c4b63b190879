"""Memory and cost planning of a sweep, before any compute.

A sweep's working memory is the cached base and source runs plus one chunk of batch rows; the
runner's stages say what one row allocates (:meth:`~patchtrace.models.stages.Stages.row_bytes`), so
the engine can cut a sweep into chunks that fit a budget and refuse, before computing anything, a
budget that cannot hold even one patch. :func:`plan_sweep` also counts the work in full-forward
equivalents, which is what ``--dry-run`` prints.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchtrace.engine.joins import join_key
from patchtrace.engine.patch import EngineError, Patch
from patchtrace.models.load import Model


@dataclass
class SweepPlan:
    """How a sweep will run, before it runs (``--dry-run`` prints this)."""

    mode: str
    n_patches: int
    n_examples: int
    rows_per_chunk: int
    n_chunks: int
    forward_equivalents: float
    peak_bytes: int

    def describe(self) -> str:
        return (
            f"mode={self.mode} patches={self.n_patches} examples={self.n_examples} "
            f"chunks={self.n_chunks} (≤{self.rows_per_chunk} rows) "
            f"≈{self.forward_equivalents:.1f} full-forward equivalents, est. peak {self.peak_bytes / 2**20:.0f} MiB"
        )


def row_bytes(model: Model, n: int, T: int, ncols: int | None) -> int:
    """Estimated peak working memory (bytes) of one batch row computing ``n`` positions of a
    ``T``-token prompt: what the runner's stages allocate (:meth:`~patchtrace.models.stages.Stages.row_bytes`)."""
    return model.runner.row_bytes(n, T, ncols, model.dtype)


#: Default ceiling of the working-memory budget on CPU. Beyond a few hundred rows per batch a CPU
#: gains nothing from bigger batches (the 270-head sweep ran as fast or faster at 16 MiB than at 64 MiB,
#: BENCHMARKS.md), and the working set is the part of peak memory a sweep adds over a plain forward loop.
DEFAULT_BUDGET_CAP = 16 << 20


def default_budget(model: Model) -> int:
    """Working-memory budget in bytes: on CPU a quarter of available RAM capped at
    :data:`DEFAULT_BUDGET_CAP` (at least 8 MiB); on CUDA half of the free VRAM (at least 64 MiB).

    The default is a preference, not a limit: a patch that needs more still runs, one per chunk
    (see ``strict`` in :func:`patches_per_chunk`); only a budget the caller gives is enforced."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return max(64 << 20, int(free * 0.5))
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        avail = info.get("MemAvailable", 8 << 30)
    except OSError:
        avail = 8 << 30
    return min(DEFAULT_BUDGET_CAP, max(8 << 20, avail // 4))


def patches_per_chunk(
    model: Model, n: int, T: int, ncols: int | None, n_examples: int, budget: int, *, strict: bool = True
) -> int:
    """How many patches (each ``n_examples`` rows of ``n`` positions) fit in ``budget`` bytes.

    Args:
        strict: refuse a budget that cannot hold one patch (a budget the caller gave); False (the
            default budget) runs one patch per chunk instead.

    Raises:
        EngineError: ``strict`` and the budget cannot hold even one patch.
    """
    need = row_bytes(model, n, T, ncols) * n_examples
    if need > budget and not strict:
        return 1
    if need > budget:
        raise EngineError(
            f"memory budget {budget / 2**20:.0f} MiB cannot hold one patch of {n_examples} examples × {n} positions "
            f"(needs ~{need / 2**20:.0f} MiB); raise max_memory (--max-memory) or use fewer examples"
        )
    return max(1, budget // need)


def plan_sweep(
    model: Model, patches: Sequence[Patch], n_examples: int, T: int, *, fast: bool = True,
    max_memory: int | None = None, ncols: int | None = None,
) -> SweepPlan:
    """Estimate chunks, full-forward equivalents and peak memory of a sweep, without running it.

    Forward equivalents count position-layers computed, relative to one full forward of the
    ``n_examples`` prompts (the no-op skip of :func:`run_patches` is not predicted here).
    Peak memory = the cached base/source runs + the largest chunk's working memory, over the model's
    own footprint. Both runs are counted from the earliest patched position on (activation patching
    records no more), the source run without keys/values and as if it kept every activation (it keeps
    only the patched ones). ``patches`` is read once.

    Raises:
        EngineError: the budget cannot hold even one patch's rows.
    """
    budget = max_memory or default_budget(model)
    L = model.dims.n_layers
    causal = model.family.causal  # bidirectional attention: no suffix shortcut (see engine.sweep)
    sizes: dict[int, int] = defaultdict(int)  # first position computed -> patches
    fe = 0.0
    first = T  # the earliest patched position: the runs are recorded from there on
    for pt in patches:  # one pass: a patch may be built when read (CellPatches)
        p = pt.start_pos if fast and causal else 0
        sizes[p] += 1
        first = min(first, pt.start_pos if causal else 0)
        if fast:
            key = join_key(pt, model)
            layers = L - max(key[0], 0) - (0.5 if key[1] == 1 else 0.0)
            fe += max(layers, 0.0) / L * (T - p) / T
        else:
            fe += 1.0
    chunks = 0
    max_rows = 0
    for p, count in sizes.items():
        per_chunk = patches_per_chunk(model, T - p, T, ncols if fast else None, n_examples, budget,
                                      strict=max_memory is not None)
        chunks += math.ceil(count / per_chunk)
        max_rows = max(max_rows, min(count, per_chunk) * n_examples)
    n_max = T - min(sizes) if sizes else T
    # the base run keeps keys/values; the source run (only patched from) keeps none
    caches = (model.runner.cache_bytes(n_examples, T, model.dtype, n_pos=T - first)
              + model.runner.cache_bytes(n_examples, T, model.dtype, n_pos=T - first, kv=False))
    peak = caches + max_rows * row_bytes(model, n_max, T, ncols if fast else None)
    mode = "plain" if not fast else "fast" if causal else (
        f"fast (no suffix shortcut: {model.family.name} attention is bidirectional; resumes at the patched layer, "
        "all positions)")
    return SweepPlan(mode, len(patches), n_examples, max_rows, chunks, fe, int(peak))


__all__ = ["DEFAULT_BUDGET_CAP", "SweepPlan", "default_budget", "patches_per_chunk", "plan_sweep", "row_bytes"]
