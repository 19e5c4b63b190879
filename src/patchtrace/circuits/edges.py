"""Edge grids as :class:`~patchtrace.results.Scores`, and edge-by-edge agreement between methods.

An edge grid is a ``Scores`` over the axis pair ``(sender, receiver)`` (both declared in
:data:`patchtrace.grid.AXES`) with ``site_kind="edge"``. Cells that are not edges (a receiver that
reads before the sender writes) hold NaN, so nothing can average them in by accident; the graph's
dimensions travel in ``provenance["graph"]`` and the node names in ``labels["sender_name"]`` /
``labels["receiver_name"]``. Exact effects have ``value_name="effect"``, EAP/EAP-IG
``"attribution"``: same direction, same sign, so :func:`agreement` correlates them edge by edge.

Example:
    >>> import torch
    >>> from patchtrace.circuits.graph import EdgeGraph
    >>> g = EdgeGraph(1, 1, 1)
    >>> v = torch.where(g.mask, torch.arange(15.).view(3, 5), torch.tensor(float("nan")))
    >>> s = as_scores(g, v, method="demo", direction="noise")
    >>> graph_of(s).n_edges, edge_values(s).tolist()
    (8, [0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 9.0, 14.0])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from patchtrace.circuits.graph import CircuitError, EdgeGraph, graph_from
from patchtrace.results import Scores


def as_scores(
    graph: EdgeGraph, values: Tensor, *, method: str, direction: str, value_name: str = "effect",
    metric: str = "logit_diff", baselines: dict[str, float] | None = None, provenance: dict[str, Any] | None = None,
) -> Scores:
    """Wrap a ``[S, R]`` edge tensor as :class:`Scores` (NaN off the graph's edges)."""
    v = values.detach().float().clone()
    v[~graph.mask] = float("nan")
    prov = dict(provenance or {})
    prov.update({"graph": graph.describe(), "direction": direction, "method": prov.get("method", method)})
    return Scores(
        v, ("sender", "receiver"), "edge", value_name, metric, dict(baselines or {}),
        {"sender_name": graph.sender_names, "receiver_name": graph.receiver_names}, provenance=prov,
    )


def is_edge_scores(s: Scores) -> bool:
    return s.axes == ("sender", "receiver") and "graph" in s.provenance


def graph_of(s: Scores) -> EdgeGraph:
    """The graph an edge grid was scored on.

    Raises:
        CircuitError: ``s`` is not an edge grid.
    """
    if not is_edge_scores(s):
        raise CircuitError(f"a result over {s.axes} is not an edge grid (axes sender × receiver, with provenance['graph'])")
    return graph_from(s.provenance["graph"])


def edge_values(s: Scores) -> Tensor:
    """The values at the real edges, sender-major (NaN where an edge was not computed)."""
    return s.values[graph_of(s).mask]


def top_edges(s: Scores, k: int = 10) -> list[tuple[str, float]]:
    """The ``k`` edges of largest magnitude, with their values."""
    g = graph_of(s)
    v = torch.nan_to_num(s.values.abs(), nan=-1.0)
    idx = torch.topk(v.flatten(), min(k, g.n_edges)).indices
    R = g.n_receivers
    return [(g.edge_name(int(i) // R, int(i) % R), float(s.values.flatten()[i])) for i in idx]


def agreement(reference: Scores, estimate: Scores, k: int = 100) -> dict[str, float]:
    """Pearson, Spearman and top-``k`` overlap (by magnitude) over the edges both computed.

    Raises:
        CircuitError: grids of different graphs, or fewer than 3 common edges.
    """
    from patchtrace.methods.compare import pearson, spearman, top_k_overlap

    ga, gb = graph_of(reference), graph_of(estimate)
    if ga.describe() != gb.describe():
        raise CircuitError(f"edge grids of different graphs: {ga.describe()} vs {gb.describe()}")
    a, b = edge_values(reference), edge_values(estimate)
    ok = torch.isfinite(a) & torch.isfinite(b)
    if int(ok.sum()) < 3:
        raise CircuitError("fewer than 3 edges scored by both results")
    a, b = a[ok].double(), b[ok].double()
    return {"n_edges": int(ok.sum()), "pearson": pearson(a, b), "spearman": spearman(a, b),
            "top_k": min(k, int(ok.sum())), "top_k_overlap": top_k_overlap(a, b, min(k, int(ok.sum())))}


__all__ = ["agreement", "as_scores", "edge_values", "graph_of", "is_edge_scores", "top_edges"]
