"""Checkpoint and resume for long sweeps, with checksums and a folder lock.

A sweep is cut into *blocks* (for example one layer of a head × position grid). Each finished block
is written at once to ``<dir>/.partial/block-<k>.safetensors``; ``manifest.json`` records a key that
identifies the run (model weights hash, task hash, sites, method config) and the SHA-256 of every
finished block, and carries a checksum of itself. Started again with the same command, the sweep
loads the finished blocks and computes only the rest, so an interrupted run (Ctrl-C or killed) ends
with exactly the result of an uninterrupted one.

Nothing on disk is trusted blindly:

* a block whose bytes do not match its recorded checksum (edited floats, a truncated file, a block
  the manifest does not know) is deleted and recomputed, with a :class:`CheckpointWarning` naming it;
* a manifest that is not valid JSON or fails its own checksum is discarded with all its blocks
  (they cannot be vouched for), with a warning;
* a manifest of a *different* run is refused (:class:`CheckpointError`) rather than mixed in;
* a second process writing into the same folder is refused while the first holds the folder's lock
  (an OS advisory lock: it is released when the holder exits, even when it is killed);
* a folder that already holds the *finished* result of a different run is refused unless the caller
  asks to overwrite it (:func:`guard_finished`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import IO, Any

from torch import Tensor

from patchtrace.errors import PatchtraceError, PatchtraceWarning

LOCK_NAME = ".patchtrace.lock"


class CheckpointError(PatchtraceError, RuntimeError):
    """The folder holds partial or finished results of a different run, or another run holds it."""


class CheckpointWarning(PatchtraceWarning):
    """Something on disk was damaged and is being recomputed (the message names the file)."""


def run_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines a sweep's result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_checksum(key: str, blocks: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps({"key": key, "blocks": blocks}, sort_keys=True).encode()).hexdigest()


class FolderLock:
    """An exclusive advisory lock on an output folder (``<folder>/.patchtrace.lock``).

    Raises:
        CheckpointError: another process holds it (its pid is named when known).
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise CheckpointError(
                f"{self.path.parent} is in use by another patchtrace run (pid {holder}); "
                "wait for it to finish or use another --out folder"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def finished_key(folder: str | Path) -> str | None:
    """The run key recorded in a finished results folder, ``""`` if it has results without one, else None."""
    p = Path(folder) / "scores.json"
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return ""
    prov = meta.get("provenance") if isinstance(meta, dict) else None
    return str(prov.get("run_key", "")) if isinstance(prov, dict) else ""


def guard_finished(folder: str | Path, key: str, overwrite: bool = False) -> None:
    """Refuse to write a run into a folder that holds the finished result of a different run.

    Args:
        folder: the output folder.
        key: this run's :func:`run_key`.
        overwrite: allow replacing it (the old result files are removed first).

    Raises:
        CheckpointError: a different run's result is there and ``overwrite`` is False.
    """
    old = finished_key(folder)
    if old is None or old == key:
        return
    if not overwrite:
        raise CheckpointError(
            f"{folder} already holds the result of a different run (key {old or 'unknown'}, this run {key}); "
            "use another --out folder, or --overwrite to replace it"
        )
    remove_results(folder, partial=False)


def remove_results(folder: str | Path, partial: bool = True) -> None:
    """Delete the patchtrace result files in ``folder`` (scores, heatmap, and with ``partial`` the
    checkpoint blocks); nothing else."""
    p = Path(folder)
    for name in ("scores.json", "scores.safetensors", "heatmap.png"):
        with contextlib.suppress(FileNotFoundError):
            (p / name).unlink()
    if partial:
        shutil.rmtree(p / ".partial", ignore_errors=True)


class Checkpoint:
    """Finished blocks of one sweep, on disk, checksummed, under the folder's lock.

    Args:
        folder: the run's output folder (``.partial/`` is created inside).
        key: :func:`run_key` of the run.
        overwrite: discard partial results of a different run instead of refusing them.

    Raises:
        CheckpointError: the folder is locked by another run, or holds partial results of a different
            run (and ``overwrite`` is False).

    Use as a context manager (or call :meth:`close`) so the lock is released.
    """

    def __init__(self, folder: str | Path, key: str, overwrite: bool = False) -> None:
        self.dir = Path(folder) / ".partial"
        self.key = key
        self.overwrite = overwrite
        self._lock = FolderLock(folder).acquire()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.blocks: dict[str, str] = self._read_manifest()
        except BaseException:
            self._lock.release()
            raise

    def _read_manifest(self) -> dict[str, str]:
        man = self.dir / "manifest.json"
        if not man.is_file():
            self._discard_blocks()
            self._write_manifest({})
            return {}
        try:
            meta = json.loads(man.read_text())
            old, blocks, check = meta["key"], dict(meta.get("blocks", {})), meta.get("checksum")
            ok = check == _manifest_checksum(old, blocks)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            old, blocks, ok = None, {}, False
        if not ok:
            n = self._discard_blocks()
            warnings.warn(
                f"{man} is damaged (not valid JSON or its checksum does not match); "
                f"discarding {n} partial block(s) and recomputing them",
                CheckpointWarning,
                stacklevel=3,
            )
            self._write_manifest({})
            return {}
        if old != self.key and self.overwrite:
            self._discard_blocks()
            self._write_manifest({})
            return {}
        if old != self.key:
            raise CheckpointError(
                f"{self.dir} holds partial results of a different run (key {old}, this run {self.key}); "
                "use another --out folder, or delete it"
            )
        return blocks

    def _discard_blocks(self) -> int:
        n = 0
        for p in self.dir.glob("block-*"):
            p.unlink()
            n += 1
        return n

    def _write_manifest(self, blocks: dict[str, str]) -> None:
        man = self.dir / "manifest.json"
        tmp = man.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "blocks": blocks, "checksum": _manifest_checksum(self.key, blocks)}))
        os.replace(tmp, man)

    def _path(self, block: int) -> Path:
        return self.dir / f"block-{block:05d}.safetensors"

    def load(self, block: int) -> dict[str, Tensor] | None:
        """The tensors of a finished block, or None (also when it was damaged: it is then deleted and a
        :class:`CheckpointWarning` names it, so the caller recomputes it)."""
        from safetensors.torch import load_file

        p = self._path(block)
        if not p.is_file():
            return None
        want = self.blocks.get(str(block))
        why = None
        if want is None:
            why = "it is not in the manifest"
        elif _sha256(p) != want:
            why = "its checksum does not match the manifest"
        else:
            try:
                return load_file(str(p))
            except Exception as e:  # a file that hashes right but does not parse: still recompute
                why = f"it cannot be read ({type(e).__name__})"
        warnings.warn(f"checkpoint block {p} is damaged ({why}); recomputing it", CheckpointWarning, stacklevel=2)
        p.unlink()
        self.blocks.pop(str(block), None)
        self._write_manifest(self.blocks)
        return None

    def save(self, block: int, tensors: dict[str, Tensor]) -> None:
        """Write a finished block atomically (temp file, then rename) and record its checksum."""
        from safetensors.torch import save_file

        tmp = self._path(block).with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        digest = _sha256(tmp)
        os.replace(tmp, self._path(block))
        self.blocks[str(block)] = digest
        self._write_manifest(self.blocks)

    def clear(self) -> None:
        """Remove the partial results (after the final result is saved) and release the lock."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.close()

    def close(self) -> None:
        """Release the folder's lock (the partial blocks stay for a resume)."""
        self._lock.release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
