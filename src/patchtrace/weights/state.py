"""Weights seen as a flat ``{name: tensor}`` table, whatever holds them.

A :class:`~patchtrace.weights.WeightPatch` is made from, checked against and applied to either a
``torch.nn.Module`` (a CNN, an HF causal LM, a diffusers UNet, a patchtrace ``Model``) or a plain
state dict (what a safetensors file holds). This module gives both the same view:

* :func:`tensors_of`: the state-dict tensors, with *tied* duplicates dropped (an unembedding sharing
  the embedding's storage appears once, under its first name). That is exactly what
  ``safetensors.torch.save_model`` and ``save_pretrained`` write, so a model and the file it was
  saved to have the same names, the same :func:`architecture` and the same :func:`base_hash`.
* :func:`base_hash`: :func:`patchtrace.models.weights.sha256` over that table (names, shapes and
  bytes; first 16 hex digits).
* :func:`architecture`: ``(name, shape, dtype)`` per tensor, to tell "same architecture, other
  weights" (allowed with ``allow_other_base``) from "another architecture" (never allowed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from patchtrace.models.weights import sha256

#: ``(name, shape, dtype)`` of every tensor of a model, in state-dict order.
Arch = tuple[tuple[str, tuple[int, ...], str], ...]


def module_of(model: Any) -> Any:
    """The ``torch.nn.Module`` behind ``model`` (a patchtrace ``Model`` holds it as ``.hf``), or a mapping as is."""
    if isinstance(model, torch.nn.Module) or isinstance(model, Mapping):
        return model
    hf = getattr(model, "hf", None)
    if isinstance(hf, torch.nn.Module):
        return hf
    from patchtrace.weights.errors import WeightPatchError

    raise WeightPatchError(f"expected a torch.nn.Module or a state dict, got a {type(model).__name__}")


def tensors_of(model: Any, keep_vars: bool = False) -> dict[str, Tensor]:
    """``{name: tensor}`` of a module's state dict (tied duplicates dropped) or of a mapping.

    With ``keep_vars`` the module's own parameter/buffer objects are returned (to write into)."""
    model = module_of(model)
    if isinstance(model, Mapping):
        return dict(model)
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in model.state_dict(keep_vars=keep_vars).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = t
    return out


class _View:
    """A mapping dressed as a module (``state_dict()``), so :func:`patchtrace.models.weights.sha256` hashes it."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._t = tensors

    def state_dict(self) -> Mapping[str, Tensor]:
        return self._t


def base_hash(model: Any) -> str:
    """The weights hash a patch records and checks: SHA-256 of :func:`tensors_of` (16 hex digits)."""
    return sha256(_View(tensors_of(model)))


def architecture(model: Any) -> Arch:
    """``(name, shape, dtype)`` per tensor of :func:`tensors_of`, in order."""
    return tuple(
        (n, tuple(int(s) for s in t.shape), str(t.dtype).replace("torch.", "")) for n, t in tensors_of(model).items()
    )


def first_arch_mismatch(expected: Arch, actual: Arch) -> str | None:
    """A sentence naming the first difference between two architectures, or None when they agree."""
    exp = {n: (s, d) for n, s, d in expected}
    act = {n: (s, d) for n, s, d in actual}
    for n, s, _ in expected:
        if n not in act:
            return f"the model has no tensor {n!r} (the patch's base has it, shape {s})"
        if act[n][0] != s:
            return f"tensor {n!r} has shape {act[n][0]} in the model, {s} in the patch's base"
    for n, s, _ in actual:
        if n not in exp:
            return f"the model has a tensor {n!r} (shape {s}) that the patch's base does not have"
    return None


__all__ = ["Arch", "architecture", "base_hash", "first_arch_mismatch", "module_of", "tensors_of"]
