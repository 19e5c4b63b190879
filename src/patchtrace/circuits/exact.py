"""Exact path patching: the effect of an edge, or of a set of edges, by running the patched model.

Conventions (shared with :mod:`patchtrace.circuits.eap`, so the two correlate edge by edge):

* ``direction="noise"`` (default, EAP's): the base run is the clean prompt, the source run the
  corrupt one; ``direction="denoise"`` swaps them.
* Patching edge ``u → v`` makes receiver ``v`` see the *source run's* value of sender ``u``:
  ``in_v += z_u(source) − z_u(this run)``; every other reader of the stream is untouched. For one
  edge ``z_u(this run) = z_u(base)`` (nothing upstream of ``u`` changed), so the edge grid adds the
  fixed difference of the two runs. For a set, the current value is used, which is what "edge
  ``u → v`` carries the source value" means when ``u``'s own inputs are patched too (EAP-IG's
  ``evaluate_graph`` and ACDC use the same rule).
* ``effect(u → v) = mean over examples of M(base with the edge patched) − M(base)``.

Why it is fast (the engine's three ideas, applied to edges): (1) a receiver at layer ``l`` changes
nothing before layer ``l``, so its patched run starts at ``l`` from the base run's cached residual
stream; (2) positions before the first token where the two prompts differ carry no difference in any
sender, so the run starts there, attending to the base run's cached keys/values of the prefix
(IOI: 5 of 14 positions); (3) only the metric's vocabulary columns of the last position are
unembedded. Many edges ride in one batch (rows ``k·N + i``: edge ``k``, example ``i``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from patchtrace.circuits.forward import EdgeForward, NoDeltas, OneReceiverPerRow
from patchtrace.circuits.graph import CircuitError, EdgeGraph
from patchtrace.metrics import Metric
from patchtrace.progress import Progress, counter
from patchtrace.tasks.base import Task, TokenizedTask

Direction = Literal["noise", "denoise"]


@dataclass
class Group:
    """One equal-length group of examples with its base and source runs recorded.

    Attributes:
        idx: example indices; p0: first position where clean and corrupt differ.
        base_ids, src_ids: ``[N, T]``. base_out, src_out: sender outputs ``[N, T−p0, S, D]``.
        resid: the base stream entering layer ``l`` (``l = 0..L``), positions ``p0..``.
        kv: the base run's keys/values of positions ``< p0`` per layer.
        answer, wrong: ``[N, A]``. cols: vocabulary columns (None: all). ref: clean log-probs (kl).
        m_base, m_src, m_clean, m_corrupt: ``[N]`` metric values.
    """

    idx: list[int]
    p0: int
    base_ids: Tensor
    src_ids: Tensor
    base_out: Tensor
    src_out: Tensor
    resid: dict[int, Tensor]
    kv: dict[int, tuple[Tensor, Tensor]]
    answer: Tensor
    wrong: Tensor
    cols: Tensor | None
    ref: Tensor | None
    m_base: Tensor
    m_src: Tensor
    m_clean: Tensor
    m_corrupt: Tensor

    def score(self, metric: Metric, logits: Tensor, k: int) -> Tensor:
        """Metric of ``k`` stacked copies of this group's rows, ``[k, N]``."""
        ref = None if self.ref is None else self.ref.repeat(k, 1)
        m = metric.score(logits, self.answer.repeat(k, 1), self.wrong.repeat(k, 1), ref, self.cols)
        return m.view(k, -1)


@dataclass
class Prepared:
    """Everything the patched runs reuse: the graph, the forward, the groups and the settings."""

    fwd: EdgeForward
    graph: EdgeGraph
    groups: list[Group]
    metric: Metric
    direction: Direction
    n: int

    def mean(self, per_group: Sequence[Tensor]) -> float:
        return float(sum(t.sum() for t in per_group) / self.n)

    @property
    def baselines(self) -> dict[str, float]:
        return {"clean": self.mean([g.m_clean for g in self.groups]),
                "corrupt": self.mean([g.m_corrupt for g in self.groups])}


def _tok(model: Any, task: Task | TokenizedTask) -> TokenizedTask:
    return task if isinstance(task, TokenizedTask) else task.tokenize(model.tokenizer)


