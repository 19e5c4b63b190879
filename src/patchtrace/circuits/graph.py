"""The edge graph of a pre-norm transformer: who can talk to whom through the residual stream.

In a pre-norm block every component *reads* a normalised copy of the residual stream and *writes*
its output back by addition. The stream entering any point is therefore the sum of everything
written before it (embedding, every earlier head and MLP, plus constant biases). That sum is what
makes edges well defined: an edge ``u → v`` is sender ``u``'s term in receiver ``v``'s input, and
patching it means changing that one term in that one input, leaving every other reader of the
stream alone.

Nodes (for ``L`` layers, ``H`` query heads, ``K`` KV heads):

* **senders** — ``input`` (token + position embedding), ``a{l}.h{h}`` (head ``h``'s output after
  its slice of the output projection, bias excluded: the bias is a constant that no patch changes),
  ``m{l}`` (MLP output, bias included). ``1 + L·(H+1)`` in all.
* **receivers** — ``a{l}.h{h}<q>`` (head ``h``'s query input), ``a{l}.kv{g}<k>`` and
  ``a{l}.kv{g}<v>`` (the key and value inputs of KV head ``g``: under grouped-query attention a key
  is computed once per KV head and shared by ``H/K`` query heads, so that is the unit that has an
  input), ``m{l}`` (MLP input), ``logits`` (the final norm's input). ``L·(H+2K+1) + 1`` in all.

An edge exists iff the sender is computed before the receiver reads the stream: ``input`` feeds
everything; heads of layer ``l`` feed receivers of layers ``> l`` and the MLP of layer ``l`` in
sequential blocks (not in parallel blocks such as GPT-NeoX's, whose MLP reads ``resid_pre``); the
MLP of layer ``l`` feeds layers ``> l`` and the logits. SmolLM2-135M (30 layers, 9 heads, 3 KV
heads): 301 senders, 481 receivers, 70,651 edges. GPT-2 small: 157 senders, 445 receivers,
32,491 edges (the figure EAP-IG reports).

Post-norm ("sandwich") blocks such as Gemma 3 normalise the *sum* of the heads before adding it, so a
single head's term in the stream does not exist: :func:`check_family` refuses them rather than
return a number that means something else.

Example:
    >>> from patchtrace.circuits.graph import EdgeGraph
    >>> g = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=1, parallel=False)
    >>> g.n_senders, g.n_receivers, g.n_edges
    (7, 11, 36)
    >>> g.sender_names[1], g.receiver_names[2], g.edge_name(1, g.receiver_index("m0"))
    ('a0.h0', 'a0.kv0<k>', 'a0.h0 → m0')
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceError


class CircuitError(PatchtraceError, ValueError):
    """A bad edge, node, budget or model for circuit work (names the item)."""


def check_family(model: Any) -> None:
    """Refuse families where a single component's term in the residual stream is not defined.

    Raises:
        CircuitError: a post-norm family (Gemma 3's sandwich blocks, BERT/RoBERTa).
    """
    fam = model.family
    if fam.post_norms:
        raise CircuitError(
            f"model family {fam.name!r} has post-norm blocks (Gemma 3's sandwich blocks normalise each "
            "sublayer's output before the residual add; BERT/RoBERTa normalise the stream after it): a "
            "single head's contribution to the residual stream is not "
            "defined, so edges (and EAP scores) would mean something else. Edge circuits need a pre-norm "
            "family (llama, mistral, qwen2/3, gemma, gpt2, gpt_neox)."
        )


@dataclass(frozen=True)
class EdgeGraph:
    """Senders, receivers and the real edges between them (see the module docstring).

    Args:
        n_layers, n_heads, n_kv_heads: the model's dimensions.
        parallel: parallel blocks (the MLP reads ``resid_pre``, not the heads of its own layer).
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, model: Any) -> EdgeGraph:
        """The graph of a loaded model (refuses post-norm families, see :func:`check_family`)."""
        check_family(model)
        d = model.dims
        return cls(d.n_layers, d.n_heads, d.n_kv_heads, bool(d.parallel_residual))

    # -- sizes and layout ---------------------------------------------------------------------

    @property
    def per_layer_senders(self) -> int:
        return self.n_heads + 1

    @property
    def per_layer_receivers(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * self.per_layer_senders

    @property
    def n_receivers(self) -> int:
        return self.n_layers * self.per_layer_receivers + 1

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * self.per_layer_senders + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * self.per_layer_senders + self.n_heads

    def layer_receivers(self, layer: int) -> slice:
        """The receiver indices of one layer: ``H`` q, ``K`` k, ``K`` v, then the MLP."""
        s = layer * self.per_layer_receivers
        return slice(s, s + self.per_layer_receivers)

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    @cached_property
    def sender_names(self) -> list[str]:
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return out

    @cached_property
    def receiver_names(self) -> list[str]:
        out = []
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            out += [f"a{layer}.kv{g}<k>" for g in range(self.n_kv_heads)]
            out += [f"a{layer}.kv{g}<v>" for g in range(self.n_kv_heads)]
            out.append(f"m{layer}")
        return [*out, "logits"]

    @cached_property
    def sender_layer(self) -> Tensor:
        """Per sender, the layer it writes in (``-1`` for ``input``)."""
        return torch.tensor([-1] + [li for li in range(self.n_layers) for _ in range(self.per_layer_senders)])

    @cached_property
    def receiver_layer(self) -> Tensor:
        """Per receiver, the layer it reads in (``n_layers`` for ``logits``)."""
        return torch.tensor([li for li in range(self.n_layers) for _ in range(self.per_layer_receivers)]
                            + [self.n_layers])

    @cached_property
    def sender_is_mlp(self) -> Tensor:
        return torch.tensor([False] + [i == self.n_heads for _ in range(self.n_layers)
                                       for i in range(self.per_layer_senders)])

    @cached_property
    def receiver_is_mlp(self) -> Tensor:
        per = self.per_layer_receivers
        return torch.tensor([i == per - 1 for _ in range(self.n_layers) for i in range(per)] + [False])

    @cached_property
    def mask(self) -> Tensor:
        """``[n_senders, n_receivers]`` bool: the real edges."""
        sl, rl = self.sender_layer[:, None], self.receiver_layer[None, :]
        earlier = sl < rl
        same_layer_to_mlp = (sl == rl) & ~self.sender_is_mlp[:, None] & self.receiver_is_mlp[None, :]
        if self.parallel:
            return earlier
        return earlier | same_layer_to_mlp

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    # -- names -------------------------------------------------------------------------------

    def sender_index(self, name: str) -> int:
        try:
            return self.sender_names.index(name)
        except ValueError:
            raise CircuitError(f"unknown sender {name!r} (senders are 'input', 'a<layer>.h<head>', 'm<layer>')") from None

    def receiver_index(self, name: str) -> int:
        try:
            return self.receiver_names.index(name)
        except ValueError:
            raise CircuitError(
                f"unknown receiver {name!r} (receivers are 'a<l>.h<h><q>', 'a<l>.kv<g><k>', 'a<l>.kv<g><v>', "
                "'m<l>', 'logits')"
            ) from None

    def edge_name(self, s: int, r: int) -> str:
        return f"{self.sender_names[s]} → {self.receiver_names[r]}"

    def parse_edge(self, text: str) -> tuple[int, int]:
        """``"a0.h1 -> m2"`` (or ``→``) → ``(sender index, receiver index)``.

        Raises:
            CircuitError: an unknown node, or a receiver that reads before the sender writes.
        """
        a, sep, b = text.replace("→", "->").partition("->")
        if not sep:
            raise CircuitError(f"edge {text!r}: write 'sender -> receiver'")
        return self.check_edge(self.sender_index(a.strip()), self.receiver_index(b.strip()))

    def check_edge(self, s: int, r: int) -> tuple[int, int]:
        """Refuse an edge that does not exist (a receiver that reads before its sender writes)."""
        if not (0 <= s < self.n_senders and 0 <= r < self.n_receivers):
            raise CircuitError(f"edge ({s}, {r}) is outside the graph ({self.n_senders} senders, {self.n_receivers} receivers)")
        if not bool(self.mask[s, r]):
            raise CircuitError(
                f"edge {self.edge_name(s, r)} does not exist: the receiver reads the residual stream before "
                f"the sender writes to it"
            )
        return s, r

    def edges_mask(self, edges: Iterable[tuple[int, int] | str]) -> Tensor:
        """A ``[n_senders, n_receivers]`` bool mask of the given edges (checked)."""
        m = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for e in edges:
            s, r = self.parse_edge(e) if isinstance(e, str) else self.check_edge(*e)
            m[s, r] = True
        return m

    def edge_list(self, mask: Tensor) -> list[tuple[int, int]]:
        """The ``(sender, receiver)`` pairs of a mask, sender-major."""
        return [(int(s), int(r)) for s, r in mask.nonzero().tolist()]

    # -- node view ---------------------------------------------------------------------------

    def receiver_node(self, r: int) -> str:
        """The component a receiver belongs to (``a3.h2`` for its q input; ``a3.kv1`` for k/v)."""
        return self.receiver_names[r].split("<")[0]

    def receiver_owner_senders(self, r: int) -> list[int]:
        """The senders whose output is computed from receiver ``r``'s input (empty for logits)."""
        if r == self.logits_receiver:
            return []
        layer = int(self.receiver_layer[r])
        i = r - layer * self.per_layer_receivers
        H, K = self.n_heads, self.n_kv_heads
        if i == self.per_layer_receivers - 1:
            return [self.mlp_sender(layer)]
        if i < H:
            return [self.head_sender(layer, i)]
        g = (i - H) % K
        group = H // K
        return [self.head_sender(layer, h) for h in range(g * group, (g + 1) * group)]

    @cached_property
    def sender_inputs(self) -> list[list[int]]:
        """Per sender, the receivers its output is computed from (``input``: none)."""
        out: list[list[int]] = [[] for _ in range(self.n_senders)]
        for r in range(self.n_receivers):
            for s in self.receiver_owner_senders(r):
                out[s].append(r)
        return out

    def describe(self) -> dict[str, int | bool]:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "parallel": self.parallel, "n_senders": self.n_senders, "n_receivers": self.n_receivers,
                "n_edges": self.n_edges}


def graph_from(describe: dict[str, Any]) -> EdgeGraph:
    """Rebuild a graph from :meth:`EdgeGraph.describe` (results carry it)."""
    return EdgeGraph(int(describe["n_layers"]), int(describe["n_heads"]), int(describe["n_kv_heads"]),
                     bool(describe["parallel"]))


def names_of(graph: EdgeGraph, edges: Sequence[tuple[int, int]]) -> list[str]:
    return [graph.edge_name(s, r) for s, r in edges]


__all__ = ["CircuitError", "EdgeGraph", "check_family", "graph_from", "names_of"]
