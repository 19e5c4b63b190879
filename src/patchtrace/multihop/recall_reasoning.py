"""Recall vs reasoning (Fartale et al. 2025): which components specialize, and does ablating them show it?

Matched item sets over the *same facts* (the countries of the two-hop queries):

* **recall** — one fact, asked directly: "The capital of France is" → Paris, "France is on the
  continent of" → Europe;
* **reasoning** — the same facts composed: the two-hop prompts ("The capital of the country where
  Lyon is located is"), and an in-context chain ("If Paris is the capital of France and France is in
  Europe, then Paris is in" → Europe), where the facts are given and must be combined.

Per component, a feature is recorded at the last position of every item: a layer's hidden-state norm
(``resid_post``), a head's attention entropy and concentration (its largest attention weight), an MLP
neuron's activation. Each feature is compared between the sets with a Mann-Whitney U test,
Benjamini-Hochberg correction over the components of a level, and Cohen's d (recall − reasoning,
pooled standard deviation); a component is *specialized* when it passes the level's thresholds
(methods.md §10: layers α = 0.01 and |d| > 0.8; heads α = 1e-4 and |d| > 1.0; neurons p < 0.001 and
|d| > 0.5) and keeps the sign of d in each of 5 folds of the items, labelled recall when d > 0 and
reasoning when d < 0.

Statistics are correlational, so the causal test follows: zero the recall-specialized heads (their
slice before ``o_proj``), then the reasoning-specialized ones, and measure first-token accuracy on
both item sets; *selectivity* = drop on the group's own set − drop on the other. Random head groups of
the same size are the control (the paper: up to 15% drop on the targeted ability, the other intact).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchtrace.models.load import Model
from patchtrace.multihop.ablation import ablate
from patchtrace.multihop.generate import encode
from patchtrace.multihop.queries import MultihopError, TwoHopQuery
from patchtrace.sites import HookPoint, Site

#: level → (alpha on the BH-adjusted p-value, |d| threshold), methods.md §10.
THRESHOLDS = {"layer": (0.01, 0.8), "head": (1e-4, 1.0), "neuron": (1e-3, 0.5)}


@dataclass(frozen=True, kw_only=True)
class RRConfig:
    """Options of :func:`recall_reasoning`.

    Attributes:
        n_random: random head groups per specialized group size (the control).
        seed: seed of the random groups.
        max_items: cap per item set (the first ones, in a fixed order).
        max_group: cap on a specialized group's size (the heads with the largest |d|).
        folds: k-fold sign consistency required of a specialized component (0 or 1: off).
    """

    n_random: int = 5
    seed: int = 0
    max_items: int = 60
    max_group: int = 20
    folds: int = 5

    def __post_init__(self) -> None:
        if self.n_random < 0 or self.max_items < 4 or self.max_group < 1 or self.folds < 0:
            raise MultihopError("n_random must be ≥ 0, max_items ≥ 4, max_group ≥ 1 and folds ≥ 0")


def items(queries: Sequence[TwoHopQuery], max_items: int = 60) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Matched ``(prompt, target)`` recall and reasoning items from the queries' facts."""
    facts: dict[str, dict[str, str]] = defaultdict(dict)
    comps: list[tuple[str, str]] = []
    for q in queries:
        if q.bridge is None:
            continue
        facts[q.bridge][q.relation] = q.target
        if q.relation in ("capital", "continent"):
            comps.append((q.prompt, q.target))
    recall, chain = [], []
    for country, f in facts.items():
        if "capital" in f:
            recall.append((f"The capital of {country} is", f["capital"]))
        if "continent" in f:
            recall.append((f"{country} is on the continent of", f["continent"]))
        if "capital" in f and "continent" in f:
            chain.append((f"If {f['capital']} is the capital of {country} and {country} is in {f['continent']}, "
                          f"then {f['capital']} is in", f["continent"]))
    reasoning = [x for pair in zip(comps, chain, strict=False) for x in pair] + comps[len(chain):] + chain[len(comps):]
    return recall[:max_items], reasoning[:max_items]


