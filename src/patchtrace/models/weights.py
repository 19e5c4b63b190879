"""Weights as data: a hash that follows edits, and scoped, all-or-nothing overrides.

Results carry the SHA-256 of the weights they were computed with (provenance). Hashing a model's
weights costs a pass over every byte, so the hash is cached; the cache is keyed by a cheap
*fingerprint*: each tensor's name, shape, dtype, device, storage address (``data_ptr``) and autograd
version counter (``_version``, bumped by every in-place op, ``copy_`` and ``load_state_dict``
included). An edit in place or a swapped tensor changes the fingerprint, so the next call rehashes.
One blind spot, inherent to PyTorch: in-place edits through ``param.data`` bypass the version
counter; edit under ``torch.no_grad()`` (or use :func:`override`) instead.

:func:`override` is the primitive the weight-patch and LoRA features build on: it checks every
requested name, shape and dtype *before* touching anything, then swaps the new values in (each
parameter's storage is replaced, not written into) and swaps the originals back on exit, also on an
exception. Restoring a storage rather than copying values back makes the restore exact bit for bit,
and the fingerprint, hence the hash, returns to the original too.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceError


class WeightOverrideError(PatchtraceError, ValueError):
    """A weight override that does not fit the model (names the parameter and what is wrong)."""


Fingerprint = tuple[tuple[str, tuple[int, ...], str, str, int, int], ...]


def fingerprint(module: Any) -> Fingerprint:
    """Cheap identity of the current weights: per state-dict tensor, its name, shape, dtype,
    device, storage address and version counter (changes on any in-place edit or swap)."""
    return tuple(
        (name, tuple(t.shape), str(t.dtype), str(t.device), t.data_ptr(), t._version)
        for name, t in module.state_dict(keep_vars=True).items()
    )


def sha256(module: Any) -> str:
    """SHA-256 over all state-dict tensors (sorted names, shapes and bytes), first 16 hex digits."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        t = p.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy; reshape: 0-dim buffers
    return h.hexdigest()[:16]


def _validated(module: Any, values: Mapping[str, Tensor]) -> list[tuple[torch.nn.Parameter, Tensor]]:
    """Each requested parameter with a private copy of its new value, or an error naming the first
    bad item. Nothing is modified here."""
    params = dict(module.named_parameters(remove_duplicate=False))
    seen: dict[int, str] = {}
    out = []
    for name, value in values.items():
        if name not in params:
            near = [n for n in params if n.endswith(name.split(".")[-1])][:3]
            hint = f"; parameters ending alike: {', '.join(near)}" if near else ""
            raise WeightOverrideError(f"override_weights: the model has no parameter {name!r}{hint}")
        p = params[name]
        if not isinstance(value, Tensor):
            raise WeightOverrideError(f"override_weights: the value for {name!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(p.shape):
            raise WeightOverrideError(
                f"override_weights: {name!r} has shape {tuple(p.shape)}, the override {tuple(value.shape)}"
            )
        if value.dtype != p.dtype:
            raise WeightOverrideError(f"override_weights: {name!r} has dtype {p.dtype}, the override {value.dtype}")
        if id(p) in seen:  # tied weights: two names, one tensor
            raise WeightOverrideError(
                f"override_weights: {name!r} and {seen[id(p)]!r} are the same (tied) parameter; give it once"
            )
        seen[id(p)] = name
        out.append((p, value.detach().to(device=p.device, copy=True)))
    return out


@contextlib.contextmanager
def override(module: Any, values: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, the named parameters of ``module`` hold ``values``; the originals return
    bit for bit on exit (also on an exception).

    All-or-nothing: every name, shape and dtype is checked first; one bad item raises
    :class:`WeightOverrideError` and leaves the module untouched. Values are copied (the caller's
    tensors are never aliased) and moved to each parameter's device. A tied parameter (e.g. an
    unembedding sharing the embedding's tensor) changes under both names; give it once.
    """
    swaps = _validated(module, values)
    originals: list[tuple[torch.nn.Parameter, Tensor]] = []
    try:
        for p, new in swaps:
            originals.append((p, p.data))
            p.data = new
        yield
    finally:
        for p, old in reversed(originals):
            p.data = old
