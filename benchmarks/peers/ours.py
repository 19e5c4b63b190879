"""patchtrace through its public API: ``activation_patching.run`` with ``PatchingConfig(fast=...)``.

``fast=True`` is the engine's exact fast path (resume at the patched layer, suffix positions only,
many patches per batch, answer columns only). ``fast=False`` is patchtrace's own plain path: one
full forward per patch (batched), the in-library cross-check. The timed call is the whole public
``run`` (tokenization, clean and corrupt caches, sanity check, sweep), after one small warm-up call.
"""

from __future__ import annotations

from typing import Any

from .common import SUBSETS, Bench, Cell, scatter, timed

KIND = {"heads_last": "head", "heads_all": "head", "resid_all": "resid_pre", "neurons_last": "neuron"}


def spec_for(config: str, layers: Any, units: Any, positions: Any) -> Any:
    from patchtrace import SiteSpec

    per_unit = config != "resid_all"
    pos: Any = "last" if config.endswith("_last") else ("all" if positions is None else list(positions))
    return SiteSpec(
        KIND[config],
        per_unit=per_unit,
        positions=pos,
        layers=None if layers is None else tuple(layers),
        units=None if units is None or not per_unit else tuple(units),
    )


def run(b: Bench, config: str, cs: list[Cell], *, fast: bool = True, subset: str = "full") -> dict[str, Any]:
    from patchtrace import PatchingConfig
    from patchtrace.methods.activation_patching import run as ap_run

    cfg = PatchingConfig(fast=fast)
    layers, units, positions = SUBSETS[subset][config]
    spec = spec_for(config, layers, units, positions)
    warm = spec_for(config, (cs[0].layer,), (cs[0].unit,) if cs[0].unit >= 0 else None, positions)
    ap_run(b.model, b.task, warm, cfg)  # warm-up
    scores, sweep_s = timed(lambda: ap_run(b.model, b.task, spec, cfg))
    patched = scores.extras["patched"].float()
    # the grid's cells are layer-major in the same order as `cells()`; flatten and scatter
    vals = patched.flatten()
    if vals.numel() != len(cs):
        raise RuntimeError(f"patchtrace returned {vals.numel()} cells, expected {len(cs)}")
    return {
        "matrix": scatter(config, b, cs, vals),
        "sweep_s": sweep_s,
        "setup_s": 0.0,
        "plan": str(scores.provenance.get("plan", "")),
        "sanity_max_abs": float(scores.provenance.get("sanity_max_abs", 0.0)),
    }
