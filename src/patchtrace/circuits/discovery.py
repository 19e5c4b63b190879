"""Choosing a circuit: top-n, greedy growth, dead-node pruning, and ACDC with exact patching.

A circuit is a set of edges (a ``[S, R]`` bool mask). Three ways to choose one:

* :func:`top_n` — the ``n`` edges of largest ``|score|``, then :func:`prune`.
* :func:`greedy` — EAP-IG's growth from the logits: start with the logits in the circuit; repeatedly
  add the edge of largest ``|score|`` whose receiver belongs to a node already in the circuit (so
  every edge added has a path to the logits); the sender's node joins. Then :func:`prune`.
* :func:`acdc` — Conmy et al.'s pruning: visit receivers from the logits backwards; for each
  incoming edge (latest sender first) patch it and keep it only if the metric drops by at least
  ``threshold`` (a fraction of the clean − corrupt gap) relative to the current circuit. Every trial
  is an exact edge-set evaluation on the engine (:func:`patchtrace.circuits.exact.evaluate_sets`),
  and trials are batched speculatively: the next ``window`` edges are tried in one batch as if all
  earlier ones were removed, which is exactly ACDC's sequence as long as they are; at the first edge
  that is kept, the remaining rows are recomputed. The decisions are the sequential algorithm's.

**Dead-node pruning** (:func:`prune`) removes edges that cannot matter: out of a node that has no
incoming circuit edge (its inputs are all patched, so it computes its corrupt value — exactly what the
patched edges deliver), and into a node that has no outgoing circuit edge (its output reaches
nothing). Under the "patch everything outside the circuit" convention both removals leave the metric
exactly unchanged; under "restore the circuit" the pruned circuit is what is evaluated.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from patchtrace.circuits.exact import Prepared, evaluate_sets
from patchtrace.circuits.graph import CircuitError, EdgeGraph
from patchtrace.progress import Progress, counter


def check_budget(graph: EdgeGraph, n: int) -> None:
    """Raises CircuitError: an edge budget below 1 or above the graph's edge count."""
    if not 1 <= n <= graph.n_edges:
        raise CircuitError(f"edge budget {n}: the graph has {graph.n_edges} edges (choose 1..{graph.n_edges})")


def _key(graph: EdgeGraph, scores: Tensor) -> Tensor:
    if tuple(scores.shape) != (graph.n_senders, graph.n_receivers):
        raise CircuitError(f"scores of shape {tuple(scores.shape)}: expected [{graph.n_senders}, {graph.n_receivers}]")
    k = torch.nan_to_num(scores.abs().float(), nan=-1.0)
    k[~graph.mask] = -1.0
    return k


def prune(graph: EdgeGraph, circuit: Tensor) -> Tensor:
    """Remove edges out of parentless nodes and into childless nodes, until nothing changes."""
    c = circuit & graph.mask
    inputs = graph.sender_inputs
    owners = [graph.receiver_owner_senders(r) for r in range(graph.n_receivers)]
    while True:
        has_in = c.any(0)  # per receiver
        alive = torch.tensor([s == 0 or bool(has_in[inputs[s]].any()) for s in range(graph.n_senders)])
        c2 = c & alive[:, None]
        useful = torch.zeros(graph.n_receivers, dtype=torch.bool)
        useful[graph.logits_receiver] = True
        # receivers in reverse topological order: a sender is useful if it feeds a useful receiver
        sender_useful = torch.zeros(graph.n_senders, dtype=torch.bool)
        for r in sorted(range(graph.n_receivers), key=lambda r: (-int(graph.receiver_layer[r]), -r)):
            if r != graph.logits_receiver:
                useful[r] = bool(sender_useful[owners[r]].any())
            if useful[r]:
                sender_useful |= c2[:, r]
        c2 &= useful[None, :]
        if torch.equal(c2, c):
            return c
        c = c2


