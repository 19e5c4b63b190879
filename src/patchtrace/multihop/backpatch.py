"""Back-patching (Biran et al. 2024, "Hopping Too Late"): exact grids over (source layer, target layer).

For a prompt ``p`` and a position ``t``, the back-patch ``(j → i)`` writes block ``j``'s output
``h^j_t`` (``resid_post[j]``) into block ``i``'s output at ``t`` and re-runs. With ``j > i`` it hands
an earlier layer a representation that is already further along — if the composition then comes out
right, the layers after ``i`` could do the second hop, they just started it too late. The paper's
statistic: the fraction of originally incorrect queries (both hops known) fixed by at least one
``j > i`` back-patch, an *oracle* upper bound (a max over L² patches).

Why the fast path is exact. The write at block ``i``'s output, position ``t``, changes nothing at
layers ``≤ i`` and, with causal attention, nothing at positions ``< t``. So a patched run is:
layers ``i+1 .. N-1`` over positions ``t .. T-1`` only, starting from the clean residual stream
(with ``h^j_t`` written at ``t``), attending to the clean run's cached keys/values of positions
``< t``. With ``t`` the last token that is *one position through the upper layers* instead of a
full forward of ``T`` positions through all ``N`` layers; the ``L`` source layers of one target layer
form one batch. The runner does this natively (``start_layer``, ``pos_offset``, ``past_kv``).

Generation reuses the same patched prefill: its keys/values are the clean ones at layers ``≤ i``
and at positions ``< t``, and the suffix run's at the rest; greedy decoding continues from there in
large batches with no further patching (:func:`patchtrace.multihop.generate.decode_from`).

The whole ``L × L`` grid is computed (the analysis keeps ``j > i``). Queries are the sweep's blocks
(one block = one query), so a long run checkpoints and resumes via :func:`patchtrace.engine.job.execute`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from patchtrace.engine.cache import RunCache
from patchtrace.engine.checkpoint import run_key
from patchtrace.engine.job import Block, BlockResult, execute
from patchtrace.engine.xprompt import write_resid_suffix
from patchtrace.models.load import Model
from patchtrace.multihop.generate import decode_from, encode, first_token, to_text
from patchtrace.multihop.queries import MultihopError, TwoHopQuery, entity_last_token, matches
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import HookPoint


@dataclass(frozen=True, kw_only=True)
class BackpatchConfig:
    """Options of :func:`backpatch`.

    Attributes:
        position: ``last`` (the prompt's final token) or ``e1`` (the last token of the first-hop entity).
        generate: also greedy-decode each patched prefill and score it by alias match.
        max_new: tokens generated per patch (the paper: 10).
        gen_batch: patched rows decoded together.
        fast: the suffix-only fast path (``False``: a full runner forward per patch, for cross-checks).
        gen_pairs: ``all`` decodes every (j, i) pair; ``upper`` only those with ``j > i`` (the ones the
            fix rate reads: about half the decoding; the others are left at −1 / not successful).
    """

    position: Literal["last", "e1"] = "last"
    generate: bool = True
    max_new: int = 10
    gen_batch: int = 256
    fast: bool = True
    gen_pairs: Literal["all", "upper"] = "all"

    def __post_init__(self) -> None:
        if self.gen_pairs not in ("all", "upper"):
            raise MultihopError(f"gen_pairs must be 'all' or 'upper', not {self.gen_pairs!r}")
        if self.position not in ("last", "e1"):
            raise MultihopError(f"position must be 'last' or 'e1', not {self.position!r}")
        if self.max_new < 1:
            raise MultihopError(f"max_new must be ≥ 1, not {self.max_new}")
        if self.gen_batch < 1:
            raise MultihopError(f"gen_batch must be ≥ 1, not {self.gen_batch}")


def _prepare(model: Model, queries: Sequence[TwoHopQuery], cfg: BackpatchConfig) -> list[tuple[list[int], int, int]]:
    """Per query ``(ids, position, target first token)``; every check happens here, before compute."""
    if not queries:
        raise MultihopError("no queries to back-patch")
    out = []
    for q in queries:
        ids = encode(model, q.prompt, q.name)
        pos = len(ids) - 1 if cfg.position == "last" else entity_last_token(model.tokenizer, q)
        if not 0 <= pos < len(ids):
            raise MultihopError(f"{q.name}: position {pos} is outside the prompt's {len(ids)} tokens")
        out.append((ids, pos, first_token(model, q.target, q.name)))
    return out


def _clean(model: Model, ids: Tensor) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The clean run: every block's output ``[1, T, D]`` and every layer's keys/values."""
    L = model.dims.n_layers
    post: dict[int, Tensor] = {}

    def rec(li: int) -> Callable[[Tensor, Any], None]:
        def fn(x: Tensor, ctx: Any) -> None:
            post[li] = x.detach().clone()

        return fn

    hooks = {HookPoint("resid_post", li): [rec(li)] for li in range(L)}
    with torch.no_grad():
        out = model.runner.forward(ids, hooks=hooks, keep_kv=True, last_only=True)
    assert out.kv is not None
    return [post[li] for li in range(L)], [kv for kv in out.kv if kv is not None]


def _target_layer_rows(
    model: Model, i: int, pos: int, post: list[Tensor], kv: list[tuple[Tensor, Tensor]], keep_kv: bool
) -> tuple[Tensor, list[tuple[Tensor, Tensor]] | None]:
    """All ``L`` back-patches ``(j → i)``, ``j = 0..L-1``: last-position logits ``[L, V]`` and (when
    asked) each row's full keys/values after the patched prefill."""
    src = torch.cat([p[:, pos] for p in post], 0)  # [L, D]: block j's output at pos, one row per j
    run = RunCache({}, kv, torch.empty(0))
    return write_resid_suffix(model, run, post[i], i, pos, src, keep_kv=keep_kv)


def _plain_rows(model: Model, i: int, pos: int, post: list[Tensor], ids: Tensor) -> Tensor:
    """The slow path: a full runner forward per source layer (cross-check of the fast path)."""
    L = model.dims.n_layers
    rows = []
    for j in range(L):
        val = post[j][:, pos].clone()

        def fn(x: Tensor, ctx: Any, val: Tensor = val) -> Tensor:
            x = x.clone()
            x[:, pos - ctx.pos_offset] = val
            return x

        with torch.no_grad():
            out = model.runner.forward(ids, hooks={HookPoint("resid_post", i): [fn]}, last_only=True)
        assert out.logits is not None
        rows.append(out.logits[:, -1])
    return torch.cat(rows, 0)


def query_grid(model: Model, ids_list: list[int], pos: int, target_tok: int, cfg: BackpatchConfig) -> BlockResult:
    """One query's grids: ``logprob`` ``[L, L]`` (source j, target i) and, when generating, ``gen``
    ``[L, L, max_new]`` token ids; ``base_logprob`` and ``base_gen`` are the unpatched run's."""
    L = model.dims.n_layers
    dev = model.device
    ids = torch.tensor([ids_list], device=dev)
    T = ids.shape[1]
    post, kv = _clean(model, ids)
    lp = torch.empty(L, L)
    gens: list[Tensor] = []
    pending: list[tuple[Tensor, list[tuple[Tensor, Tensor]]]] = []

    def flush() -> None:
        if not pending:
            return
        logits = torch.cat([p[0] for p in pending], 0)
        kvs = [(torch.cat([p[1][li][0] for p in pending], 0), torch.cat([p[1][li][1] for p in pending], 0))
               for li in range(L)]
        gens.append(decode_from(model, logits, kvs, T, cfg.max_new).cpu())
        pending.clear()

    for i in range(L):
        if cfg.fast:
            logits, full = _target_layer_rows(model, i, pos, post, kv, cfg.generate)
        else:
            logits, full = _plain_rows(model, i, pos, post, ids), None
            if cfg.generate:
                _, full = _target_layer_rows(model, i, pos, post, kv, True)
        lp[:, i] = torch.log_softmax(logits.float(), -1)[:, target_tok].cpu()
        if cfg.generate:
            assert full is not None
            keep = slice(i + 1, L) if cfg.gen_pairs == "upper" else slice(0, L)
            if keep.start < L:
                pending.append((logits[keep], [(k[keep], v[keep]) for k, v in full]))
            if sum(p[0].shape[0] for p in pending) >= cfg.gen_batch:
                flush()
    flush()
    with torch.no_grad():
        base = model.runner.forward(ids, last_only=True, keep_kv=cfg.generate)
    assert base.logits is not None
    res: BlockResult = {"logprob": lp, "base_logprob": torch.log_softmax(base.logits[0, -1].float(), -1)[target_tok]
                        .reshape(1).cpu()}
    if cfg.generate:
        assert base.kv is not None
        g = torch.cat(gens, 0)  # rows ordered (i, j), j > i only under gen_pairs="upper"
        grid = torch.full((L, L, cfg.max_new), -1, dtype=g.dtype)  # [j, i, n]
        js, is_ = zip(*[(j, i) for i in range(L) for j in range(L) if cfg.gen_pairs == "all" or j > i], strict=True)
        grid[torch.tensor(js), torch.tensor(is_)] = g
        res["gen"] = grid
        res["base_gen"] = decode_from(model, base.logits[:, -1], [x for x in base.kv if x is not None], T,
                                      cfg.max_new).cpu()[0]
    return res


class BackpatchJob:
    """The sweep job: one block per query (see :mod:`patchtrace.engine.job`)."""

    def __init__(self, model: Model, queries: Sequence[TwoHopQuery], cfg: BackpatchConfig) -> None:
        self.model, self.queries, self.cfg = model, list(queries), cfg
        self.prepared = _prepare(model, queries, cfg)

    @property
    def key(self) -> str:
        return run_key({"method": "backpatch", "model": self.model.weights_hash(), "config": asdict(self.cfg),
                        "queries": [q.to_json() for q in self.queries]})

    def blocks(self) -> list[Block]:
        L = self.model.dims.n_layers
        return [Block(k, L * L, q.name) for k, q in enumerate(self.queries)]

    def run_block(self, block: Block, on_progress: Callable[[int], None] | None = None) -> BlockResult:
        ids, pos, tok = self.prepared[block.index]
        return query_grid(self.model, ids, pos, tok, self.cfg)

    def merge(self, results: Sequence[BlockResult]) -> Scores:
        return _scores(self.model, self.queries, self.cfg, results)


def _scores(model: Model, queries: list[TwoHopQuery], cfg: BackpatchConfig, results: Sequence[BlockResult]) -> Scores:
    lp = torch.stack([r["logprob"] for r in results])  # [Q, L, L]
    base = torch.cat([r["base_logprob"] for r in results])
    extras = {"base_logprob": base}
    if cfg.generate:
        succ = torch.zeros(lp.shape, dtype=torch.bool)
        base_ok = torch.zeros(len(queries), dtype=torch.bool)
        for k, (q, r) in enumerate(zip(queries, results, strict=True)):
            L = r["gen"].shape[0]
            flat = r["gen"].reshape(L * L, -1)
            texts = to_text(model, flat.clamp(min=0))
            hit = [matches(t, q.aliases) and bool(row[0] >= 0) for t, row in zip(texts, flat, strict=True)]
            succ[k] = torch.tensor(hit).view(L, L)
            base_ok[k] = matches(to_text(model, r["base_gen"][None])[0], q.aliases)
        extras.update(success=succ.float(), base_correct=base_ok.float(),
                      gen=torch.stack([r["gen"] for r in results]))
    prov = make_provenance(model, f"{len(queries)} two-hop queries", "backpatch", cfg)
    prov["queries"] = [q.name for q in queries]
    prov["relations"] = [q.relation for q in queries]
    prov["both_hops"] = [q.both_hops_ok for q in queries]
    return Scores(lp.mean(0), ("source_layer", "target_layer"), "resid_post", value_name="logprob",
                  metric="target_first_token_logprob", baselines={"clean": float(base.mean())},
                  per_example=lp, extras=extras, provenance=prov)


def backpatch(
    model: Model,
    queries: Sequence[TwoHopQuery],
    config: BackpatchConfig | None = None,
    *,
    out_dir: str | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> Scores:
    """The back-patching grid of every query.

    Returns:
        :class:`~patchtrace.results.Scores` with axes ``(source_layer, target_layer)``: ``values`` the
        mean log p(target's first token), ``per_example`` ``[Q, L, L]``; extras ``base_logprob``
        ``[Q]`` and, when generating, ``success`` ``[Q, L, L]`` (alias found in the generation),
        ``base_correct`` ``[Q]`` and ``gen`` (the generated ids).

    Raises:
        MultihopError: no queries, an empty target, an ``e1`` position without an entity — before compute.
    """
    cfg = config or BackpatchConfig()
    job = BackpatchJob(model, queries, cfg)
    return execute(job, out_dir=out_dir, overwrite=overwrite, on_progress=on_progress)


def fix_rate(scores: Scores, only_both_hops: bool = True) -> dict[str, dict[str, float]]:
    """The oracle statistic: of the queries the model gets wrong (and knows both hops of, by default),
    the fraction that at least one ``j > i`` back-patch fixes — overall and per relation.

    Returns:
        ``{relation or "all": {"incorrect": n, "fixed": k, "rate": k / n}}``.

    Raises:
        MultihopError: scores made without generation.
    """
    if "success" not in scores.extras:
        raise MultihopError("the fix rate needs generations (back-patching was run with generate=False)")
    succ = scores.extras["success"].bool()
    L = succ.shape[1]
    upper = torch.tril(torch.ones(L, L, dtype=torch.bool), -1)  # [j, i] with j > i
    fixed = (succ & upper).flatten(1).any(1)
    wrong = ~scores.extras["base_correct"].bool()
    both = scores.provenance.get("both_hops") or [True] * len(wrong)
    rels = scores.provenance.get("relations") or ["unknown"] * len(wrong)
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for k in range(len(wrong)):
        if wrong[k] and (both[k] or not only_both_hops):
            for key in ("all", rels[k]):
                table[key][0] += 1
                table[key][1] += int(fixed[k])
    return {r: {"incorrect": n, "fixed": f, "rate": f / n if n else float("nan")} for r, (n, f) in table.items()}


__all__ = ["BackpatchConfig", "BackpatchJob", "backpatch", "fix_rate", "query_grid"]
