"""One call from a model and a task to edge scores or a circuit (what the CLI runs).

Example:
    Score every edge of a tiny two-layer Llama on IOI with EAP, then grow a 20-edge circuit:

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from patchtrace import make_task, load_model
    >>> from patchtrace.models.load import wrap_model
    >>> tok = load_model().tokenizer
    >>> _ = torch.manual_seed(0)
    >>> cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
    ...                   intermediate_size=64, vocab_size=len(tok))
    >>> m = wrap_model(LlamaForCausalLM(cfg).eval(), tok, name="tiny")
    >>> s = edge_scores(m, make_task("ioi", n=2), "eap")
    >>> s.axes, int(torch.isfinite(s.values).sum())
    (('sender', 'receiver'), 82)
    >>> c = find_circuit(m, make_task("ioi", n=2), method="eap", edges=20)
    >>> c.n_edges <= 20, sorted(c.faithfulness)
    (True, ['outside', 'restore'])
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import Tensor

from patchtrace.circuits import discovery, eap
from patchtrace.circuits.circuit import Circuit
from patchtrace.circuits.edges import as_scores
from patchtrace.circuits.exact import Direction, Prepared, edge_grid, prepare
from patchtrace.circuits.faithfulness import curve, faithfulness
from patchtrace.circuits.graph import CircuitError
from patchtrace.progress import Progress
from patchtrace.results import Scores, make_provenance
from patchtrace.tasks.base import Task, TokenizedTask

SCORERS = ("exact", "eap", "eap-ig", "eap-ig-act")
METHODS = (*SCORERS, "acdc")


@dataclass(frozen=True, kw_only=True)
class CircuitConfig:
    """Settings of :func:`find_circuit` (checked when built).

    Attributes:
        method: ``exact`` (edge grid), ``eap``, ``eap-ig``, ``eap-ig-act`` or ``acdc``.
        edges: the edge budget (top-n / greedy); for ACDC, the size of the EAP-IG pool it starts
            from (0: the whole graph).
        select: ``topn`` or ``greedy``.
        steps: EAP-IG steps ``m``.
        threshold: ACDC's threshold, a fraction of the clean − corrupt gap.
        metric: metric name.
        curve: edge budgets of the faithfulness curve (empty: none).
    """

    method: str = "eap-ig"
    edges: int = 200
    select: Literal["topn", "greedy"] = "topn"
    steps: int = 5
    threshold: float = 0.01
    metric: str = "logit_diff"
    curve: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CircuitError(f"circuit method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.select not in ("topn", "greedy"):
            raise CircuitError(f"select {self.select!r}: use 'topn' or 'greedy'")
        if self.edges < 0 or (self.method != "acdc" and self.edges < 1):
            raise CircuitError(f"edge budget {self.edges}: must be at least 1")
        if self.steps < 1:
            raise CircuitError(f"steps {self.steps}: need at least 1")


def score_prepared(p: Prepared, method: str, *, steps: int = 5, receivers: Any = None,
                   on_progress: Progress | None = None) -> Tensor:
    """``[S, R]`` scores of ``method`` (exact effects or an EAP variant) on a preparation."""
    if method == "exact":
        return edge_grid(p, receivers=receivers, on_progress=on_progress)
    if method in eap.VARIANTS:
        return eap.scores(p, method, steps=steps, on_progress=on_progress)  # type: ignore[arg-type]
    raise CircuitError(f"edge scoring method {method!r}: choose one of {', '.join(SCORERS)}")


def edge_scores(
    model: Any, task: Task | TokenizedTask, method: str = "exact", *, direction: Direction = "noise",
    metric: str = "logit_diff", steps: int = 5, on_progress: Progress | None = None,
) -> Scores:
    """Every edge's score as :class:`Scores` over ``(sender, receiver)`` (see :mod:`.edges`).

    Raises:
        CircuitError: an unknown method, a post-norm family, or a bad direction.
    """
    t0 = time.perf_counter()
    p = prepare(model, task, direction=direction, metric=metric)
    v = score_prepared(p, method, steps=steps, on_progress=on_progress)
    cfg = {"method": method, "direction": direction, "metric": metric, "steps": steps}
    prov = make_provenance(model, p_task(task), f"circuit:{method}", cfg)
    prov["seconds"] = time.perf_counter() - t0
    return as_scores(p.graph, v, method=method, direction=direction,
                     value_name="effect" if method == "exact" else "attribution", metric=metric,
                     baselines=p.baselines, provenance=prov)


def p_task(task: Task | TokenizedTask) -> Any:
    return task.task if isinstance(task, TokenizedTask) else task


def find_circuit(model: Any, task: Task | TokenizedTask, config: CircuitConfig | None = None, *,
                 on_progress: Progress | None = None, **kw: Any) -> Circuit:
    """Score the edges, choose a circuit, and measure its faithfulness under both conventions.

    Keyword arguments not given in ``config`` build one (``find_circuit(m, t, method="eap", edges=50)``).

    Raises:
        CircuitError: bad settings (see :class:`CircuitConfig`), a budget above the graph's edge count,
            or a post-norm family.
    """
    cfg = config or CircuitConfig(**kw)
    t0 = time.perf_counter()
    noise = prepare(model, task, direction="noise", metric=cfg.metric)
    G = noise.graph
    if cfg.method != "acdc" or cfg.edges:
        discovery.check_budget(G, cfg.edges)
    restore = prepare(model, task, direction="denoise", metric=cfg.metric)
    if cfg.method == "acdc":
        start = None
        sc = None
        if cfg.edges:
            sc = score_prepared(noise, "eap-ig", steps=cfg.steps)
            start = discovery.top_n(G, sc, cfg.edges, pruned=False)
        edges, stats = discovery.acdc(noise, cfg.threshold, start=start, on_progress=on_progress)
        label = f"acdc (threshold {cfg.threshold:g}{', pool ' + str(cfg.edges) + ' eap-ig edges' if cfg.edges else ''})"
    else:
        sc = score_prepared(noise, cfg.method, steps=cfg.steps, on_progress=on_progress)
        chooser = discovery.top_n if cfg.select == "topn" else discovery.greedy
        edges = chooser(G, sc, cfg.edges)
        stats = {}
        label = f"{cfg.method} {cfg.select} {cfg.edges}"
    f = faithfulness(edges, outside=noise, restore=restore)
    curves = []
    if cfg.curve and sc is not None:
        chooser = discovery.top_n if cfg.select == "topn" else discovery.greedy
        budgets = [b for b in cfg.curve if b <= G.n_edges]
        curves.append(curve(cfg.method, lambda n: chooser(G, sc, n), budgets, outside=noise, restore=restore).to_json())
    prov = make_provenance(model, p_task(task), f"circuit:{cfg.method}", asdict(cfg))
    prov.update({"seconds": time.perf_counter() - t0, "baselines": noise.baselines, "stats": stats})
    return Circuit(G, edges, sc, label, {k: v[0] for k, v in f.items()}, curves, prov)


__all__ = ["METHODS", "SCORERS", "CircuitConfig", "edge_scores", "find_circuit", "score_prepared"]
