"""Exact evaluation of site sets, and the exact-patching ranking DBM is compared with.

Evaluation. A learned mask is binarized; its kept components form one multi-site
:class:`~patchtrace.engine.sweep.Patch` that the sweep engine runs exactly (base = the original
prompts, source = the alternates). A tuple is satisfied when the patched last-position argmax is its
target, i.e. when the *target margin* ``logit[target] − max_{v≠target} logit[v]`` is positive
(:class:`TargetMarginScorer`). Held-out desiderata accuracy = fraction of satisfied tuples, averaged
over desiderata (per-desideratum accuracies are kept too).

Baseline. :func:`exact_patching_ranking` scores every component alone by exact activation patching
(noising: original = base, alternate = source) on the *training* tuples with the metric
``logit(target) − logit(contrast)``; a component's score is the sum over desiderata of its mean
effect (positive = moves a value desideratum to its target; negative = breaks an invariance). The
``k`` best form one patch, evaluated like the mask at equal ``k``.

All unpatched runs come from one :class:`~patchtrace.methods.dbm.cache.RunStore`, so evaluating the
same tuples twice, or ranking and then evaluating them, runs each base and source prompt once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from patchtrace.desiderata import TokenizedDesideratum
from patchtrace.engine.checkpoint import run_key
from patchtrace.engine.job import Block, execute
from patchtrace.engine.sweep import Patch, Scorer, resolve, run_patches
from patchtrace.methods.dbm.cache import RunStore
from patchtrace.methods.dbm.components import components
from patchtrace.metrics import Metric
from patchtrace.models.load import Model
from patchtrace.sites import Site, SiteSpec


def target_margin(logits: Tensor, target: Tensor) -> Tensor:
    """``[N]`` margin of the target over the best other token, from ``[N, V]`` logits."""
    tl = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.scatter(1, target[:, None], float("-inf")).max(-1).values
    return tl - other


class TargetMarginScorer(Scorer):
    """Scores a patched run by ``logit[target] − max_{v ≠ target} logit[v]`` (> 0 ⇔ target is the argmax)."""

    def __init__(self, target: Tensor) -> None:
        t = target.view(-1, 1)
        super().__init__(Metric("prob"), t, t)  # "prob" reads the full vocabulary: no column restriction
        self.target = target.view(-1)

    def __call__(self, logits: Tensor, n_patches: int, cols_used: bool) -> Tensor:
        return target_margin(logits.float(), self.target.repeat(n_patches)).view(n_patches, -1)


def site_set_margins(
    model: Model,
    td: TokenizedDesideratum,
    site_sets: Sequence[Sequence[Site]],
    *,
    max_memory: int | None = None,
    runs: RunStore | None = None,
) -> Tensor:
    """Exact target margins of patching each site set as one multi-site patch.

    The base run is the original prompt, the source run the alternate
    (:func:`~patchtrace.engine.sweep.run_patches`, one :class:`~patchtrace.engine.sweep.Patch` per
    set, all sites of a set together). An empty set is the unpatched original run.

    Args:
        model: the model.
        td: one tokenized desideratum.
        site_sets: the sets to evaluate.
        max_memory: working-memory budget of the sweep (bytes).
        runs: the run cache (a fresh one when None).

    Returns:
        ``[S, N]`` margins ``logit[target] − max_{v≠target} logit[v]`` at the last position
        (> 0 ⇔ the patched run predicts the target).
    """
    out = torch.empty(len(site_sets), len(td))
    points = {s.point for ss in site_sets for s in ss}
    store = runs if runs is not None else RunStore(points)
    nonempty = [i for i, ss in enumerate(site_sets) if ss]
    empty = [i for i, ss in enumerate(site_sets) if not ss]
    for idx in td.groups():
        ids_o = td.ids("original", idx).to(model.device)
        T = ids_o.shape[1]
        base, source = store.get(model, td, "original", idx, points), store.get(model, td, "alternate", idx, points)
        target = td.target[idx].to(model.device)
        margins = torch.empty(len(site_sets), len(idx))
        if nonempty:
            patches = [Patch(tuple(resolve(s, model, T) for s in site_sets[i])) for i in nonempty]
            margins[nonempty] = run_patches(
                model, ids_o, base, source, patches, TargetMarginScorer(target), max_memory=max_memory
            ).cpu()
        if empty:
            margins[empty] = target_margin(base.logits, target).cpu()[None]
        out[:, idx] = margins
    return out


def evaluate_site_sets(
    model: Model,
    tds: Sequence[TokenizedDesideratum],
    site_sets: Sequence[Sequence[Site]],
    *,
    max_memory: int | None = None,
    runs: RunStore | None = None,
) -> Tensor:
    """Exact desiderata accuracy of each site set: ``[S, D]`` (S site sets, D desiderata).

    A tuple counts as correct when the patched last-position argmax is its target
    (:func:`site_set_margins` > 0). Pass ``runs`` to share unpatched runs with other calls; without
    it, one store is still shared by all desiderata of this call.
    """
    store = runs if runs is not None else RunStore({s.point for ss in site_sets for s in ss})
    acc = torch.zeros(len(site_sets), len(tds))
    for di, td in enumerate(tds):
        acc[:, di] = (site_set_margins(model, td, site_sets, max_memory=max_memory, runs=store) > 0).float().mean(1)
    return acc


def contrasts(model: Model, td: TokenizedDesideratum, runs: RunStore) -> Tensor:
    """``[N]`` contrast tokens: the given ones, else the original run's top token, or the alternate's
    when that is the target, or the original's runner-up (read off the cached unpatched runs)."""
    out = td.contrast.clone()
    for idx in td.groups():
        need = [j for j, i in enumerate(idx) if out[i] < 0]
        if not need:
            continue
        lo = runs.get(model, td, "original", idx).logits
        la = runs.get(model, td, "alternate", idx).logits
        for j in need:
            i = idx[j]
            top2 = lo[j].topk(2).indices.tolist()
            a = int(la[j].argmax())
            t = int(td.target[i])
            out[i] = top2[0] if top2[0] != t else a if a != t else top2[1]
    return out


