"""Applying and removing a :class:`~patchtrace.weights.WeightPatch`: checked first, all-or-nothing,
and exactly reversible.

Why a receipt: floating-point addition loses bits (``fl(θ + Δ) − Δ`` is not always ``θ``, e.g.
when ``|Δ| ≫ |θ|``), so no patch alone can undo itself bit for bit. :func:`apply` therefore checks,
for every element, whether subtracting the delta again gives back the original bits, and keeps the
original value of each element where it does not (usually a few percent, indices + values). That is
the :class:`Receipt`; :func:`remove` with it restores the weights bit for bit and verifies so by hash.
The scoped form (:func:`scoped`) needs no receipt: it swaps storages and swaps them back.

Order of the checks (the first failure is reported, nothing is modified): every patch tensor exists
in the model with the same shape and a floating dtype; the model's architecture equals the patch's
base architecture; the model's weights hash equals the patch's base hash (skipped with
``allow_other_base=True``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from patchtrace.models.weights import override, sha256
from patchtrace.weights.errors import WeightPatchError
from patchtrace.weights.state import _View, architecture, base_hash, first_arch_mismatch, module_of, tensors_of

if TYPE_CHECKING:
    from patchtrace.weights.patch import WeightPatch

_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class Receipt:
    """What :func:`remove` needs to undo one :func:`apply` bit for bit.

    Attributes:
        scale: the scale the patch was applied with.
        before, after: hashes of the patched tensors before and after the apply.
        fixups: ``{name: (flat indices, original values)}`` where ``fl(new − scale·Δ)`` misses the original.
    """

    scale: float
    before: str
    after: str
    fixups: Mapping[str, tuple[Tensor, Tensor]]

    @property
    def n_fixups(self) -> int:
        return sum(int(i.numel()) for i, _ in self.fixups.values())

    def save(self, path: str | Path) -> Path:
        """One safetensors file (hashes and scale in its metadata)."""
        from safetensors.torch import save_file

        t: dict[str, Tensor] = {}
        for n, (i, v) in self.fixups.items():
            t[f"idx/{n}"], t[f"val/{n}"] = i.contiguous(), v.contiguous()
        meta = {"scale": repr(float(self.scale)), "before": self.before, "after": self.after, "names": "\n".join(self.fixups)}
        save_file(t, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Receipt:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = [n for n in meta.get("names", "").split("\n") if n]
                fix = {n: (f.get_tensor(f"idx/{n}"), f.get_tensor(f"val/{n}")) for n in names}
            return cls(float(meta["scale"]), meta["before"], meta["after"], fix)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise WeightPatchError(f"undo file {path}: unreadable ({type(e).__name__}: {e})") from None


def check(patch: WeightPatch, model: Any, allow_other_base: bool = False) -> dict[str, Tensor]:
    """The model's tensors if ``patch`` fits ``model``; else :class:`WeightPatchError` naming the first mismatch."""
    t = tensors_of(model)
    for n, d in patch.deltas.items():
        if n not in t:
            near = [m for m in t if m.endswith(n.split(".")[-1])][:3]
            hint = f" (names ending alike: {', '.join(near)})" if near else ""
            raise WeightPatchError(f"the model has no tensor {n!r}{hint}")
        if tuple(t[n].shape) != tuple(d.shape):
            raise WeightPatchError(f"tensor {n!r}: the model's shape is {tuple(t[n].shape)}, the patch's {tuple(d.shape)}")
        if not t[n].is_floating_point():
            raise WeightPatchError(f"tensor {n!r} is {t[n].dtype} in the model; only floating-point tensors take a delta")
    t = _without_tied_copies(t, patch)
    bad = first_arch_mismatch(patch.arch, architecture(t))
    if bad:
        raise WeightPatchError(f"another architecture: {bad}")
    if not allow_other_base and patch.base_hash is not None:
        h = base_hash(t)
        if h != patch.base_hash:
            raise WeightPatchError(
                f"the model's weights hash is {h}, the patch was made for base {patch.base_hash}; "
                "to patch another model of the same architecture pass allow_other_base=True (CLI: --allow-other-base)"
            )
    return t


def _without_tied_copies(t: dict[str, Tensor], patch: WeightPatch) -> dict[str, Tensor]:
    """Drop tensors the base architecture lacks that are value-for-value copies of one it has (a tied
    unembedding in a plain ``state_dict()``, which lists it twice), so they neither fail the
    architecture check nor change the hash."""
    names = {n for n, _, _ in patch.arch}
    extra = [n for n in t if n not in names]
    if not extra:
        return t
    drop = {n for n in extra if any(m in t and t[m].shape == t[n].shape and torch.equal(t[m], t[n]) for m in names)}
    return {n: v for n, v in t.items() if n not in drop}


def _touched_hash(tensors: Mapping[str, Tensor]) -> str:
    return sha256(_View(tensors))


def _check_scale(scale: float) -> float:
    s = float(scale)
    if s != s or s in (float("inf"), float("-inf")):
        raise WeightPatchError(f"scale {scale!r}: need a finite number")
    return s


def _plus(cur: Tensor, d: Tensor, scale: float, sign: float) -> Tensor:
    delta = d.to(cur.device) if scale == 1.0 else (d.to(cur.device) * scale)
    return (cur.float() + delta if sign > 0 else cur.float() - delta).to(cur.dtype)


