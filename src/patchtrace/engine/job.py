"""Sweep jobs: the engine owns plan → blocks → run a block → merge, with checkpoints and executors.

A sweep-type method (activation patching, causal tracing, DBM's exact evaluation) only *describes*
its work as a :class:`SweepJob`: a run key (everything that determines the result), a list of
blocks (each a unit of work with a size for the progress bar), ``run_block(i)`` returning the
block's tensors, and ``merge`` turning all blocks' tensors into the result. :func:`execute` does the
rest, the same way for every method:

* takes the output folder's lock, refuses a folder holding another run's result (unless
  overwriting), and reloads the blocks a previous, interrupted run finished (checksummed: a damaged
  block is recomputed with a warning — see :mod:`patchtrace.engine.checkpoint`);
* hands the missing blocks to an :class:`Executor` (:class:`LocalExecutor` here; a distributed one
  plugs in with no change to the methods, since a block is addressed by its index alone);
* saves each finished block at once, reports progress in the method's own units, merges in block
  order (so the result does not depend on the order blocks finished in), saves the result and
  clears the partial blocks.

Because merging only reads the blocks' tensors, a resumed run gives the uninterrupted result bit for
bit, whichever executor computed which block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from torch import Tensor

from patchtrace.engine.checkpoint import Checkpoint, guard_finished

R = TypeVar("R")
BlockResult = dict[str, Tensor]


@dataclass(frozen=True)
class Block:
    """One unit of a sweep's work.

    Attributes:
        index: position in the job's plan (also its checkpoint key).
        size: work units it covers (patches, cells ...), for progress.
        label: a short description (``group 0, cells 0-511``).
    """

    index: int
    size: int
    label: str = ""


class SweepJob(Protocol[R]):  # type: ignore[misc]
    """What a sweep-type method describes; :func:`execute` runs it."""

    @property
    def key(self) -> str:
        """:func:`~patchtrace.engine.checkpoint.run_key` of everything that determines the result."""
        ...

    def blocks(self) -> Sequence[Block]:
        """The plan (computed before any block runs; raises on bad input or a refused memory budget)."""
        ...

    def run_block(self, block: Block, on_progress: Callable[[int], None] | None = None) -> BlockResult:
        """Compute one block; ``on_progress(k)`` may be called with work finished inside it."""
        ...

    def merge(self, results: Sequence[BlockResult]) -> R:
        """The result from every block's tensors, in block order."""
        ...


class Executor(Protocol):
    """Runs the blocks a job still needs; yields ``(block, tensors)`` as each finishes."""

    def map(
        self, job: SweepJob[Any], blocks: Sequence[Block], on_progress: Callable[[int], None]
    ) -> Iterable[tuple[Block, BlockResult]]: ...


class LocalExecutor:
    """Runs blocks one after another in this process."""

    def map(
        self, job: SweepJob[Any], blocks: Sequence[Block], on_progress: Callable[[int], None]
    ) -> Iterable[tuple[Block, BlockResult]]:
        for b in blocks:
            seen = 0

            def tick(k: int) -> None:
                nonlocal seen
                seen += k
                on_progress(k)

            out = job.run_block(b, tick)
            if seen < b.size:  # a block that reports nothing (or less) still finishes its share
                on_progress(b.size - seen)
            yield b, out


def execute(
    job: SweepJob[R],
    *,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    save: Callable[[R, Path], Any] | None = None,
) -> R:
    """Run a sweep job: checkpoint/resume in ``out_dir``, blocks on ``executor``, merge, save.

    Args:
        job: the method's description of the work.
        out_dir: results folder; finished blocks are checkpointed there and a rerun resumes.
        overwrite: replace another run's finished result in ``out_dir`` (otherwise refused).
        executor: where blocks run (default :class:`LocalExecutor`).
        on_progress: ``on_progress(done, total)`` in the job's work units.
        save: writes the merged result into ``out_dir`` (default: ``result.save(out_dir)``).

    Raises:
        CheckpointError: ``out_dir`` is held by another run or holds a different run's result.
    """
    plan = list(job.blocks())
    total = sum(b.size for b in plan)
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if on_progress is not None:
            on_progress(done, total)

    ckpt = Checkpoint(out_dir, job.key, overwrite) if out_dir is not None else None
    try:
        if out_dir is not None:
            guard_finished(out_dir, job.key, overwrite)
        results: dict[int, BlockResult] = {}
        todo: list[Block] = []
        for b in plan:
            cached = ckpt.load(b.index) if ckpt is not None else None
            if cached is not None:
                results[b.index] = cached
                tick(b.size)
            else:
                todo.append(b)
        if on_progress is not None and not todo:
            on_progress(done, total)
        for b, tensors in (executor or LocalExecutor()).map(job, todo, tick):
            results[b.index] = tensors
            if ckpt is not None:
                ckpt.save(b.index, tensors)
        result = job.merge([results[b.index] for b in plan])
        if out_dir is not None:
            (save or _default_save)(result, Path(out_dir))
            assert ckpt is not None
            ckpt.clear()
            with contextlib.suppress(OSError):  # a job whose result is saved elsewhere leaves no empty folder
                Path(out_dir).rmdir()
        return result
    finally:
        if ckpt is not None:
            ckpt.close()


def _default_save(result: Any, path: Path) -> None:
    result.save(path)


__all__ = ["Block", "BlockResult", "Executor", "LocalExecutor", "SweepJob", "execute"]