@torch.no_grad()
def prepare(model: Any, task: Task | TokenizedTask, *, direction: Direction = "noise", metric: str = "logit_diff") -> Prepared:
    """Record the base and source runs of every length group (refuses post-norm families).

    Raises:
        CircuitError: a post-norm family or an unknown direction.
        MetricError: an unknown metric.
    """
    if direction not in ("noise", "denoise"):
        raise CircuitError(f"direction {direction!r}: use 'noise' or 'denoise'")
    met = Metric(metric)
    fwd = EdgeForward(model)
    tok = _tok(model, task)
    groups = []
    for idx in tok.groups():
        clean, corrupt = tok.ids("clean", idx).to(model.device), tok.ids("corrupt", idx).to(model.device)
        base_ids, src_ids = (clean, corrupt) if direction == "noise" else (corrupt, clean)
        differ = (clean != corrupt).any(0).nonzero()
        T = clean.shape[1]
        p0 = min(int(differ[0]) if len(differ) else T - 1, T - 1)
        answer, wrong = tok.answer[idx].to(model.device), tok.wrong[idx].to(model.device)
        cols = met.columns(answer, wrong)
        runs = []
        for ids in (base_ids, src_ids, clean):
            rec = NoDeltas(record=True)
            out = fwd.run(rec, ids=ids, cols=cols, keep_resid=True, keep_kv=True)
            runs.append((rec.senders(), out))
        ref = torch.log_softmax(runs[2][1].logits.float(), -1) if metric == "kl" else None
        (b_out, b), (s_out, s) = runs[0], runs[1]
        m_b = met.score(b.logits, answer, wrong, ref, cols)
        m_s = met.score(s.logits, answer, wrong, ref, cols)
        m_clean, m_corrupt = (m_b, m_s) if direction == "noise" else (m_s, m_b)
        groups.append(Group(
            idx, p0, base_ids, src_ids, b_out[:, p0:], s_out[:, p0:],
            {li: r[:, p0:] for li, r in b.resid.items()},
            {li: (k[:, :, :p0], v[:, :, :p0]) for li, (k, v) in b.kv.items()},
            answer, wrong, cols, ref, m_b, m_s, m_clean, m_corrupt,
        ))
    return Prepared(fwd, fwd.graph, groups, met, direction, len(tok))


class OneEdgeRows(OneReceiverPerRow):
    """Rows ``k·N + i`` patch edge ``k`` alone, adding the fixed difference ``src − base`` of its sender.

    With ``sparse`` (default) the attention receivers go through :meth:`attn_rows` (one changed
    receiver per row, projected alone) and the last layer runs after its attention at the last
    position only; without, the receivers go through the dense ``[B, n, H+2K, D]`` :meth:`attn`
    (every receiver's copy of every row normalised and projected) and the last layer at every
    position: the same numbers, more work (the path before both shortcuts, kept as the comparison
    for tests and benchmarks).
    """

    def __init__(self, graph: EdgeGraph, edges: Sequence[tuple[int, int]], diff: Tensor, sparse: bool = True) -> None:
        super().__init__()
        self.g, self.edges, self.diff, self.sparse = graph, list(edges), diff, sparse
        self.trim_last = sparse
        self.N = diff.shape[0]

    def attn_rows(self, layer: int) -> tuple[Tensor, Tensor, int] | None:
        g, N = self.g, self.N
        if not self.sparse or layer >= g.n_layers:
            return None
        sl = g.layer_receivers(layer)
        nr = g.n_heads + 2 * g.n_kv_heads
        sel = [(k, s, r - sl.start) for k, (s, r) in enumerate(self.edges) if sl.start <= r < sl.start + nr]
        if not sel:
            return None
        K = len(self.edges)
        _, n, _, D = self.diff.shape
        loc = torch.full((K, N), -1, dtype=torch.long)
        delta = self.diff.new_zeros(K, N, n, D)
        ks = torch.tensor([x[0] for x in sel])
        loc[ks] = torch.tensor([x[2] for x in sel])[:, None]
        delta[ks] = self.diff[:, :, torch.tensor([x[1] for x in sel])].permute(2, 0, 1, 3)
        return loc.view(K * N), delta.view(K * N, n, D), N

    def _place(self, layer: int, attn: bool) -> Tensor | None:
        g, K, N = self.g, len(self.edges), self.N
        sl = g.layer_receivers(layer) if layer < g.n_layers else slice(g.logits_receiver, g.logits_receiver + 1)
        nr = g.n_heads + 2 * g.n_kv_heads
        lo = sl.start
        sel = []
        for k, (s, r) in enumerate(self.edges):
            if not sl.start <= r < sl.stop:
                continue
            local = r - lo
            is_attn = layer < g.n_layers and local < nr
            if is_attn == attn:
                sel.append((k, s, local))
        if not sel:
            return None
        _, n, _, D = self.diff.shape
        ks = torch.tensor([x[0] for x in sel])
        ss = torch.tensor([x[1] for x in sel])
        vals = self.diff[:, :, ss].permute(2, 0, 1, 3)  # [E, N, n, D]
        if attn:
            out = self.diff.new_zeros(K, N, n, nr, D)
            out[ks, :, :, torch.tensor([x[2] for x in sel])] = vals
            return out.view(K * N, n, nr, D)
        out = self.diff.new_zeros(K, N, n, D)
        out[ks] = vals
        return out.view(K * N, n, D)

    def attn(self, layer: int) -> Tensor | None:
        return None if self.sparse else self._place(layer, True)

    def mlp(self, layer: int) -> Tensor | None:
        return self._place(layer, False)

    def logits(self) -> Tensor | None:
        return self._place(self.g.n_layers, False)


