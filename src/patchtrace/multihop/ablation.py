"""Ablations as first-class interventions: zero, mean or resample any site grid, one cell or one group at a time.

An ablation removes what a component contributes and measures what the model loses. Three ways to
"remove", each an :class:`~patchtrace.interventions.Intervention` the engine applies:

* **zero** — the activation becomes 0 (simple, but 0 may be far off the activations' distribution);
* **mean** — it becomes its mean over a reference set (the task's own prompts by default), per
  position: keeps the typical value, removes what is specific to the example;
* **resample** — it becomes the value of *another* example of the batch (a seeded permutation without
  fixed points): the model sees a real activation, just the wrong one.

Cells are ablated one at a time (a :class:`~patchtrace.sites.SiteSpec` grid: every head, every layer's
MLP ...) or as named groups (lists of sites ablated together — a "recall circuit"). The metric per
example is log p(target's first token) at the last position; accuracy is its first-token argmax.

Mean and resample need a reference of the *same token length* when the sites span all positions
(position ``t`` of the reference stands in for position ``t`` of the example); prompts are grouped
by length and each group is ablated against its own reference.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from patchtrace.engine.apply import base_interventions_hooks, select
from patchtrace.engine.cache import RunCache, collect
from patchtrace.engine.xprompt import check_site
from patchtrace.grid import Grid, declare_axis
from patchtrace.interventions import Intervention, Mean, Resample, SourceRef, Zero
from patchtrace.kinds import needs_explicit_attention
from patchtrace.models.load import Model
from patchtrace.multihop.generate import decode_from, encode, first_token, to_text
from patchtrace.multihop.queries import MultihopError, matches, usable_aliases
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import Site, SiteSpec


@dataclass(frozen=True, kw_only=True)
class AblationConfig:
    """Options of :func:`ablate`.

    Attributes:
        mode: ``zero``, ``mean`` or ``resample``.
        seed: the resample permutation's seed.
        max_new: also greedy-decode this many tokens with the ablation in force at every step and
            score the text by alias match (0: off). Zero ablation of sites without a position only
            (a mean or a resampled value does not exist for generated positions).
    """

    mode: Literal["zero", "mean", "resample"] = "zero"
    seed: int = 0
    max_new: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("zero", "mean", "resample"):
            raise MultihopError(f"ablation mode must be zero, mean or resample, not {self.mode!r}")
        if self.max_new < 0 or (self.max_new > 0 and self.mode != "zero"):
            raise MultihopError(f"generation (max_new={self.max_new}) needs max_new ≥ 0 and zero ablation")


def _derangement(n: int, seed: int) -> tuple[int, ...]:
    """A seeded permutation of ``range(n)`` with no fixed point (a shuffled cycle)."""
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    order = [0] * n
    for a, b in zip(perm, perm[1:] + perm[:1], strict=True):
        order[a] = b
    return tuple(order)


def _cells(model: Model, sites: SiteSpec | Sequence[Sequence[Site]] | Mapping[str, Sequence[Site]]) -> tuple[list[list[Site]], Grid]:
    if isinstance(sites, SiteSpec):
        if sites.positions == "all":
            raise MultihopError("ablation grids take positions 'last', a list, or None (all at once), not 'all'")
        grid = Grid.from_spec(sites, model.dims)
        return [[s] for s in grid.sites()], grid
    declare_axis("group", "G", None, "a group of sites ablated together")
    groups = list(sites.values()) if isinstance(sites, Mapping) else [list(g) for g in sites]
    if not groups or any(len(g) == 0 for g in groups):
        raise MultihopError("every ablation group needs at least one site")
    return [list(g) for g in groups], Grid("group", ("group",), (tuple(range(len(groups))),))


def _by_length(model: Model, prompts: Sequence[str], what: str) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(encode(model, p, f"{what} {i}"))].append(i)
    return groups


def ablate(
    model: Model,
    prompts: Sequence[str],
    targets: Sequence[str],
    sites: SiteSpec | Sequence[Sequence[Site]] | Mapping[str, Sequence[Site]],
    config: AblationConfig | None = None,
    *,
    reference: Sequence[str] | None = None,
    aliases: Sequence[Sequence[str]] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Scores:
    """Ablate each cell (or group) and measure the change of log p(target) and the accuracy.

    Returns:
        :class:`~patchtrace.results.Scores` on the cells' grid (``group`` axis for groups):
        ``values`` the mean change of log p(target's first token) (ablated − clean), ``per_example``
        ``[N, *grid]``; extras ``accuracy`` (first-token argmax, per cell), ``correct`` ``[N, *grid]``,
        ``clean_logprob`` and ``clean_correct`` ``[N]``; baselines ``clean`` (mean log-prob) and
        ``clean_accuracy``. With ``max_new``: ``gen_accuracy`` per cell, ``gen_correct`` ``[N, *grid]``,
        ``clean_gen_correct`` ``[N]`` and baseline ``clean_gen_accuracy`` (target or ``aliases[i]`` found
        in the generated text, aliases of ≤ 1 character dropped).

    Raises:
        MultihopError: empty or mismatched prompts/targets, an empty target, a site outside the
            model or the prompts, a reference of another token length (mean/resample over all
            positions), a length group too small to resample — all before compute.
    """
    cfg = config or AblationConfig()
    if not prompts or len(prompts) != len(targets):
        raise MultihopError(f"ablation needs prompts and as many targets ({len(prompts)} prompts, {len(targets)} targets)")
    for i, target in enumerate(targets):
        if not target.strip():
            raise MultihopError(f"example {i}: target is empty")
    cells, grid = _cells(model, sites)
    if cfg.max_new > 0:
        timed = [str(s) for c in cells for s in c if s.pos is not None]
        if timed:
            raise MultihopError(f"site {timed[0]}: generation needs sites without a position (ablated at every step)")
    if aliases is not None and len(aliases) != len(targets):
        raise MultihopError(f"{len(aliases)} alias lists for {len(targets)} targets")
    al = [usable_aliases((t, *(aliases[i] if aliases else ()))) for i, t in enumerate(targets)]
    tok = [first_token(model, t, f"target {i}") for i, t in enumerate(targets)]
    groups = _by_length(model, prompts, "prompt")
    refs = _by_length(model, reference, "reference prompt") if reference is not None else None
    for T, idx in groups.items():
        for cell in cells:
            for s in cell:
                check_site(model, s, T, f"prompt {idx[0]}: site")
        if cfg.mode != "zero" and refs is not None and T not in refs and any(s.pos is None for c in cells for s in c):
            k = next(iter(refs.values()))[0]
            raise MultihopError(f"reference prompt {k}: its token length differs from prompt {idx[0]}'s ({T}); "
                                "mean/resample over all positions needs a reference of the same length")
        if cfg.mode == "resample" and refs is None and len(idx) < 2:
            raise MultihopError(f"prompt {idx[0]}: resampling needs ≥ 2 prompts of its token length ({T})")
    N, C = len(prompts), len(cells)
    lp = torch.zeros(N, C)
    ok = torch.zeros(N, C, dtype=torch.bool)
    clean_lp, clean_ok = torch.zeros(N), torch.zeros(N, dtype=torch.bool)
    gen_ok = torch.zeros(N, C, dtype=torch.bool)
    clean_gen = torch.zeros(N, dtype=torch.bool)
    points = sorted({s.point for c in cells for s in c}, key=str)
    explicit = needs_explicit_attention(p.kind for p in points)
    done = 0
    for T, idx in groups.items():
        ids = torch.tensor([encode(model, prompts[i]) for i in idx], device=model.device)
        t: Tensor = torch.tensor([tok[i] for i in idx], device=model.device)
        ref_run = None
        if cfg.mode != "zero":
            ref_ids = ids if refs is None else torch.tensor(
                [encode(model, reference[i]) for i in refs.get(T, next(iter(refs.values())))],  # type: ignore[index]
                device=model.device)
            ref_run = collect(model, ref_ids, points)
        base = _run_cell(model, ids, [], cfg, None, explicit)
        clean_lp[idx] = torch.log_softmax(base[0].float(), -1).gather(1, t[:, None])[:, 0].cpu()
        clean_ok[idx] = (base[0].argmax(-1) == t).cpu()
        if cfg.max_new > 0:
            clean_gen[idx] = _hits(model, base[1], [al[i] for i in idx])
        for c, cell in enumerate(cells):
            logits, gen = _run_cell(model, ids, cell, cfg, ref_run, explicit)
            if gen is not None:
                gen_ok[idx, c] = _hits(model, gen, [al[i] for i in idx])
            lp[idx, c] = torch.log_softmax(logits.float(), -1).gather(1, t[:, None])[:, 0].cpu()
            ok[idx, c] = (logits.argmax(-1) == t).cpu()
            done += len(idx)
            if on_progress is not None:
                on_progress(done, N * C)
    shape = grid.shape
    eff = (lp - clean_lp[:, None]).view(N, *shape)
    prov = make_provenance(model, f"{N} prompts", "ablate", cfg)
    prov["cells"] = [[str(s) for s in c] for c in cells]
    labels = grid.labels()
    return Scores(eff.mean(0), grid.axes, grid.kind, value_name="effect", metric="logprob",
                  baselines={"clean": float(clean_lp.mean()), "clean_accuracy": float(clean_ok.float().mean()),
                             **({"clean_gen_accuracy": float(clean_gen.float().mean())} if cfg.max_new > 0 else {})},
                  labels=labels, per_example=eff,
                  extras={"accuracy": ok.float().mean(0).view(shape), "correct": ok.float().view(N, *shape),
                          "clean_logprob": clean_lp, "clean_correct": clean_ok.float(),
                          **({"gen_accuracy": gen_ok.float().mean(0).view(shape), "gen_correct": gen_ok.float().view(N, *shape),
                              "clean_gen_correct": clean_gen.float()} if cfg.max_new > 0 else {})},
                  provenance=prov)


def _hits(model: Model, gen: Tensor | None, aliases: Sequence[Sequence[str]]) -> Tensor:
    assert gen is not None
    return torch.tensor([matches(txt, a) for txt, a in zip(to_text(model, gen), aliases, strict=True)])


def _run_cell(model: Model, ids: Tensor, cell: Sequence[Site], cfg: AblationConfig, ref: RunCache | None,
              explicit: bool) -> tuple[Tensor, Tensor | None]:
    """Last-position logits of ``ids`` with every site of ``cell`` ablated, and (with ``max_new``) the
    greedy generation with the ablation in force at every step."""
    n = ids.shape[0]
    ivs: list[Intervention] = []
    for s in cell:
        if cfg.mode == "zero":
            ivs.append(Intervention(s, Zero()))
        elif cfg.mode == "mean":
            assert ref is not None
            ivs.append(Intervention(s, Mean(select(ref.acts[s.point], s).mean(0))))
        else:
            assert ref is not None
            m = ref.acts[s.point].shape[0]
            order = _derangement(m, cfg.seed) if m == n else tuple(random.Random(cfg.seed + i).randrange(m) for i in range(n))
            ivs.append(Intervention(s, Resample(order), SourceRef("source")))
    runs = {"source": ref} if ref is not None else {}
    hooks = base_interventions_hooks(ivs, runs, n)
    gen = cfg.max_new > 0
    with torch.no_grad():
        out = model.runner.forward(ids, hooks=hooks, last_only=True, explicit_attention=explicit, keep_kv=gen)
    assert out.logits is not None
    if not gen:
        return out.logits[:, -1], None
    assert out.kv is not None
    kv = [x for x in out.kv if x is not None]
    return out.logits[:, -1], decode_from(model, out.logits[:, -1], kv, ids.shape[1], cfg.max_new, hooks=hooks)


__all__ = ["AblationConfig", "ablate"]
