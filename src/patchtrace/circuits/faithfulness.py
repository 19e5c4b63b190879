"""Faithfulness: how much of the behaviour a circuit carries, under both patching conventions.

For a circuit ``C`` (a set of edges):

* **outside** ("patch everything outside the circuit", EAP-IG's ``evaluate_graph``): run the clean
  prompt; every edge not in ``C`` delivers its sender's corrupt-run value to its receiver; edges in
  ``C`` carry whatever their sender computes in this run.
* **restore** ("restore the circuit"): run the corrupt prompt; every edge in ``C`` delivers its
  sender's clean-run value; all other edges carry this run's values.

Both are normalised the same way:

    F(C) = (M(C) − M_corrupt) / (M_clean − M_corrupt)

so ``F = 1`` is the clean model's behaviour and ``F = 0`` the corrupt one's. Both conventions give
``F = 1`` for the whole graph (every receiver sees the clean values of all its senders, i.e. its clean
input) and ``F = 0`` for the empty circuit. They differ in between: "outside"
lets the circuit compute from its own (partly corrupted) inputs, "restore" hands each circuit edge
the clean value whatever happens upstream. Both are exact patched runs on the engine
(:func:`patchtrace.circuits.exact.evaluate_sets`), several circuits per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchtrace.circuits.exact import Prepared, evaluate_sets
from patchtrace.circuits.graph import CircuitError
from patchtrace.report.figure import save_figure

CONVENTIONS = ("outside", "restore")


def normalise(m: Tensor | float, clean: float, corrupt: float) -> Tensor | float:
    """``(m − corrupt) / (clean − corrupt)``.

    Raises:
        CircuitError: equal baselines (no behaviour to recover).
    """
    gap = clean - corrupt
    if abs(gap) < 1e-12:
        raise CircuitError(f"clean and corrupt baselines are equal ({clean:.4g}): faithfulness is undefined")
    return (m - corrupt) / gap


def faithfulness(circuits: Tensor, *, outside: Prepared | None = None, restore: Prepared | None = None) -> dict[str, list[float]]:
    """Normalised faithfulness of each circuit ``[K, S, R]`` under the conventions given.

    Args:
        circuits: circuit edge masks.
        outside: a ``direction="noise"`` preparation (clean base) for the "outside" convention.
        restore: a ``direction="denoise"`` preparation (corrupt base) for the "restore" convention.

    Raises:
        CircuitError: a preparation of the wrong direction, or none given.
    """
    if outside is None and restore is None:
        raise CircuitError("faithfulness needs a noise preparation (outside) or a denoise one (restore)")
    out: dict[str, list[float]] = {}
    if circuits.dim() == 2:
        circuits = circuits[None]
    if outside is not None:
        if outside.direction != "noise":
            raise CircuitError("the 'outside' convention runs the clean prompt: prepare with direction='noise'")
        G = outside.graph
        m = evaluate_sets(outside, G.mask & ~circuits)
        b = outside.baselines
        out["outside"] = [float(x) for x in normalise(m, b["clean"], b["corrupt"])]  # type: ignore[union-attr]
    if restore is not None:
        if restore.direction != "denoise":
            raise CircuitError("the 'restore' convention runs the corrupt prompt: prepare with direction='denoise'")
        m = evaluate_sets(restore, circuits & restore.graph.mask)
        b = restore.baselines
        out["restore"] = [float(x) for x in normalise(m, b["clean"], b["corrupt"])]  # type: ignore[union-attr]
    return out


@dataclass
class Curve:
    """Faithfulness against circuit size for one way of choosing circuits."""

    label: str
    budgets: list[int]
    n_edges: list[int]
    values: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "budgets": self.budgets, "n_edges": self.n_edges, "values": self.values}


def curve(
    label: str, choose: Callable[[int], Tensor], budgets: Sequence[int], *,
    outside: Prepared | None = None, restore: Prepared | None = None,
) -> Curve:
    """Faithfulness of ``choose(n)`` for each budget ``n`` (circuits evaluated in one batch per convention)."""
    circuits = torch.stack([choose(int(n)) for n in budgets])
    vals = faithfulness(circuits, outside=outside, restore=restore)
    return Curve(label, [int(n) for n in budgets], [int(c.sum()) for c in circuits], vals)


def plot_curves(curves: Sequence[Curve], path: str | Path, title: str = "faithfulness") -> Path:
    """One panel per convention, one line per curve, against the number of edges kept (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    convs = [c for c in CONVENTIONS if any(c in cu.values for cu in curves)]
    fig, axes = plt.subplots(1, len(convs), figsize=(5.2 * len(convs), 3.8), squeeze=False)
    for ax, conv in zip(axes[0], convs, strict=True):
        for cu in curves:
            if conv in cu.values:
                ax.plot(cu.n_edges, cu.values[conv], marker="o", ms=3, label=cu.label)
        ax.axhline(1.0, color="grey", lw=0.6, ls="--")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("edges in circuit (after pruning)")
        ax.set_ylabel("faithfulness (0 = corrupt, 1 = clean)")
        ax.set_title({"outside": "patch everything outside the circuit", "restore": "restore the circuit"}[conv], fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


__all__ = ["CONVENTIONS", "Curve", "curve", "faithfulness", "normalise", "plot_curves"]
