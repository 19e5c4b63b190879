"""Independent naive references for the diffusion adapters (no patchtrace.diffusion code on the compute path).

- :func:`call_order` runs the UNet once with forward hooks on *every* module that has a ``to_k`` and
  is a cross-attention ``Attention`` and records the order in which they are called: the ground truth
  of "forward order".
- :func:`swap_encoder_states` replaces, at chosen ``attn2`` modules (by name), the whole Attention
  module's ``encoder_hidden_states`` argument in its conditional rows (a wrapper around the module's
  forward, not a hook on its projections), so the processor computes K and V from the new states.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def call_order(unet, sample, t, ehs, **kwargs) -> list[str]:
    seen: list[str] = []
    handles = []
    for name, mod in unet.named_modules():
        if type(mod).__name__ == "Attention" and name.endswith("attn2"):
            handles.append(mod.register_forward_hook(lambda m, a, o, name=name: seen.append(name)))
    try:
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=ehs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


@contextmanager
def swap_encoder_states(unet, states_by_name: dict[str, torch.Tensor]):
    """At each named attn2, conditional rows (second half of the batch) of encoder_hidden_states := states."""
    mods = dict(unet.named_modules())
    saved = {}
    for name, st in states_by_name.items():
        mod = mods[name]
        saved[name] = mod.forward
        orig = mod.forward

        def fwd(hidden_states, encoder_hidden_states=None, attention_mask=None, orig=orig, st=st, **kw):
            n = st.shape[0]
            ehs = encoder_hidden_states.clone()
            ehs[ehs.shape[0] - n :] = st
            return orig(hidden_states, encoder_hidden_states=ehs, attention_mask=attention_mask, **kw)

        mod.forward = fwd
    try:
        yield
    finally:
        for name, f in saved.items():
            mods[name].forward = f