def _compute(patch: WeightPatch, cur: Mapping[str, Tensor], scale: float) -> tuple[dict[str, Tensor], Receipt]:
    news: dict[str, Tensor] = {}
    fix: dict[str, tuple[Tensor, Tensor]] = {}
    for n, d in patch.deltas.items():
        old = cur[n].detach()
        new = _plus(old, d, scale, +1)
        if not bool(torch.isfinite(new).all()):
            raise WeightPatchError(f"tensor {n!r}: applying the patch (scale {scale}) gives NaN/Inf")
        back = _plus(new, d, scale, -1)
        it = _INT.get(old.dtype)
        miss = (back.view(it) != old.view(it)) if it is not None else (back != old)
        idx = miss.reshape(-1).nonzero().reshape(-1)
        if idx.numel():
            fix[n] = (idx.cpu(), old.reshape(-1)[idx].cpu().clone())
        news[n] = new
    before = _touched_hash({n: cur[n].detach() for n in patch.deltas})
    return news, Receipt(scale, before, _touched_hash(news), fix)


def _write(live: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    done: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for n, v in values.items():
                done.append((live[n], live[n].detach().clone()))
                live[n].copy_(v)
    except BaseException:
        with torch.no_grad():
            for t, old in reversed(done):
                t.copy_(old)
        raise


def apply(patch: WeightPatch, model: Any, scale: float = 1.0, allow_other_base: bool = False) -> Receipt:
    """In place on a module (all-or-nothing); see :meth:`WeightPatch.apply`."""
    scale = _check_scale(scale)
    mod = module_of(model)
    if isinstance(mod, Mapping):
        raise WeightPatchError("apply: a state dict is not modified in place; use apply_state(patch, tensors)")
    cur = check(patch, mod, allow_other_base)
    news, receipt = _compute(patch, cur, scale)
    _write(tensors_of(mod, keep_vars=True), news)
    return receipt


def apply_state(patch: WeightPatch, tensors: Mapping[str, Tensor], scale: float = 1.0,
                allow_other_base: bool = False) -> tuple[dict[str, Tensor], Receipt]:
    """A new ``{name: tensor}`` with the patch added (the input is not modified), and its receipt."""
    scale = _check_scale(scale)
    cur = check(patch, tensors, allow_other_base)
    news, receipt = _compute(patch, cur, scale)
    return {**tensors, **news}, receipt


def _undo(patch: WeightPatch, cur: Mapping[str, Tensor], receipt: Receipt | None, scale: float) -> dict[str, Tensor]:
    for n, d in patch.deltas.items():
        if n not in cur or tuple(cur[n].shape) != tuple(d.shape):
            raise WeightPatchError(f"remove: the model has no tensor {n!r} of shape {tuple(d.shape)}")
    if receipt is not None:
        scale = receipt.scale
        if _touched_hash({n: cur[n].detach() for n in patch.deltas}) != receipt.after:
            raise WeightPatchError("remove: the patched tensors changed since the apply this receipt is for "
                                   "(or the receipt belongs to another patch); cannot restore bit for bit")
    out = {}
    for n, d in patch.deltas.items():
        back = _plus(cur[n].detach(), d, scale, -1)
        if receipt is not None and n in receipt.fixups:
            idx, vals = receipt.fixups[n]
            back = back.reshape(-1).clone()
            back[idx.to(back.device)] = vals.to(back.device, back.dtype)
            back = back.reshape(d.shape)
        out[n] = back
    if receipt is not None and _touched_hash(out) != receipt.before:
        raise WeightPatchError("remove: the restored tensors do not hash to the originals (receipt of another apply?)")
    return out


def remove(patch: WeightPatch, model: Any, receipt: Receipt | None = None, scale: float = 1.0) -> None:
    """In place: bit-exact with the receipt of the apply; without it, ``θ − scale·Δ`` (float rounding)."""
    mod = module_of(model)
    if isinstance(mod, Mapping):
        raise WeightPatchError("remove: a state dict is not modified in place; use remove_state(patch, tensors)")
    _write(tensors_of(mod, keep_vars=True), _undo(patch, tensors_of(mod), receipt, _check_scale(scale)))


def remove_state(patch: WeightPatch, tensors: Mapping[str, Tensor], receipt: Receipt | None = None,
                 scale: float = 1.0) -> dict[str, Tensor]:
    """A new ``{name: tensor}`` with the patch removed (see :func:`remove`)."""
    cur = tensors_of(tensors)
    return {**cur, **_undo(patch, cur, receipt, _check_scale(scale))}


@contextlib.contextmanager
def scoped(patch: WeightPatch, model: Any, scale: float = 1.0, allow_other_base: bool = False) -> Iterator[None]:
    """The patched weights for the block only (parameters; buffers need :func:`apply`)."""
    scale = _check_scale(scale)
    mod = module_of(model)
    cur = check(patch, mod, allow_other_base)
    news, _ = _compute(patch, cur, scale)
    params = dict(mod.named_parameters(remove_duplicate=False))
    for n in news:
        if n not in params:
            raise WeightPatchError(f"applied(): {n!r} is a buffer, not a parameter; use apply()/remove() for buffers")
    with override(mod, news):
        yield


__all__ = ["Receipt", "apply", "apply_state", "check", "remove", "remove_state", "scoped"]