def features(model: Model, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Per prompt, at the last position: ``layer`` ``[N, L]`` hidden-state norms, ``head_entropy`` and
    ``head_concentration`` ``[N, L·H]``, ``neuron`` ``[N, L·M]`` activations."""
    L = model.dims.n_layers
    by_len: dict[int, list[int]] = defaultdict(list)
    ids = [encode(model, p, f"item {i}") for i, p in enumerate(prompts)]
    for i, t in enumerate(ids):
        by_len[len(t)].append(i)
    out: dict[str, list[Tensor | None]] = {k: [None] * len(prompts) for k in ("layer", "head_entropy", "head_concentration", "neuron")}
    for _, idx in by_len.items():
        rec: dict[HookPoint, Tensor] = {}

        def keep(hp: HookPoint, rec: dict[HookPoint, Tensor] = rec) -> Any:
            def fn(x: Tensor, ctx: Any) -> None:
                rec[hp] = (x[:, :, -1] if hp.kind == "pattern" else x[:, -1]).detach().float()

            return fn

        hooks = {HookPoint(k, li): [keep(HookPoint(k, li))] for li in range(L) for k in ("resid_post", "pattern", "neuron")}
        with torch.no_grad():
            model.runner.forward(torch.tensor([ids[i] for i in idx], device=model.device), hooks=hooks, last_only=True,
                                 explicit_attention=True)
        pat = torch.stack([rec[HookPoint("pattern", li)] for li in range(L)], 1)  # [n, L, H, T]
        ent = -(pat.clamp_min(1e-12).log() * pat).sum(-1)
        layer = torch.stack([rec[HookPoint("resid_post", li)].norm(dim=-1) for li in range(L)], 1)
        neuron = torch.cat([rec[HookPoint("neuron", li)] for li in range(L)], 1)
        for r, i in enumerate(idx):
            out["layer"][i] = layer[r].cpu()
            out["head_entropy"][i] = ent[r].flatten().cpu()
            out["head_concentration"][i] = pat[r].amax(-1).flatten().cpu()
            out["neuron"][i] = neuron[r].cpu()
    return {k: torch.stack(v) for k, v in out.items()}  # type: ignore[arg-type]


def _cohen_d(a: Tensor, b: Tensor) -> Tensor:
    na, nb = a.shape[0], b.shape[0]
    pooled = (((na - 1) * a.double().var(0) + (nb - 1) * b.double().var(0)) / (na + nb - 2)).sqrt()
    return (a.double().mean(0) - b.double().mean(0)) / pooled.clamp_min(1e-12)


def fold_consistent(a: Tensor, b: Tensor, d: Tensor, folds: int) -> Tensor:
    """Whether Cohen's d keeps the sign of ``d`` in each of ``folds`` interleaved folds of both sets
    (item ``k`` of a set is in fold ``k mod folds``): a difference carried by a few items fails."""
    ok = torch.ones_like(d, dtype=torch.bool)
    for f in range(folds):
        fa, fb = a[f::folds], b[f::folds]
        if fa.shape[0] < 2 or fb.shape[0] < 2:
            raise MultihopError(f"{folds}-fold consistency needs ≥ {2 * folds} items per set")
        ok &= _cohen_d(fa, fb).sign() == d.sign()
    return ok


def specialization(a: Tensor, b: Tensor, alpha: float, d_min: float, folds: int = 0) -> dict[str, Tensor]:
    """Mann-Whitney U per column of ``a`` ``[Na, C]`` vs ``b`` ``[Nb, C]``, BH-adjusted p, Cohen's d
    (a − b), and the label: +1 (specialized for ``a``), −1 (for ``b``), 0. With ``folds`` > 1 a
    specialized column must also keep its sign of d in every fold (:func:`fold_consistent`)."""
    from scipy.stats import false_discovery_control, mannwhitneyu

    an, bn = a.double().numpy(), b.double().numpy()
    const = (a.std(0) == 0) & (b.std(0) == 0)
    p = torch.ones(a.shape[1], dtype=torch.float64)
    live = (~const).nonzero().flatten()
    if len(live):
        p[live] = torch.from_numpy(mannwhitneyu(an[:, live.numpy()], bn[:, live.numpy()], axis=0).pvalue).double()
    p = p.nan_to_num(1.0)
    q = torch.from_numpy(false_discovery_control(p.numpy(), method="bh"))
    d = _cohen_d(a, b)
    d = torch.where(const, torch.zeros_like(d), d)
    passed = (q < alpha) & (d.abs() > d_min)
    if folds > 1:
        passed &= fold_consistent(a, b, d, folds)
    label = torch.where(passed, d.sign(), torch.zeros_like(d)).to(torch.int8)
    return {"p": p, "q": q, "d": d, "label": label}


@dataclass
class RRResult:
    """Statistics per level and the ablation table (see :meth:`summary`)."""

    stats: dict[str, dict[str, Tensor]]
    ablation: dict[str, dict[str, float]]
    groups: dict[str, list[str]]
    n_items: dict[str, int]
    clean: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Specialized components per level: ``recall``, ``reasoning``, ``total`` tested."""
        return {k: {"recall": int((s["label"] > 0).sum()), "reasoning": int((s["label"] < 0).sum()),
                    "total": int(s["label"].numel())} for k, s in self.stats.items()}

    def summary(self) -> dict[str, Any]:
        return {"counts": self.counts(), "ablation": self.ablation, "groups": self.groups, "n_items": self.n_items,
                "clean_accuracy": self.clean}


def recall_reasoning(model: Model, queries: Sequence[TwoHopQuery], config: RRConfig | None = None) -> RRResult:
    """Specialization statistics per level, then the head-ablation test with random controls.

    Raises:
        MultihopError: fewer than 4 items in either set (before compute).
    """
    cfg = config or RRConfig()
    rec_items, rea_items = items(queries, cfg.max_items)
    need = max(4, 2 * cfg.folds)
    if len(rec_items) < need or len(rea_items) < need:
        raise MultihopError(f"recall vs reasoning needs ≥ {need} items per set (got {len(rec_items)} recall, "
                            f"{len(rea_items)} reasoning); give queries with bridges and capital/continent relations")
    fa = features(model, [p for p, _ in rec_items])
    fb = features(model, [p for p, _ in rea_items])
    stats = {
        "layer": specialization(fa["layer"], fb["layer"], *THRESHOLDS["layer"], cfg.folds),
        "head": specialization(fa["head_concentration"], fb["head_concentration"], *THRESHOLDS["head"], cfg.folds),
        "head_entropy": specialization(fa["head_entropy"], fb["head_entropy"], *THRESHOLDS["head"], cfg.folds),
        "neuron": specialization(fa["neuron"], fb["neuron"], *THRESHOLDS["neuron"], cfg.folds),
    }
    H = model.dims.n_heads
    head = stats["head"]
    labelled = {"recall": 1, "reasoning": -1}
    groups: dict[str, list[Site]] = {}
    for name, sign in labelled.items():
        cand = ((head["label"] == sign) | (stats["head_entropy"]["label"] == -sign)).nonzero().flatten().tolist()
        cand.sort(key=lambda c: -float(head["d"][c].abs()))
        if cand:
            groups[name] = [Site("head", c // H, unit=c % H) for c in cand[: cfg.max_group]]
    rng = random.Random(cfg.seed)
    n_heads = model.dims.n_layers * H
    for name in list(groups):
        for r in range(cfg.n_random):
            groups[f"random{len(groups[name])}_{name}_{r}"] = [
                Site("head", c // H, unit=c % H) for c in rng.sample(range(n_heads), len(groups[name]))]
    table: dict[str, dict[str, float]] = {}
    clean: dict[str, float] = {}
    if groups:
        for set_name, its in (("recall", rec_items), ("reasoning", rea_items)):
            s = ablate(model, [p for p, _ in its], [t for _, t in its], groups)
            clean[set_name] = s.baselines["clean_accuracy"]
            for g, acc in zip(groups, s.extras["accuracy"].tolist(), strict=True):
                table.setdefault(g, {})[f"{set_name}_drop"] = clean[set_name] - acc
    for g, row in table.items():
        own = "recall" if "_recall_" in g or g == "recall" else "reasoning"
        other = "reasoning" if own == "recall" else "recall"
        row["selectivity"] = row[f"{own}_drop"] - row[f"{other}_drop"]
        row["size"] = len(groups[g])
    return RRResult(stats, table, {g: [str(s) for s in v] for g, v in groups.items()},
                    {"recall": len(rec_items), "reasoning": len(rea_items)}, clean)


__all__ = ["THRESHOLDS", "RRConfig", "RRResult", "features", "items", "recall_reasoning", "specialization"]
