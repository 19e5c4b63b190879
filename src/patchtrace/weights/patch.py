"""``WeightPatch``: named weight deltas with the base they belong to, as a value you can ship.

A fine-tune changes a model's weights by ``Δ = θ_tuned − θ_base``. Localization says *where* that
change matters; a :class:`WeightPatch` keeps ``Δ`` only there (a selector over tensor names) and
makes it a first-class, immutable value:

* **made** by :meth:`WeightPatch.extract` from two checkpoints (modules or state dicts) of any
  ``torch.nn.Module``: a CNN, an HF causal LM, a diffusers UNet, a peft-merged model;
* **transformed** without touching any model: :meth:`select`, :meth:`project_out` (Robust Weight
  Signatures: remove the component along a reference delta, per tensor), :meth:`quantize`
  (linear/log/tanh, ``n`` levels), :meth:`scaled`, :meth:`compose` (weighted sums);
* **applied** in place (:meth:`apply`, returning a :class:`~patchtrace.weights.apply.Receipt` with
  which :meth:`remove` restores the weights bit for bit) or for a block only (:meth:`applied`);
* **saved** as safetensors + JSON with checksums (:meth:`save`, :meth:`load`; never pickle).

Each patch records its base's :func:`~patchtrace.weights.state.architecture` and
:func:`~patchtrace.weights.state.base_hash`. Applying checks the architecture (always) and the hash
(unless ``allow_other_base=True``: the same architecture with other weights, which is how a signature
is transferred to another fine-tune). :meth:`for_base` re-targets a patch on purpose, e.g. an RWS
extracted against the pretrained init ``θ0`` and meant for the clean fine-tune.

Arithmetic: deltas are float32 (computed in float64 from the two checkpoints and rounded once);
applying computes ``(θ.float() + scale·Δ).to(θ.dtype)``, so bf16/fp16 models are patched in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchtrace.weights.errors import WeightPatchError
from patchtrace.weights.quantize import QTensor, check_levels, quantize
from patchtrace.weights.select import Selector, select_names
from patchtrace.weights.state import Arch, architecture, base_hash, first_arch_mismatch, tensors_of

_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}


@dataclass(frozen=True)
class WeightPatch:
    """Float32 deltas for some tensors of a model, with its base's architecture and hash.

    Attributes:
        deltas: ``{tensor name: Δ}`` (CPU float32, never aliased with a model's tensors).
        arch: ``(name, shape, dtype)`` of every tensor of the base model.
        base_hash: :func:`~patchtrace.weights.state.base_hash` of the base (None: any base of ``arch``).
        quant: the tensors held quantized (their ``deltas`` entry is the dequantized value).
        meta: free JSON-able provenance (how it was made: selector, projection, scale, sources).

    Example:
        >>> base = {"w": torch.zeros(4), "b": torch.ones(2)}
        >>> tuned = {"w": torch.tensor([0.5, -0.25, 0.0, 1.0]), "b": torch.ones(2)}
        >>> p = WeightPatch.extract(base, tuned, select="w")   # only "w"
        >>> p.names, p.nbytes
        (['w'], 16)
        >>> q = p.quantize(3, "linear")                         # grid -0.25, 0.375, 1.0
        >>> q.deltas["w"]
        tensor([ 0.3750, -0.2500, -0.2500,  1.0000])
        >>> from patchtrace.weights import apply_state, remove_state
        >>> new, receipt = apply_state(p.scaled(2.0), base)
        >>> new["w"]
        tensor([ 1.0000, -0.5000,  0.0000,  2.0000])
        >>> torch.equal(remove_state(p.scaled(2.0), new, receipt)["w"], base["w"])
        True
    """

    deltas: Mapping[str, Tensor]
    arch: Arch
    base_hash: str | None = None
    quant: Mapping[str, QTensor] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {n: s for n, s, _ in self.arch}
        clean: dict[str, Tensor] = {}
        for name, d in self.deltas.items():
            if name not in shapes:
                raise WeightPatchError(f"patch tensor {name!r} is not a tensor of its base architecture")
            if not isinstance(d, Tensor) or not d.is_floating_point():
                raise WeightPatchError(f"patch tensor {name!r}: the delta must be a floating-point tensor")
            if tuple(d.shape) != shapes[name]:
                raise WeightPatchError(f"patch tensor {name!r}: delta shape {tuple(d.shape)}, base shape {shapes[name]}")
            if not bool(torch.isfinite(d).all()):
                bad = int((~torch.isfinite(d)).sum())
                raise WeightPatchError(f"patch tensor {name!r}: {bad} NaN/Inf value(s) in the delta")
            clean[name] = d.detach().to("cpu", torch.float32)
        if not clean:
            raise WeightPatchError("a weight patch needs at least one tensor")
        for name in self.quant:
            if name not in clean:
                raise WeightPatchError(f"quantized tensor {name!r} has no delta")
        object.__setattr__(self, "deltas", clean)
        object.__setattr__(self, "quant", dict(self.quant))
        object.__setattr__(self, "meta", dict(self.meta))
        object.__setattr__(self, "arch", tuple((n, tuple(s), d) for n, s, d in self.arch))

    # -- making ---------------------------------------------------------------------------------

    @classmethod
    def extract(cls, base: Any, tuned: Any, select: Selector = None, meta: Mapping[str, Any] | None = None) -> WeightPatch:
        """``tuned − base`` for the tensors ``select`` picks (default: every floating-point tensor).

        Args:
            base, tuned: two checkpoints of one architecture: modules or ``{name: tensor}`` dicts.
            select: see :mod:`patchtrace.weights.select` (globs, ``re:``, layer ints, callable).

        Raises:
            WeightPatchError: other architectures (naming the first difference), or a selector
                matching nothing.
        """
        a, b = tensors_of(base), tensors_of(tuned)
        arch = architecture(a)
        bad = first_arch_mismatch(arch, architecture(b))
        if bad:
            raise WeightPatchError(f"extract: the two checkpoints differ: {bad}")
        names = select_names(a, select, floating=lambda n: a[n].is_floating_point())
        deltas = {n: (b[n].detach().to("cpu", torch.float64) - a[n].detach().to("cpu", torch.float64)).float() for n in names}
        info = {"op": "extract", "select": select if isinstance(select, (str, type(None))) else repr(select)}
        return cls(deltas, arch, base_hash(a), meta={**info, **(meta or {})})

    # -- facts ----------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.deltas)

    @property
    def numel(self) -> int:
        return sum(d.numel() for d in self.deltas.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the deltas as stored: packed codes for quantized tensors, float32 otherwise."""
        return sum(self.quant[n].nbytes if n in self.quant else d.numel() * 4 for n, d in self.deltas.items())

    @property
    def model_bytes(self) -> int:
        """Bytes of a full copy of the base model's weights (every tensor at its dtype)."""
        return sum(_numel(s) * _BYTES.get(d, 4) for _, s, d in self.arch)

    @property
    def selected_bytes(self) -> int:
        """Bytes of the patched tensors of the base at their dtype (a copy of just those weights)."""
        dt = {n: d for n, _, d in self.arch}
        return sum(t.numel() * _BYTES.get(dt[n], 4) for n, t in self.deltas.items())

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each delta."""
        return {n: float(d.double().norm()) for n, d in self.deltas.items()}

    def __repr__(self) -> str:
        q = f", {len(self.quant)} quantized" if self.quant else ""
        return f"WeightPatch({len(self.deltas)} tensors, {self.numel} values, {self.nbytes} bytes{q}, base {self.base_hash})"

    # -- algebra (new patches; no model is touched) ---------------------------------------------

    def _derive(self, deltas: Mapping[str, Tensor], op: dict[str, Any], quant: Mapping[str, QTensor] | None = None) -> WeightPatch:
        history = [*self.meta.get("history", []), op]
        return WeightPatch(deltas, self.arch, self.base_hash, quant or {}, {**self.meta, "history": history})

    def select(self, select: Selector) -> WeightPatch:
        """The sub-patch of the tensors ``select`` picks (an error if none)."""
        names = select_names(self.deltas, select)
        return self._derive({n: self.deltas[n] for n in names}, {"op": "select", "select": str(select)},
                            {n: q for n, q in self.quant.items() if n in names})

    def scaled(self, alpha: float) -> WeightPatch:
        """``alpha · Δ`` (float32; a quantized patch becomes plain)."""
        if not isinstance(alpha, (int, float)) or alpha != alpha or alpha in (float("inf"), float("-inf")):
            raise WeightPatchError(f"scale {alpha!r}: need a finite number")
        return self._derive({n: (d.double() * alpha).float() for n, d in self.deltas.items()}, {"op": "scale", "alpha": alpha})

    def project_out(self, reference: WeightPatch) -> WeightPatch:
        """Per tensor, remove the component along ``reference``'s delta: ``Δ − (⟨Δ,δ⟩/⟨δ,δ⟩)·δ``.

        This is the RWS step: with ``reference`` the clean fine-tune's delta, what remains of a robust
        fine-tune's delta is what the clean fine-tune did *not* do. A zero reference tensor leaves
        the delta as it is. Computed in float64.

        Raises:
            WeightPatchError: ``reference`` lacks one of this patch's tensors (named).
        """
        out = {}
        for n, d in self.deltas.items():
            if n not in reference.deltas:
                raise WeightPatchError(f"project_out: the reference patch has no tensor {n!r}")
            r = reference.deltas[n].double().reshape(-1)
            v = d.double().reshape(-1)
            rr = float(r @ r)
            out[n] = (v - (float(v @ r) / rr) * r if rr > 0 else v).reshape(d.shape).float()
        return self._derive(out, {"op": "project_out", "reference": reference.meta.get("name", reference.base_hash)})

    def quantize(self, levels: int, scheme: str = "linear") -> WeightPatch:
        """Each delta on an ``levels``-value grid (see :mod:`patchtrace.weights.quantize`)."""
        check_levels(scheme, levels)
        q = {n: quantize(d, scheme, levels) for n, d in self.deltas.items()}
        return self._derive({n: qt.dequantize() for n, qt in q.items()}, {"op": "quantize", "scheme": scheme, "levels": levels}, q)

    @staticmethod
    def compose(patches: Sequence[WeightPatch], weights: Sequence[float] | None = None, allow_other_base: bool = False) -> WeightPatch:
        """``Σ w_i · Δ_i`` over the union of tensors (default weights 1). Linear in ``w`` (the
        reference RWS code squares the weights by accident; we do not).

        Raises:
            WeightPatchError: no patches, a weight count that differs, another architecture, or another
                base hash without ``allow_other_base`` (each naming the patch).
        """
        if not patches:
            raise WeightPatchError("compose: give at least one patch")
        w = [1.0] * len(patches) if weights is None else [float(x) for x in weights]
        if len(w) != len(patches):
            raise WeightPatchError(f"compose: {len(patches)} patches but {len(w)} weights")
        first = patches[0]
        acc: dict[str, Tensor] = {}
        for i, (p, wi) in enumerate(zip(patches, w)):
            bad = first_arch_mismatch(first.arch, p.arch)
            if bad:
                raise WeightPatchError(f"compose: patch {i} is for another architecture: {bad}")
            if not allow_other_base and p.base_hash != first.base_hash:
                raise WeightPatchError(f"compose: patch {i} has base {p.base_hash}, patch 0 has {first.base_hash} "
                                       "(allow_other_base=True to compose anyway)")
            for n, d in p.deltas.items():
                acc[n] = acc.get(n, torch.zeros(d.shape, dtype=torch.float64)) + wi * d.double()
        meta = {"op": "compose", "weights": w, "parts": [p.meta.get("name") for p in patches]}
        return WeightPatch({n: v.float() for n, v in acc.items()}, first.arch, first.base_hash, meta=meta)

    def for_base(self, model: Any) -> WeightPatch:
        """The same deltas, meant for ``model`` (a module, state dict, or a hash string): checks the
        architecture and records its hash, so later applies to it need no override."""
        if isinstance(model, str):
            return WeightPatch(self.deltas, self.arch, model, self.quant, self.meta)
        bad = first_arch_mismatch(self.arch, architecture(model))
        if bad:
            raise WeightPatchError(f"for_base: {bad}")
        return WeightPatch(self.deltas, self.arch, base_hash(model), self.quant, self.meta)

    # -- applying (see patchtrace.weights.apply) -------------------------------------------------

    def check(self, model: Any, allow_other_base: bool = False) -> None:
        """Raise :class:`WeightPatchError` naming the first reason this patch does not fit ``model``."""
        from patchtrace.weights.apply import check

        check(self, model, allow_other_base)

    def apply(self, model: Any, scale: float = 1.0, allow_other_base: bool = False) -> Any:
        """Add ``scale·Δ`` to ``model``'s tensors in place, all-or-nothing; returns the
        :class:`~patchtrace.weights.apply.Receipt` that :meth:`remove` needs to restore bit for bit."""
        from patchtrace.weights.apply import apply

        return apply(self, model, scale, allow_other_base)

    def remove(self, model: Any, receipt: Any = None, scale: float = 1.0) -> None:
        """Undo :meth:`apply` in place: bit-exact with its receipt; without, subtract ``scale·Δ``."""
        from patchtrace.weights.apply import remove

        remove(self, model, receipt, scale)

    @contextlib.contextmanager
    def applied(self, model: Any, scale: float = 1.0, allow_other_base: bool = False) -> Iterator[Any]:
        """Within the block ``model`` holds the patched weights; the originals return bit for bit on
        exit (storage swap via :func:`patchtrace.models.weights.override`, also on an exception)."""
        from patchtrace.weights.apply import scoped

        with scoped(self, model, scale, allow_other_base):
            yield model

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``patch.safetensors`` + ``patch.json`` (with checksums) into folder ``path``."""
        from patchtrace.weights.io import save

        return save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> WeightPatch:
        """Read a folder written by :meth:`save`, refusing a truncated or tampered one."""
        from patchtrace.weights.io import load

        return load(path)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


__all__ = ["WeightPatch"]