def top_n(graph: EdgeGraph, scores: Tensor, n: int, *, pruned: bool = True) -> Tensor:
    """The ``n`` edges of largest ``|score|`` among those scored (then pruned, so possibly fewer).

    Raises:
        CircuitError: a budget outside ``1..n_edges`` or scores of the wrong shape.
    """
    check_budget(graph, n)
    k = _key(graph, scores)
    top = torch.topk(k.flatten(), n)
    c = torch.zeros(graph.n_senders * graph.n_receivers, dtype=torch.bool)
    c[top.indices[top.values >= 0]] = True  # never an edge without a score (NaN: not computed)
    c = c.view(graph.n_senders, graph.n_receivers) & graph.mask
    return prune(graph, c) if pruned else c


def greedy(graph: EdgeGraph, scores: Tensor, n: int, *, pruned: bool = True) -> Tensor:
    """EAP-IG's greedy growth from the logits (see the module docstring).

    Raises:
        CircuitError: a budget outside ``1..n_edges`` or scores of the wrong shape.
    """
    check_budget(graph, n)
    k = _key(graph, scores)
    c = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    heap: list[tuple[float, int, int]] = []
    opened: set[int] = set()

    def open_receiver(r: int) -> None:
        if r in opened:
            return
        opened.add(r)
        for s in graph.mask[:, r].nonzero().flatten().tolist():
            heapq.heappush(heap, (-float(k[s, r]), s, r))

    open_receiver(graph.logits_receiver)
    in_circuit = {0}
    added = 0
    while heap and added < n:
        _, s, r = heapq.heappop(heap)
        c[s, r] = True
        added += 1
        if s not in in_circuit:
            in_circuit.add(s)
            for rr in graph.sender_inputs[s]:
                open_receiver(rr)
    return prune(graph, c) if pruned else c


def acdc(
    p: Prepared, threshold: float, *, start: Tensor | None = None, window: int = 16, on_progress: Progress | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """ACDC with exact edge patching (noising: edges outside the circuit carry corrupt values).

    Args:
        p: a ``direction="noise"`` :func:`~patchtrace.circuits.exact.prepare` result.
        threshold: remove an edge when the metric drops by less than ``threshold · |clean − corrupt|``.
        start: the edges to start from (default: the whole graph); edges outside it stay patched
            (restricting ACDC to a subgraph when the whole graph is too slow).
        window: edges tried per speculative batch.
        on_progress: ``(done, total)`` in edges visited.

    Returns:
        ``(circuit mask, stats)`` with the number of trials evaluated.

    Raises:
        CircuitError: a denoising preparation, or a negative threshold.
    """
    G = p.graph
    if p.direction != "noise":
        raise CircuitError("ACDC patches the edges outside the circuit: prepare with direction='noise'")
    if threshold < 0:
        raise CircuitError(f"ACDC threshold {threshold}: must be ≥ 0")
    c = (G.mask.clone() if start is None else start & G.mask)
    gap = abs(p.baselines["clean"] - p.baselines["corrupt"])
    tau = threshold * gap
    cur = float(evaluate_sets(p, (G.mask & ~c)[None])[0])
    owners = [G.receiver_owner_senders(r) for r in range(G.n_receivers)]
    order = sorted(range(G.n_receivers), key=lambda r: (-int(G.receiver_layer[r]), -r))
    tick = counter(on_progress, int(c.sum()))
    trials = 0
    for r in order:
        cand = [s for s in reversed(c[:, r].nonzero().flatten().tolist())]
        if not cand:
            continue
        if r != G.logits_receiver and not bool(c[owners[r]].any()):
            c[cand, r] = False  # the receiver's node reaches nothing: its inputs cannot matter
            tick(len(cand))
            continue
        i = 0
        while i < len(cand):
            chunk = cand[i:i + window]
            masks = []
            trial = c.clone()
            for s in chunk:
                trial[s, r] = False
                masks.append(G.mask & ~trial)
            ms = evaluate_sets(p, torch.stack(masks)).tolist()
            trials += len(chunk)
            prev = cur
            for j, s in enumerate(chunk):
                i += 1
                if prev - ms[j] < tau:  # removing it costs less than tau: remove
                    c[s, r] = False
                    prev = ms[j]
                    tick(1)
                    continue
                tick(1)  # kept: later rows assumed its removal, so re-try them
                break
            cur = prev
    return c, {"trials": trials, "metric": cur, "threshold_abs": tau}


__all__ = ["acdc", "check_budget", "greedy", "prune", "top_n"]
