"""Where is the bridge entity resolved? Patchscopes-style readout and the logit lens.

For each query and each layer ``l``, the hidden state ``h^l`` of the last first-hop token (``e1``) is
written into block ``l``'s output at the placeholder of an *identity prompt* — "Syria: Syria; Leonardo
DiCaprio: Leonardo DiCaprio; …; x" — and the model decodes greedily. A prompt that makes the model
repeat whatever entity it sees turns a hidden state into words: if the decoded text names the bridge
("France" for "Lyon"), the bridge is decodable from ``h^l``. The per-layer fraction of queries
for which it is, is the bridge-decoding rate (Biran et al.: it rises in early layers).

The same readout of the *last* position's hidden states, scored against the target's aliases, gives
the layer where the second hop's answer becomes decodable; the logit lens (the final norm and the
unembedding applied to ``resid_post[l]`` at the last position, top-1 = the target's first token) is
the cheap companion. The paper's pattern: bridge early, answer only later.

Every write is exact and cheap: the identity prompt's clean run is cached once, and a write at its
last position runs that one position through the layers above ``l`` (:func:`write_resid_suffix`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patchtrace.engine.cache import collect
from patchtrace.engine.xprompt import write_resid_suffix
from patchtrace.models.load import Model
from patchtrace.multihop.generate import decode_from, encode, first_token, to_text
from patchtrace.multihop.queries import MultihopError, TwoHopQuery, entity_last_token, matches
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import HookPoint

IDENTITY_PROMPT = "Syria: Syria; Leonardo DiCaprio: Leonardo DiCaprio; Samsung: Samsung; Tokyo: Tokyo; x"


@dataclass(frozen=True, kw_only=True)
class BridgeConfig:
    """Options of :func:`bridge_readout`.

    Attributes:
        identity_prompt: the target prompt; its last token is overwritten.
        max_new: tokens decoded per readout.
    """

    identity_prompt: str = IDENTITY_PROMPT
    max_new: int = 6

    def __post_init__(self) -> None:
        if self.max_new < 1:
            raise MultihopError(f"max_new must be ≥ 1, not {self.max_new}")


def _states(model: Model, q: TwoHopQuery) -> tuple[Tensor, Tensor]:
    """``resid_post`` of every layer at ``e1`` and at the last position: two ``[L, D]``."""
    ids = torch.tensor([encode(model, q.prompt, q.name)], device=model.device)
    e1 = entity_last_token(model.tokenizer, q)
    L = model.dims.n_layers
    run = collect(model, ids, [HookPoint("resid_post", li) for li in range(L)])
    post = [run.acts[HookPoint("resid_post", li)][0] for li in range(L)]
    return torch.stack([p[e1] for p in post]), torch.stack([p[-1] for p in post])


def _readout(model: Model, states: Tensor, cfg: BridgeConfig) -> list[list[str]]:
    """Decoded text per (query, layer) for ``states`` ``[Q, L, D]`` written into the identity prompt."""
    ids = torch.tensor([encode(model, cfg.identity_prompt, "identity prompt")], device=model.device)
    T, L = ids.shape[1], model.dims.n_layers
    run = collect(model, ids, [HookPoint("resid_post", li) for li in range(L)])
    texts: list[list[str]] = [[""] * L for _ in range(states.shape[0])]
    for li in range(L):
        post = run.acts[HookPoint("resid_post", li)]
        logits, kv = write_resid_suffix(model, run, post, li, T - 1, states[:, li], keep_kv=True)
        assert kv is not None
        for q, t in enumerate(to_text(model, decode_from(model, logits, kv, T, cfg.max_new))):
            texts[q][li] = t
    return texts


def _lens(model: Model, last: Tensor, tokens: Sequence[int]) -> Tensor:
    """Logit lens at the last position: ``[Q, L]`` whether the target's first token is top-1."""
    with torch.no_grad():
        top = model.runner.unembed(last).argmax(-1)  # [Q, L]
    return top == torch.tensor(list(tokens), device=top.device)[:, None]


def bridge_readout(model: Model, queries: Sequence[TwoHopQuery], config: BridgeConfig | None = None) -> Scores:
    """Per-layer bridge-decoding rate (values, axis ``layer``) and its companions.

    Returns:
        :class:`~patchtrace.results.Scores` over ``layer``: the fraction of queries whose ``e1`` state
        decodes to the bridge. Extras (``[Q, L]``, 0/1): ``bridge_hits``; ``answer_hits`` (the last
        position's state decodes to the target); ``lens_hits`` (logit-lens top-1 is the target's first
        token); and per query ``answer_layer`` / ``bridge_layer`` (first layer with a hit, −1 if none).

    Raises:
        MultihopError: a query without ``entity`` or ``bridge`` — before compute.
    """
    cfg = config or BridgeConfig()
    if not queries:
        raise MultihopError("no queries for the bridge readout")
    for q in queries:
        if q.entity is None or q.bridge is None:
            raise MultihopError(f"{q.name}: the bridge readout needs 'entity' and 'bridge'")
        entity_last_token(model.tokenizer, q)
    tokens = [first_token(model, q.target, q.name) for q in queries]
    e1s, lasts = zip(*(_states(model, q) for q in queries), strict=True)
    e1, last = torch.stack(e1s), torch.stack(lasts)
    bridge_txt = _readout(model, e1, cfg)
    answer_txt = _readout(model, last, cfg)
    bh = torch.tensor([[matches(t, q.bridge_aliases) for t in row] for q, row in zip(queries, bridge_txt, strict=True)])
    ah = torch.tensor([[matches(t, q.aliases) for t in row] for q, row in zip(queries, answer_txt, strict=True)])
    lh = _lens(model, last, tokens).cpu()

    def first(h: Tensor) -> Tensor:
        idx = torch.arange(h.shape[1]).expand_as(h)
        return torch.where(h.any(1), torch.where(h, idx, h.shape[1]).min(1).values, -1)

    prov = make_provenance(model, f"{len(queries)} two-hop queries", "bridge_readout", cfg)
    prov["queries"] = [q.name for q in queries]
    prov["bridge_texts"] = bridge_txt
    return Scores(bh.float().mean(0), ("layer",), "resid_post", value_name="decode_rate", metric="bridge_decoded",
                  per_example=bh.float(),
                  extras={"bridge_hits": bh.float(), "answer_hits": ah.float(), "lens_hits": lh.float(),
                          "bridge_layer": first(bh), "answer_layer": first(ah), "lens_layer": first(lh)},
                  provenance=prov)


__all__ = ["IDENTITY_PROMPT", "BridgeConfig", "bridge_readout"]