def _data_key(tds: Sequence[TokenizedDesideratum]) -> list[dict[str, object]]:
    return [{"name": td.name, "original": td.original, "alternate": td.alternate, "target": td.target.tolist(),
             "contrast": td.contrast.tolist()} for td in tds]


class RankingJob:
    """The exact-patching ranking as an engine sweep job: one block per (desideratum, length group),
    each running one noising patch per component, so a long ranking checkpoints and resumes."""

    def __init__(self, model: Model, tds: Sequence[TokenizedDesideratum], specs: Sequence[SiteSpec],
                 max_memory: int | None, runs: RunStore | None) -> None:
        self.model, self.tds, self.max_memory = model, list(tds), max_memory
        self.comps = components(model, specs)
        self.store = runs if runs is not None else RunStore({c.point for c in self.comps})
        self.key = run_key({"model": model.weights_hash(), "data": _data_key(tds), "specs": [str(s) for s in specs],
                            "m": "dbm_ranking"})
        self._where = [(di, idx) for di, td in enumerate(self.tds) for idx in td.groups()]
        self._blocks = [Block(i, len(self.comps), f"{self.tds[di].name}, {len(idx)} tuples")
                        for i, (di, idx) in enumerate(self._where)]
        self._contrast: dict[int, Tensor] = {}

    def blocks(self) -> list[Block]:
        return self._blocks

    def run_block(self, block: Block, on_progress: Callable[[int], None] | None = None) -> dict[str, Tensor]:
        model, (di, idx) = self.model, self._where[block.index]
        td = self.tds[di]
        if di not in self._contrast:
            self._contrast[di] = contrasts(model, td, self.store)
        contrast = self._contrast[di]
        points = {c.point for c in self.comps}
        ids_o = td.ids("original", idx).to(model.device)
        T = ids_o.shape[1]
        base = self.store.get(model, td, "original", idx, points)
        source = self.store.get(model, td, "alternate", idx, points)
        scorer = Scorer(Metric("logit_diff"), td.target[idx, None].to(model.device), contrast[idx, None].to(model.device))
        patched = run_patches(
            model, ids_o, base, source, [Patch((resolve(c, model, T),)) for c in self.comps], scorer,
            max_memory=self.max_memory, on_chunk=on_progress,
        ).cpu()
        return {"patched": patched, "base": scorer(base.logits, 1, False)[0].cpu()}

    def merge(self, results: Sequence[dict[str, Tensor]]) -> list[tuple[Site, float]]:
        total = torch.zeros(len(self.comps))
        for (di, _), r in zip(self._where, results, strict=True):
            total += (r["patched"] - r["base"][None]).sum(1) / len(self.tds[di])
        order = torch.argsort(total, descending=True, stable=True).tolist()
        return [(self.comps[i], float(total[i])) for i in order]


def exact_patching_ranking(
    model: Model,
    tds: Sequence[TokenizedDesideratum],
    specs: Sequence[SiteSpec],
    *,
    max_memory: int | None = None,
    runs: RunStore | None = None,
    out_dir: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[tuple[Site, float]]:
    """Rank components by exact single-site activation patching on the given tuples.

    Each desideratum runs as a noising sweep on the sweep engine (the same computation as
    :func:`patchtrace.methods.activation_patching.run` with ``direction="noise"``: base = original,
    source = alternate), one patch per component, with ``logit_diff`` of target vs contrast
    (:func:`contrasts` fills missing contrast tokens). A component's score is the sum over
    desiderata of its mean effect ``M(patched) − M(original)``. It runs as a :class:`RankingJob`:
    with ``out_dir``, finished blocks are checkpointed there and a rerun resumes; ``on_progress(done,
    total)`` counts its patches (:mod:`patchtrace.progress`).

    Returns:
        ``(site, score)`` for every component, best first.
    """
    job = RankingJob(model, tds, specs, max_memory, runs)
    return execute(job, out_dir=out_dir, save=lambda result, path: None, on_progress=on_progress)
