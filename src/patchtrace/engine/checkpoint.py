"""Checkpoint and resume for long sweeps.

A sweep is cut into *blocks* (for example one layer of a head × position grid). Each finished block
is written at once to ``<dir>/.partial/block-<k>.safetensors``; a ``manifest.json`` records a key
that identifies the run (model weights hash, task hash, sites, method config). Started again with the
same command, the sweep loads the finished blocks and computes only the rest, so an interrupted run
(Ctrl-C or killed) ends with exactly the result of an uninterrupted one. A manifest from a different
run is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from patchtrace.errors import PatchtraceError


class CheckpointError(PatchtraceError, RuntimeError):
    """The folder holds partial results of a different run."""


def run_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a sweep's result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Checkpoint:
    """Finished blocks of one sweep, on disk.

    Args:
        folder: the run's output folder (``.partial/`` is created inside).
        key: :func:`run_key` of the run.
    """

    def __init__(self, folder: str | Path, key: str) -> None:
        self.dir = Path(folder) / ".partial"
        self.key = key
        self.dir.mkdir(parents=True, exist_ok=True)
        man = self.dir / "manifest.json"
        if man.is_file():
            old = json.loads(man.read_text()).get("key")
            if old != key:
                raise CheckpointError(
                    f"{self.dir} holds partial results of a different run (key {old}, this run {key}); "
                    "use another --out folder or delete it"
                )
        else:
            man.write_text(json.dumps({"key": key}))

    def _path(self, block: int) -> Path:
        return self.dir / f"block-{block:05d}.safetensors"

    def load(self, block: int) -> dict[str, Tensor] | None:
        """The tensors of a finished block, or None."""
        from safetensors.torch import load_file

        p = self._path(block)
        return load_file(str(p)) if p.is_file() else None

    def save(self, block: int, tensors: dict[str, Tensor]) -> None:
        """Write a finished block atomically (write to a temp file, then rename)."""
        from safetensors.torch import save_file

        tmp = self._path(block).with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self._path(block))

    def done(self) -> int:
        return len(list(self.dir.glob("block-*.safetensors")))

    def clear(self) -> None:
        """Remove the partial results (after the final result is saved)."""
        for p in self.dir.glob("*"):
            p.unlink()
        self.dir.rmdir()
