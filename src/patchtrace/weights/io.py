"""A weight patch on disk: ``patch.safetensors`` + ``patch.json`` in one folder, never pickle.

``patch.safetensors`` holds each plain delta as float32 (``delta/<name>``) and each quantized one as
its bit-packed codes (``codes/<name>``, uint8). ``patch.json`` holds the rest: format and version,
the base's architecture and hash, per-tensor quantization (scheme, levels, range, bits), provenance,
the SHA-256 of ``patch.safetensors`` and a SHA-256 of the JSON's own content. :func:`load` verifies
both before it reads a tensor, so a truncated download, an edited byte or an edited base hash is
refused with an error naming the file, instead of silently patching a model with garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from patchtrace.results import file_sha256
from patchtrace.weights.errors import WeightPatchError
from patchtrace.weights.quantize import QTensor, pack, unpack

if TYPE_CHECKING:
    from patchtrace.weights.patch import WeightPatch

FORMAT = "patchtrace-weight-patch"
VERSION = 1


def _json_sha(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "json_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def is_patch_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save`."""
    p = Path(path)
    return (p / "patch.json").is_file() and (p / "patch.safetensors").is_file()


def save(patch: WeightPatch, path: str | Path) -> Path:
    """Write the patch into folder ``path`` (created; an existing patch there is replaced)."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise WeightPatchError(f"{p}: is a file; a patch is saved as a folder (patch.safetensors + patch.json)")
    p.mkdir(parents=True, exist_ok=True)
    tensors = {}
    quant = {}
    for n, d in patch.deltas.items():
        q = patch.quant.get(n)
        if q is None:
            tensors[f"delta/{n}"] = d.contiguous()
        else:
            tensors[f"codes/{n}"] = pack(q.codes, q.bits)
            quant[n] = {"scheme": q.scheme, "levels": q.levels, "lo": q.lo, "hi": q.hi, "bits": q.bits,
                        "count": int(q.codes.numel()), "shape": list(q.shape)}
    save_file(tensors, str(p / "patch.safetensors"))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": VERSION,
        "base_hash": patch.base_hash,
        "arch": [[n, list(s), dt] for n, s, dt in patch.arch],
        "tensors": list(patch.deltas),
        "quant": quant,
        "nbytes": patch.nbytes,
        "meta": json.loads(json.dumps(dict(patch.meta), default=str)),
        "safetensors_sha256": file_sha256(p / "patch.safetensors"),
    }
    meta["json_sha256"] = _json_sha(meta)
    (p / "patch.json").write_text(json.dumps(meta, indent=1))
    return p


def load(path: str | Path) -> WeightPatch:
    """Read and verify a folder written by :func:`save`.

    Raises:
        WeightPatchError: not a patch folder, unreadable JSON, another format/version, a checksum
            that does not match (tampered or truncated), or a malformed tensor (each naming the file).
    """
    from safetensors.torch import load_file

    from patchtrace.weights.patch import WeightPatch

    p = Path(path)
    if not is_patch_dir(p):
        raise WeightPatchError(f"{p}: not a weight-patch folder (needs patch.json and patch.safetensors)")
    try:
        meta = json.loads((p / "patch.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightPatchError(f"{p / 'patch.json'}: not valid JSON ({e}); the file is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightPatchError(f"{p / 'patch.json'}: not a {FORMAT} file")
    if meta.get("format_version") != VERSION:
        raise WeightPatchError(f"{p / 'patch.json'}: format version {meta.get('format_version')} is not {VERSION}")
    if meta.get("json_sha256") != _json_sha(meta):
        raise WeightPatchError(f"{p / 'patch.json'}: checksum mismatch: the JSON was edited after saving")
    if file_sha256(p / "patch.safetensors") != meta.get("safetensors_sha256"):
        raise WeightPatchError(f"{p / 'patch.safetensors'}: checksum mismatch: the file is truncated or was modified")
    try:
        t = load_file(str(p / "patch.safetensors"))
        deltas, quant = {}, {}
        for n in meta["tensors"]:
            q = meta["quant"].get(n)
            if q is None:
                deltas[n] = t[f"delta/{n}"]
            else:
                codes = unpack(t[f"codes/{n}"], int(q["bits"]), int(q["count"]))
                qt = QTensor(codes, tuple(q["shape"]), q["scheme"], int(q["levels"]), float(q["lo"]), float(q["hi"]))
                quant[n], deltas[n] = qt, qt.dequantize()
        arch = tuple((a[0], tuple(int(s) for s in a[1]), a[2]) for a in meta["arch"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise WeightPatchError(f"{p}: malformed patch ({type(e).__name__}: {e})") from None
    return WeightPatch(deltas, arch, meta["base_hash"], quant, meta.get("meta", {}))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or of a model folder (``*.safetensors`` files, sharded or not).

    Raises:
        WeightPatchError: nothing to read, or an unreadable file (named).
    """
    from safetensors.torch import load_file

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    files = [f for f in files if f.name != "patchtrace-undo.safetensors"]
    if not files or not all(f.is_file() for f in files):
        raise WeightPatchError(f"{p}: not a safetensors file or a folder holding *.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise WeightPatchError(f"{f}: unreadable safetensors ({type(e).__name__}: {e})") from None
    return out


__all__ = ["FORMAT", "VERSION", "is_patch_dir", "load", "load_tensors", "save"]
