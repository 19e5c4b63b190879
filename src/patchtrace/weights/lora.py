"""LoRA on the localized layers only (peft), merged into a :class:`~patchtrace.weights.WeightPatch`.

Precise Parameter Localization (Staniszewski et al., ICLR 2025) fine-tunes a text-to-image model with
LoRA attached only to the few layers activation patching found, and gets the quality of LoRA on every
layer at a fraction of the parameters. The same recipe for any model peft can wrap:

1. **where**: :func:`layers_from_scores` turns any localization result (a
   :class:`~patchtrace.results.Scores` with a ``layer`` axis: causal tracing, activation patching,
   AtP, ...) into the ``k`` most important layers; or give the layers yourself;
2. **attach**: :func:`attach` wraps the model with LoRA on ``targets`` (module-name suffixes such as
   ``down_proj``; :data:`TARGETS` has shorthands) of those layers only (peft's
   ``target_modules`` + ``layers_to_transform``); everything else is frozen;
3. **train**: :func:`train_lora` runs an ordinary loop over ``loss_fn(model, batch)``;
4. **ship**: :func:`merged_patch` computes each adapted weight's update ``ΔW = B·A·scaling``
   (transposed for ``fan_in_fan_out`` layers) and returns it as a patch on the *base* model's tensor
   names, with the base's architecture and hash; then :func:`detach` removes the adapters, leaving the
   model exactly as it was. The patch composes with any other patch of that base.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patchtrace.progress import Progress
from patchtrace.weights.errors import WeightPatchError
from patchtrace.weights.patch import WeightPatch
from patchtrace.weights.select import _BLOCKS, layer_of
from patchtrace.weights.state import Arch, module_of

#: Shorthands for ``targets`` (LLaMA/Qwen/Mistral names, GPT-2 names, diffusers attention names).
TARGETS: dict[str, tuple[str, ...]] = {
    "mlp": ("gate_proj", "up_proj", "down_proj", "c_fc", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query_key_value", "to_q", "to_k", "to_v", "to_out.0"),
    "kv": ("k_proj", "v_proj", "to_k", "to_v"),
}


def layers_from_scores(scores: Any, k: int, by: str = "importance") -> list[int]:
    """The ``k`` layers with the largest score (max over every other axis), sorted.

    Args:
        scores: a :class:`~patchtrace.results.Scores` with a ``layer`` axis.
        by: ``importance`` (the method's sign: bigger is more important) or ``abs``.

    Raises:
        WeightPatchError: no ``layer`` axis, or ``k`` outside 1..n_layers.
    """
    if "layer" not in scores.axes:
        raise WeightPatchError(f"scores with axes {scores.axes} have no 'layer' axis to localize by")
    ax = scores.axes.index("layer")
    v = scores.values.detach().double()
    v = v.abs() if by == "abs" else v * scores.importance_sign()
    per_layer = v.movedim(ax, 0).reshape(v.shape[ax], -1).amax(dim=1)
    if not 1 <= k <= len(per_layer):
        raise WeightPatchError(f"k={k}: choose between 1 and the {len(per_layer)} scored layers")
    top = per_layer.topk(k).indices.tolist()
    return sorted(scores.axis_value("layer", i) for i in top)


def random_layers(n_layers: int, k: int, seed: int = 0, exclude: Sequence[int] = ()) -> list[int]:
    """``k`` random layers (seeded), avoiding ``exclude`` when there are enough others: the control arm."""
    pool = [i for i in range(n_layers) if i not in set(exclude)]
    if len(pool) < k:
        pool = list(range(n_layers))
    return sorted(random.Random(seed).sample(pool, k))


def _targets(targets: str | Sequence[str]) -> list[str]:
    names: list[str] = []
    for t in [targets] if isinstance(targets, str) else list(targets):
        for part in str(t).split(","):
            part = part.strip()
            names += list(TARGETS.get(part, (part,))) if part else []
    return names


def _pattern(mod: Any) -> str:
    for n, _ in mod.named_modules():
        parts = n.split(".")
        for a, b in itertools.pairwise(parts):
            if a in _BLOCKS and b.isdigit():
                return a
    raise WeightPatchError("attach: the model has no numbered blocks (layers.N / h.N / blocks.N) to choose from")


def _attach_modules(mod: Any, names: Sequence[str], r: int, alpha: float, dropout: float) -> Any:
    from peft import LoraConfig, get_peft_model

    mods = dict(mod.named_modules())
    for n in names:
        if n not in mods:
            raise WeightPatchError(f"attach: the model has no module {n!r}")
        if not isinstance(mods[n], (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)) and type(mods[n]).__name__ != "Conv1D":
            raise WeightPatchError(f"attach: module {n!r} is a {type(mods[n]).__name__}; LoRA needs a Linear/Conv layer")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(names),  # type: ignore[arg-type]
                     bias="none")  # (lora_alpha: int in peft's hints)
    return get_peft_model(mod, cfg)


def attach(model: Any, layers: Sequence[int] | Sequence[str], targets: str | Sequence[str] = "mlp", r: int = 8,
           alpha: float = 16.0, dropout: float = 0.0, seed: int = 0) -> Any:
    """Wrap ``model`` (in place) with LoRA on ``targets`` of ``layers`` only; returns the peft model.

    ``layers`` is either block indices (``[12, 13]``: the ``targets`` modules of those numbered blocks)
    or full module names (``["down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k", ...]``: exactly
    those modules, ``targets`` ignored), the form for models without numbered blocks (a diffusers UNet).

    Raises:
        WeightPatchError: no layers, layers out of range, an unknown module name, or no module of the
            chosen layers matches ``targets``.
    """
    from peft import LoraConfig, get_peft_model

    mod = module_of(model)
    torch.manual_seed(seed)
    if layers and all(isinstance(x, str) for x in layers):
        return _attach_modules(mod, [str(x) for x in layers], r, alpha, dropout)
    layers = sorted({int(i) for i in layers})  # type: ignore[arg-type]
    n_layers = 1 + max((x for n, _ in mod.named_modules() if (x := layer_of(n + ".")) is not None), default=-1)
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise WeightPatchError(f"attach: layers {layers} must be within 0..{n_layers - 1}")
    wanted = _targets(targets)
    present = {n.split(".")[-1] for n, _ in mod.named_modules()} | {".".join(n.split(".")[-2:]) for n, _ in mod.named_modules()}
    found = [t for t in wanted if t in present]
    if not found:
        raise WeightPatchError(f"attach: no module named like {', '.join(wanted)} in the model")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=found,  # type: ignore[arg-type]
                     layers_to_transform=layers, layers_pattern=_pattern(mod), bias="none")  # (lora_alpha: int in peft's hints)
    return get_peft_model(mod, cfg)


def _base_name(peft_name: str) -> str:
    n = peft_name
    for prefix in ("base_model.model.",):
        if n.startswith(prefix):
            n = n[len(prefix):]
    return n.replace(".base_layer.", ".")


def base_state(peft_model: Any) -> dict[str, Tensor]:
    """The wrapped model's own weights (adapters left out, names as before wrapping, tied duplicates once)."""
    from patchtrace.weights.state import tensors_of

    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    t = tensors_of(inner)
    return {_base_name("base_model.model." + n): v for n, v in t.items() if "lora_" not in n}


def merged_patch(peft_model: Any, adapter: str = "default", arch: Arch | None = None) -> WeightPatch:
    """Each adapted weight's update ``B·A·scaling`` as a patch on the base model's names.

    Raises:
        WeightPatchError: the model carries no LoRA layer for ``adapter``.
    """
    from patchtrace.weights.state import architecture, base_hash

    base = base_state(peft_model)
    deltas: dict[str, Tensor] = {}
    for name, m in peft_model.named_modules():
        if not (hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})):
            continue
        a = m.lora_A[adapter].weight.detach().double()
        b = m.lora_B[adapter].weight.detach().double()
        d = (b @ a) * float(m.scaling[adapter])
        if getattr(m, "fan_in_fan_out", False):
            d = d.T
        deltas[_base_name(name) + ".weight"] = d.float().cpu()
    if not deltas:
        raise WeightPatchError(f"merged_patch: no LoRA layer for adapter {adapter!r}")
    return WeightPatch(deltas, arch or architecture(base), base_hash(base), meta={"op": "lora_merge", "adapter": adapter})


