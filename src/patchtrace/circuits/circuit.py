"""The :class:`Circuit` result: a set of edges with the scores that chose it, saved and drawn.

Saved as a folder with ``circuit.safetensors`` (the edge mask and the scores) and ``circuit.json``
(graph dimensions, the edge list by name, method, faithfulness, curves, provenance). Nothing is
pickled. :meth:`Circuit.draw` writes the graph picture: nodes by layer (input at the bottom, logits
at the top, heads in a row per layer with their KV heads just below, the MLP at the right), edges coloured by the sign of their
score and as wide as its magnitude, with q/k/v inputs drawn solid/dashed/dotted.

Example:
    >>> import torch
    >>> from patchtrace.circuits.graph import EdgeGraph
    >>> g = EdgeGraph(2, 2, 1)
    >>> c = Circuit.from_edges(g, ["input -> a0.h1<q>", "a0.h1 -> logits"], method="by hand")
    >>> c.n_edges, c.edge_names()
    (2, ['input → a0.h1<q>', 'a0.h1 → logits'])
    >>> sorted(c.nodes())
    ['a0.h1', 'input', 'logits']
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchtrace.circuits.graph import CircuitError, EdgeGraph, graph_from
from patchtrace.report.figure import save_figure

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Circuit:
    """A circuit of an :class:`EdgeGraph`.

    Attributes:
        graph: the edge graph.
        edges: ``[S, R]`` bool mask of the circuit's edges.
        scores: ``[S, R]`` scores that chose it (NaN off the graph), or None.
        method: how it was chosen (``exact top-n``, ``acdc`` ...).
        faithfulness: ``{"outside": F, "restore": F}`` for this circuit, when measured.
        curves: faithfulness curves (``Curve.to_json()`` dicts) measured along the way.
        provenance: model, task, settings.
    """

    graph: EdgeGraph
    edges: Tensor
    scores: Tensor | None = None
    method: str = ""
    faithfulness: dict[str, float] = field(default_factory=dict)
    curves: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = self.graph
        if tuple(self.edges.shape) != (g.n_senders, g.n_receivers):
            raise CircuitError(f"circuit mask of shape {tuple(self.edges.shape)}: expected [{g.n_senders}, {g.n_receivers}]")
        if bool((self.edges & ~g.mask).any()):
            s, r = (self.edges & ~g.mask).nonzero()[0].tolist()
            raise CircuitError(f"circuit edge {g.edge_name(s, r)} does not exist in the graph")

    @classmethod
    def from_edges(cls, graph: EdgeGraph, edges: Iterable[str | tuple[int, int]], **kw: Any) -> Circuit:
        return cls(graph, graph.edges_mask(edges), **kw)

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def edge_list(self) -> list[tuple[int, int]]:
        return self.graph.edge_list(self.edges)

    def edge_names(self) -> list[str]:
        return [self.graph.edge_name(s, r) for s, r in self.edge_list()]

    def nodes(self) -> set[str]:
        """Components touched by an edge (receivers named by their component: ``a3.h1``, ``a3.kv0``)."""
        out = set()
        for s, r in self.edge_list():
            out.add(self.graph.sender_names[s])
            out.add(self.graph.receiver_node(r))
        return out

    def contains(self, edge: str) -> bool:
        s, r = self.graph.parse_edge(edge)
        return bool(self.edges[s, r])

    def __repr__(self) -> str:
        f = ", ".join(f"{k}={v:.3f}" for k, v in self.faithfulness.items())
        return f"Circuit({self.n_edges} edges, method={self.method!r}{', ' + f if f else ''})"

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``circuit.safetensors`` + ``circuit.json`` into directory ``path``."""
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        t = {"edges": self.edges.to(torch.uint8).contiguous()}
        if self.scores is not None:
            t["scores"] = self.scores.detach().float().cpu().contiguous()
        save_file(t, str(p / "circuit.safetensors"))
        meta = {"format_version": FORMAT_VERSION, "graph": self.graph.describe(), "method": self.method,
                "n_edges": self.n_edges, "edges": self.edge_names(), "faithfulness": self.faithfulness,
                "curves": self.curves, "provenance": self.provenance}
        (p / "circuit.json").write_text(json.dumps(meta, indent=2, default=str))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read a folder written by :meth:`save`.

        Raises:
            CircuitError: missing files or another format version.
        """
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / "circuit.json").is_file() or not (p / "circuit.safetensors").is_file():
            raise CircuitError(f"{p} is not a circuit folder (needs circuit.json and circuit.safetensors)")
        meta = json.loads((p / "circuit.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise CircuitError(f"{p}: circuit format {meta.get('format_version')} is not {FORMAT_VERSION}")
        t = load_file(str(p / "circuit.safetensors"))
        return cls(graph_from(meta["graph"]), t["edges"].bool(), t.get("scores"), meta["method"],
                   meta["faithfulness"], meta["curves"], meta["provenance"])

    # -- picture ------------------------------------------------------------------------------

    def _xy(self, name: str) -> tuple[float, float]:
        g = self.graph
        if name == "input":
            return (g.n_heads / 2, -1.0)
        if name == "logits":
            return (g.n_heads / 2, float(g.n_layers))
        layer = int(name[1:].split(".")[0])
        if name.startswith("m"):
            return (g.n_heads + 0.8, layer + 0.5)
        unit = int(name.split(".")[1][2:] if ".kv" in name else name.split(".h")[1])
        if ".kv" in name:  # a KV head: below its layer's heads, in the middle of its query group
            group = g.n_heads // g.n_kv_heads
            return (unit * group + (group - 1) / 2, layer - 0.35)
        return (float(unit), float(layer))

    def draw(self, path: str | Path, title: str | None = None, max_edges: int = 400) -> Path:
        """Write the graph picture (PNG); the ``max_edges`` largest-score edges are drawn."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        g = self.graph
        edges = self.edge_list()
        sc = self.scores
        if sc is not None and len(edges) > max_edges:
            edges = sorted(edges, key=lambda e: -abs(float(torch.nan_to_num(sc[e]))))[:max_edges]
        mag = max([abs(float(torch.nan_to_num(sc[e]))) for e in edges] + [1e-12]) if sc is not None else 1.0
        fig, ax = plt.subplots(figsize=(min(14, 2 + 0.9 * (g.n_heads + 2)), min(16, 2 + 0.45 * (g.n_layers + 2))))
        style = {"q": "-", "k": "--", "v": ":"}
        for s, r in edges:
            x0, y0 = self._xy(g.sender_names[s])
            x1, y1 = self._xy(g.receiver_node(r))
            rn = g.receiver_names[r]
            ls = style.get(rn[-2], "-") if rn.endswith(">") else "-"
            v = float(torch.nan_to_num(sc[s, r])) if sc is not None else 1.0
            ax.plot([x0, x1], [y0, y1], ls=ls, lw=0.4 + 2.6 * abs(v) / mag, alpha=0.7,
                    color="tab:red" if v < 0 else "tab:blue")
        for n in sorted(self.nodes()):
            x, y = self._xy(n)
            ax.scatter([x], [y], s=60, color="white", edgecolors="black", zorder=3)
            ax.annotate(n, (x, y), fontsize=6, ha="center", va="bottom", xytext=(0, 4), textcoords="offset points")
        ax.set_yticks(range(-1, g.n_layers + 1))
        ax.set_yticklabels(["input"] + [f"L{i}" for i in range(g.n_layers)] + ["logits"], fontsize=6)
        ax.set_xticks([])
        ax.set_title(title or f"{self.method}: {self.n_edges} edges (blue +, red −; q solid, k dashed, v dotted)", fontsize=9)
        return save_figure(fig, path)


__all__ = ["Circuit"]