class EdgeSetRows(NoDeltas):
    """Rows ``k·N + i`` patch edge set ``k`` (``masks[k]``), each receiver seeing its patched senders'
    source values: ``Δ_v = Σ_u mask[u, v] · (z_u(source) − z_u(this run))``."""

    def __init__(self, graph: EdgeGraph, masks: Tensor, src: Tensor, base: Tensor) -> None:
        super().__init__()
        self.g = graph
        K = masks.shape[0]
        used = masks.any(0).any(1)
        self.U = used.nonzero().flatten()
        self.pos = {int(s): j for j, s in enumerate(self.U.tolist())}
        self.m = masks[:, self.U].to(src.dtype)  # [K, U, R]
        self.src = src[:, :, self.U]  # [N, n, U, D]
        self.d = (self.src - base[:, :, self.U]).unsqueeze(0).repeat(K, 1, 1, 1, 1)  # [K, N, n, U, D]
        self.K, self.N = K, src.shape[0]

    @property
    def needs_heads(self) -> bool:
        return True

    def wrote(self, first_sender: int, out: Tensor) -> None:
        o = out.view(self.K, self.N, *out.shape[1:])
        for j in range(out.shape[2]):
            p = self.pos.get(first_sender + j)
            if p is not None:
                self.d[:, :, :, p] = self.src[:, :, p] - o[:, :, :, j]

    def _delta(self, sl: slice) -> Tensor | None:
        m = self.m[:, :, sl]
        if not bool(m.any()):
            return None
        out = torch.einsum("kitud,kur->kitrd", self.d, m)
        return out.reshape(self.K * self.N, *out.shape[2:])

    def attn(self, layer: int) -> Tensor | None:
        sl = self.g.layer_receivers(layer)
        return self._delta(slice(sl.start, sl.stop - 1))

    def mlp(self, layer: int) -> Tensor | None:
        r = self.g.layer_receivers(layer).stop - 1
        d = self._delta(slice(r, r + 1))
        return None if d is None else d[:, :, 0]

    def logits(self) -> Tensor | None:
        r = self.g.logits_receiver
        d = self._delta(slice(r, r + 1))
        return None if d is None else d[:, :, 0]


def _run_rows(p: Prepared, g: Group, rows: NoDeltas, k: int, layer: int) -> Tensor:
    """Metric ``[k, N]`` of ``k`` stacked patches of group ``g`` starting at ``layer``."""
    resid = g.resid[layer].repeat(k, 1, 1)
    out = p.fwd.run(rows, resid=resid, start_layer=layer, cols=g.cols, pos_offset=g.p0, past_kv=g.kv)
    return g.score(p.metric, out.logits, k)