def detach(peft_model: Any) -> Any:
    """Remove the adapters without merging: the base model, bit for bit as before :func:`attach`."""
    return peft_model.unload()


@dataclass(frozen=True)
class LoraRun:
    """A finished localized-LoRA run: the merged patch, losses, parameter counts, layers, time."""

    patch: WeightPatch
    losses: list[float]
    trainable: int
    total: int
    adapter_bytes: int
    layers: list[Any]
    targets: list[str]
    seconds: float


def train_lora(model: Any, layers: Sequence[int] | Sequence[str], batches: Iterable[Any], loss_fn: Callable[[Any, Any], Tensor],
               steps: int, lr: float = 1e-3, targets: str | Sequence[str] = "mlp", r: int = 8, alpha: float = 16.0,
               seed: int = 0, *, on_progress: Progress | None = None,
               on_loss: Callable[[int, float], None] | None = None) -> LoraRun:
    """Attach LoRA to ``layers``, train ``steps`` Adam steps on ``loss_fn(peft_model, batch)``, merge into a
    patch and detach: ``model`` ends exactly as it started; apply ``run.patch`` to get the tuned model.

    Raises:
        WeightPatchError: see :func:`attach`; ``steps < 1``; a non-finite loss.
    """
    from patchtrace.weights.finetune import train_steps

    if steps < 1:
        raise WeightPatchError(f"train_lora: steps {steps}: need ≥ 1")
    flags = {n: p.requires_grad for n, p in module_of(model).named_parameters()}
    pm = attach(model, layers, targets, r, alpha, seed=seed)
    try:
        params = [p for p in pm.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        total = sum(p.numel() for n, p in pm.named_parameters() if "lora_" not in n)
        opt = torch.optim.Adam(params, lr=lr)
        losses: list[float] = []
        t0 = time.perf_counter()
        train_steps("train_lora", pm, opt, loss_fn, batches, steps, losses, on_loss, on_progress)
        seconds = time.perf_counter() - t0
        patch = merged_patch(pm)
        found = sorted(pm.peft_config["default"].target_modules)
        chosen: list[Any] = list(layers) if any(isinstance(x, str) for x in layers) else sorted(layers)  # type: ignore[type-var]
    finally:
        inner = detach(pm)
        for n, p in inner.named_parameters():  # peft froze the base; give the caller's flags back
            p.requires_grad_(flags.get(n, p.requires_grad))
    return LoraRun(patch, losses, trainable, total, 4 * trainable, chosen, found, seconds)


__all__ = ["TARGETS", "LoraRun", "attach", "base_state", "detach", "layers_from_scores", "merged_patch",
           "random_layers", "train_lora"]
