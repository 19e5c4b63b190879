"""Weight patches: ship, apply and remove the part of a fine-tune that localization points to.

* :class:`WeightPatch` (:mod:`.patch`): named float32 deltas for chosen tensors of any
  ``torch.nn.Module``, with the base's architecture and hash; extract, select, project out (RWS),
  quantize, scale, compose; apply in place (with a :class:`Receipt` for a bit-exact remove) or for a
  block; save/load as safetensors + JSON with checksums.
* :mod:`.finetune`: train only a chosen set of tensors/layers and export exactly those as a patch.
* :mod:`.lora`: peft LoRA on the localized layers only; merged into a patch.
* :mod:`.rws`, :mod:`.digits`: the Robust Weight Signatures pipeline on scikit-learn's digits.

See ``docs/weights.md``.
"""

from __future__ import annotations

from patchtrace.weights.apply import Receipt, apply_state, remove_state
from patchtrace.weights.errors import WeightPatchError
from patchtrace.weights.patch import WeightPatch
from patchtrace.weights.select import layer_of, select_names
from patchtrace.weights.state import architecture, base_hash, tensors_of

__all__ = [
    "Receipt",
    "WeightPatch",
    "WeightPatchError",
    "apply_state",
    "architecture",
    "base_hash",
    "layer_of",
    "remove_state",
    "select_names",
    "tensors_of",
]