@torch.no_grad()
def edge_grid(
    p: Prepared, *, receivers: Sequence[int] | None = None, edges: Tensor | None = None, max_rows: int = 256,
    on_progress: Progress | None = None, sparse: bool = True,
) -> Tensor:
    """Exact effect of every edge into ``receivers`` (default: all), or of the edges in the mask
    ``edges``, as ``[S, R]`` (NaN where not computed). ``sparse=False`` takes the path without the
    first- and last-layer shortcuts (see :class:`OneEdgeRows`): same numbers, slower.

    Raises:
        CircuitError: a receiver index outside the graph, or a mask naming edges that do not exist.
    """
    G = p.graph
    recs = list(range(G.n_receivers)) if receivers is None else sorted({int(r) for r in receivers})
    bad = [r for r in recs if not 0 <= r < G.n_receivers]
    if bad:
        raise CircuitError(f"receiver {bad[0]} is outside the graph ({G.n_receivers} receivers)")
    want = G.mask.clone()
    want[:, [r for r in range(G.n_receivers) if r not in set(recs)]] = False
    if edges is not None:
        if tuple(edges.shape) != tuple(G.mask.shape) or bool((edges & ~G.mask).any()):
            raise CircuitError(f"edge mask of shape {tuple(edges.shape)} names edges outside the graph")
        want &= edges
    eff = torch.full((G.n_senders, G.n_receivers), float("nan"))
    acc = torch.zeros(G.n_senders, G.n_receivers)
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for s, r in G.edge_list(want):
        by_layer.setdefault(int(G.receiver_layer[r]), []).append((s, r))
    tick = counter(on_progress, sum(len(v) for v in by_layer.values()) * len(p.groups))
    for g in p.groups:
        diff = g.src_out - g.base_out
        per = max(1, max_rows // len(g.idx))
        for layer, layer_edges in sorted(by_layer.items()):
            for c in range(0, len(layer_edges), per):
                chunk = layer_edges[c:c + per]
                m = _run_rows(p, g, OneEdgeRows(G, chunk, diff, sparse), len(chunk), layer)
                eff_k = (m - g.m_base).sum(1)
                for (s, r), e in zip(chunk, eff_k.tolist(), strict=True):
                    acc[s, r] += e
                tick(len(chunk))
    eff[want] = acc[want] / p.n
    return eff


@torch.no_grad()
def evaluate_sets(p: Prepared, patched: Tensor, *, max_bytes: int = 1 << 29) -> Tensor:
    """Mean metric with each edge set patched: ``patched`` ``[K, S, R]`` bool → ``[K]``.

    Raises:
        CircuitError: a mask of the wrong shape or one that names edges that do not exist.
    """
    G = p.graph
    if patched.dim() == 2:
        patched = patched[None]
    if tuple(patched.shape[1:]) != (G.n_senders, G.n_receivers):
        raise CircuitError(f"edge mask of shape {tuple(patched.shape)}: expected [K, {G.n_senders}, {G.n_receivers}]")
    if bool((patched & ~G.mask).any()):
        s, r = (patched & ~G.mask).nonzero()[0, 1:].tolist()
        raise CircuitError(f"edge {G.edge_name(s, r)} does not exist: the receiver reads before the sender writes")
    K = patched.shape[0]
    total = torch.zeros(K)
    for g in p.groups:
        N, n, _, D = g.base_out.shape
        used = int(patched.any(0).any(1).sum())
        per = max(1, int(max_bytes // max(1, N * n * max(used, 1) * D * 4 * 2)))
        for c in range(0, K, per):
            masks = patched[c:c + per]
            k = masks.shape[0]
            has = masks.any(1)  # [k, R]
            if not bool(has.any()):
                total[c:c + k] += g.m_base.sum()
                continue
            layer = int(G.receiver_layer[has.any(0)].min())
            m = _run_rows(p, g, EdgeSetRows(G, masks, g.src_out, g.base_out), k, layer)
            total[c:c + k] += m.sum(1)
    return total / p.n


__all__ = ["Direction", "EdgeSetRows", "Group", "OneEdgeRows", "Prepared", "edge_grid", "evaluate_sets", "prepare"]
