"""Desiderata-based masking (DBM; Davies et al. 2023, methods.md §5): learn a sparse set of components.

The idea. Instead of scoring components one at a time, learn a mask ``m ∈ [0, 1]^C`` over ``C``
components (heads, attention/MLP outputs per layer, neurons, at chosen positions) such that mixing the
*alternate* run's activations into the *original* run,

    ĥ_c = m_c · h_c(alternate) + (1 − m_c) · h_c(original),

makes the model output each desideratum's target (:mod:`patchtrace.desiderata`), while as few
components as possible are patched. The relaxed mask is then binarized and evaluated **exactly**:
the kept components form one multi-site :class:`~patchtrace.engine.sweep.Patch`, run by the sweep
engine on held-out tuples.

Mask semantics (read carefully; the paper's code uses the opposite convention). Here ``m_c = 1``
means *patch* component ``c`` (take the alternate's value), ``m_c = 0`` means leave the original's
value; a component is *kept* in the found set when its binarized mask is 1. The authors' code
(Nix07/binding-circuit-discovery) writes ``m·orig + (1−m)·alt``, initialises ``m = 1`` (nothing
patched) and penalises ``λ·Σ(1.001 − m)^0.5``: an L0.5 quasi-norm of the *patch amount* ``1 − m``,
which rewards leaving components unpatched. With ``m_ours = 1 − m_paper`` the same objective reads

    loss = Σ_d w_d · CE_d(patched logits, target_d) + λ · Σ_c (m_c + 0.001)^0.5,

initialised at ``m = 0`` (nothing patched), projected onto ``[0, 1]`` by clamping before every
step, Adam with lr 1e-2 for ~100 steps. The 0.001 keeps the gradient finite at ``m = 0`` (there it
is ``λ·0.5/√0.001 ≈ 15.8·λ`` per component: a component moves off zero only if the task loss pulls
harder than that, which is what makes the result sparse).

Loss (a documented departure). The paper drives a logit difference (value desideratum, unbounded)
and penalises its squared change (invariance desideratum). We use one rule for every desideratum:
cross-entropy toward its target token at the last position, averaged over its tuples and weighted
by :attr:`~patchtrace.desiderata.Desideratum.weight` (the built-in variable-binding desiderata use
the paper's 5 : 1). CE is bounded below, needs no contrast token, and treats "move to the
alternate's answer" and "stay at the original's answer" alike. We take one joint Adam step per
iteration (the paper alternates one step per desideratum).

Parametrizations (:attr:`DBMConfig.parametrization`):

- ``clamp`` (the paper's): the mask is the parameter, clamped to ``[0, 1]``; L0.5 penalty.
- ``sigmoid``: ``m = sigmoid(θ)``, θ initialised at −3; same L0.5 penalty. Its gradient through
  the sigmoid shrinks like ``√m`` near 0, so this needs a larger λ than ``clamp`` for equal sparsity.
- ``hard_concrete`` (Louizos et al. 2018): stochastic gates ``m = clamp(sigmoid((log u − log(1−u) +
  log α)/β)·(ζ−γ)+γ, 0, 1)`` with β=2/3, γ=−0.1, ζ=1.1 during training, the expected-L0 penalty
  ``λ·Σ sigmoid(log α − β·log(−γ/ζ))``, and the deterministic gate at evaluation.

Binarization: component kept iff its (deterministic) mask is ``> threshold`` (0.5 = the paper's round).

Speed. Components live at a few positions (usually only the last). Nothing before the first masked
position changes, and nothing below the lowest masked layer, so every training step runs only
positions ``p..T−1`` from the lowest masked layer up, attending to the original run's cached keys and
values of earlier positions: with the last position only, a step costs about one token per tuple
(forward and backward) instead of ``T``. The original run (residual stream, keys/values) and the
alternate's activations are cached once under ``no_grad``. This is exact (tests compare it to a
full forward with the same mixing).

Evaluation. Held-out desiderata accuracy = fraction of tuples whose patched argmax is the target,
averaged over desiderata (per-desideratum accuracies are kept too). The comparison is top-k exact
activation patching at equal k: every component is patched alone (noising: original = base,
alternate = source) on the *training* tuples with the metric ``logit(target) − logit(contrast)``;
a component's score is the sum over desiderata of its mean effect (positive = moves a value
desideratum to its target; negative = breaks an invariance). The ``k`` best form one patch,
evaluated like the mask.

Example:
    >>> from patchtrace import load_model                                      # doctest: +SKIP
    >>> from patchtrace.tasks.variable_binding import variable_binding_desiderata  # doctest: +SKIP
    >>> m = load_model()                                                        # doctest: +SKIP
    >>> s = run(m, variable_binding_desiderata(64, 0, m), "head,mlp_out", DBMConfig(lam=0.1))  # doctest: +SKIP
    >>> s.provenance["kept"], s.provenance["evaluation"]["accuracy"]            # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from patchtrace.desiderata import (
    Desideratum,
    TokenizedDesideratum,
    desiderata_from_task,
    split_desiderata,
    tokenize_desiderata,
)
from patchtrace.engine.sweep import Patch, Scorer, collect, resolve, run_patches
from patchtrace.errors import PatchtraceError
from patchtrace.metrics import Metric
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn, RunCtx
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import HEADED_KINDS, KV_KINDS, STREAM_KINDS, HookPoint, Site, SiteSpec, parse_site
from patchtrace.tasks.base import Task

Parametrization = Literal["clamp", "sigmoid", "hard_concrete"]
MASKABLE_KINDS = frozenset({"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "q", "k", "v", "neuron"})
_HC_BETA, _HC_GAMMA, _HC_ZETA = 2.0 / 3.0, -0.1, 1.1


class DBMError(PatchtraceError, ValueError):
    """A mask request that cannot be honoured (names the site, desideratum or setting)."""


@dataclass(frozen=True)
class DBMConfig:
    """Settings of mask learning.

    Attributes:
        lam: sparsity strength λ.
        steps: Adam iterations (the paper: 100).
        lr: Adam learning rate (the paper: 1e-2).
        parametrization: ``clamp`` (the paper's), ``sigmoid`` or ``hard_concrete``.
        threshold: a component is kept when its mask exceeds this.
        train_fraction: share of each desideratum's tuples used for training; the rest is held out.
        seed: seed of the split and of hard-concrete noise.
        baseline: also rank components by exact activation patching and evaluate the top-k at equal k.
        max_memory: working-memory budget (bytes) of the evaluation sweeps.
    """

    lam: float = 0.1
    steps: int = 100
    lr: float = 1e-2
    parametrization: Parametrization = "clamp"
    threshold: float = 0.5
    train_fraction: float = 0.5
    seed: int = 0
    baseline: bool = True
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if self.parametrization not in ("clamp", "sigmoid", "hard_concrete"):
            raise DBMError(f"unknown parametrization {self.parametrization!r}; use clamp, sigmoid or hard_concrete")
        if self.lam < 0 or self.steps < 0 or self.lr <= 0:
            raise DBMError(f"need lam ≥ 0, steps ≥ 0, lr > 0 (got {self.lam}, {self.steps}, {self.lr})")


# -- components -------------------------------------------------------------------------------------


def parse_specs(sites: str | SiteSpec | Sequence[SiteSpec | str], positions: Any = "last") -> list[SiteSpec]:
    """``"head,mlp_out"`` (or SiteSpecs) → one SiteSpec per kind (heads/neurons per unit)."""
    if isinstance(sites, SiteSpec):
        return [sites]
    items = sites.split(",") if isinstance(sites, str) else list(sites)
    out = []
    for it in items:
        out.append(it if isinstance(it, SiteSpec) else SiteSpec.parse(it, positions=positions))
    if not out:
        raise DBMError("no site kinds given; e.g. 'head,mlp_out'")
    return out


def components(model: Model, specs: Sequence[SiteSpec]) -> list[Site]:
    """Enumerate the mask's components: one :class:`Site` per (kind, layer, unit, position).

    Positions are ``"last"`` (→ -1), a list of (possibly negative) positions, or None (one component
    covering all positions).

    Raises:
        DBMError: an unmaskable kind (``embed``, ``pattern``) or ``positions="all"``.
    """
    d = model.dims
    out: list[Site] = []
    for spec in specs:
        if spec.kind not in MASKABLE_KINDS:
            raise DBMError(f"site kind {spec.kind!r} cannot be masked; use one of {', '.join(sorted(MASKABLE_KINDS))}")
        if spec.positions == "all":
            raise DBMError("positions='all' is not supported for masks; give a list of positions (e.g. [-3, -2, -1])")
        positions: list[int | None] = (
            [None] if spec.positions is None else [-1] if spec.positions == "last" else list(spec.positions)  # type: ignore[arg-type]
        )
        layers = list(spec.layers) if spec.layers is not None else list(range(d.n_layers))
        units: list[int | None] = [None]
        if spec.per_unit:
            n_units = d.d_mlp if spec.kind == "neuron" else d.n_kv_heads if spec.kind in KV_KINDS else d.n_heads
            units = list(spec.units) if spec.units is not None else list(range(n_units))
        for layer in layers:
            for u in units:
                for p in positions:
                    out.append(Site(spec.kind, layer, u, p))
    if len(set(out)) != len(out):
        raise DBMError("the site kinds given produce duplicate components")
    return out


def _n_units(model: Model, kind: str) -> int:
    d = model.dims
    if kind == "neuron":
        return d.d_mlp
    if kind in KV_KINDS:
        return d.n_kv_heads
    if kind in HEADED_KINDS:
        return d.n_heads
    return 1


def _as_units(x: Tensor, kind: str) -> Tensor:
    """View an activation as ``[B, n, U, r]`` (U units of r values each)."""
    if kind in STREAM_KINDS:
        return x.unsqueeze(2)
    if kind == "neuron":
        return x.unsqueeze(-1)
    return x


def _from_units(x: Tensor, kind: str) -> Tensor:
    if kind in STREAM_KINDS:
        return x.squeeze(2)
    if kind == "neuron":
        return x.squeeze(-1)
    return x


@dataclass
class _Group:
    """One equal-length batch of one desideratum, prepared for masked runs."""

    name: str
    weight: float
    target: Tensor  # [B]
    start_layer: int
    p: int  # first computed position
    resid: Tensor  # [B, T-p, D] original residual entering start_layer
    past: list[tuple[Tensor, Tensor] | None] | None
    alt: dict[HookPoint, Tensor]  # [B, T-p, ...]
    index: dict[HookPoint, tuple[Tensor, Tensor, Tensor]]  # (component idx, rel pos, unit) per entry
    n_units: dict[HookPoint, int]


def prepare(
    model: Model, tds: Sequence[TokenizedDesideratum], comps: Sequence[Site], runs: RunStore | None = None
) -> list[_Group]:
    """Cache, once and without gradients, what every training step needs: per equal-length batch of
    each desideratum, the original run's residual stream entering the lowest masked layer and its
    keys/values before the first masked position, and the alternate's activations at every masked
    hook point."""
    points = sorted({c.point for c in comps}, key=lambda h: (h.layer or 0, h.kind))
    start_layer = min(c.layer for c in comps if c.layer is not None)
    groups = []
    dev = model.device
    for td in tds:
        for idx in td.groups():
            ids_o = td.ids("original", idx).to(dev)
            T = ids_o.shape[1]
            res = [resolve(c, model, T) for c in comps]
            p = min(0 if s.pos is None else s.pos for s in res)
            store = runs if runs is not None else RunStore()
            orig = store.get(model, td, "original", idx, set())
            alt_cache = store.get(model, td, "alternate", idx, set(points))
            past: list[tuple[Tensor, Tensor] | None] | None = None
            if p > 0:
                past = [None] * model.dims.n_layers
                for li in range(start_layer, model.dims.n_layers):
                    k, v = orig.kv[li]
                    past[li] = (k[:, :, :p], v[:, :, :p])
            per: dict[HookPoint, list[tuple[int, int, int]]] = defaultdict(list)
            nu = {hp: _n_units(model, hp.kind) for hp in points}
            for ci, s in enumerate(res):
                hp = s.point
                ps = range(T - p) if s.pos is None else [s.pos - p]
                us = range(nu[hp]) if s.unit is None else [s.unit]
                for t in ps:
                    for u in us:
                        per[hp].append((ci, t, u))
            index: dict[HookPoint, tuple[Tensor, Tensor, Tensor]] = {}
            for hp, ents in per.items():
                cols = [torch.tensor([e[j] for e in ents], device=dev) for j in range(3)]
                index[hp] = (cols[0], cols[1], cols[2])
            groups.append(
                _Group(
                    td.name, td.desideratum.weight, td.target[idx].to(dev), start_layer, p,
                    orig.acts[HookPoint("resid_pre", start_layer)][:, p:], past,
                    {hp: alt_cache.acts[hp][:, p:] for hp in points}, index, nu,
                )
            )
    return groups


def _mix_hook(alt: Tensor, m: Tensor, index: tuple[Tensor, Tensor, Tensor], n_units: int, kind: str) -> HookFn:
    ci, tt, uu = index

    def fn(x: Tensor, ctx: RunCtx) -> Tensor:
        xu, au = _as_units(x, kind), _as_units(alt, kind)
        w = torch.zeros(xu.shape[1], n_units, dtype=m.dtype, device=m.device).index_put((tt, uu), m[ci])
        w = w.to(x.dtype)[None, :, :, None]
        return _from_units(xu + w * (au - xu), kind)

    return fn


def masked_logits(model: Model, group: _Group, m: Tensor) -> Tensor:
    """Last-position logits ``[B, V]`` of the original run with mask ``m`` ``[C]`` mixing in the alternate."""
    hooks: dict[HookPoint, list[HookFn]] = {
        hp: [_mix_hook(group.alt[hp], m, group.index[hp], group.n_units[hp], hp.kind)] for hp in group.index
    }
    out = model.runner.forward(
        resid=group.resid, start_layer=group.start_layer, pos_offset=group.p, past_kv=group.past,
        hooks=hooks, last_only=True,
    )
    assert out.logits is not None
    return out.logits[:, -1].float()


# -- parametrizations -------------------------------------------------------------------------------


class _MaskParam:
    """The trainable tensor behind a mask and the rules turning it into ``m`` and a penalty."""

    def __init__(self, n: int, kind: Parametrization, device: torch.device, gen: torch.Generator) -> None:
        self.kind = kind
        self.gen = gen
        init = {"clamp": 0.0, "sigmoid": -3.0, "hard_concrete": -3.0}[kind]
        self.theta = torch.full((n,), init, device=device, requires_grad=True)

    def project(self) -> None:
        if self.kind == "clamp":
            with torch.no_grad():
                self.theta.clamp_(0.0, 1.0)

    def train_mask(self) -> Tensor:
        if self.kind == "clamp":
            return self.theta
        if self.kind == "sigmoid":
            return torch.sigmoid(self.theta)
        u = torch.rand(self.theta.shape, generator=self.gen).clamp(1e-6, 1 - 1e-6).to(self.theta.device)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.theta) / _HC_BETA)
        return (s * (_HC_ZETA - _HC_GAMMA) + _HC_GAMMA).clamp(0.0, 1.0)

    def eval_mask(self) -> Tensor:
        with torch.no_grad():
            if self.kind == "clamp":
                return self.theta.clamp(0.0, 1.0).detach().clone()
            if self.kind == "sigmoid":
                return torch.sigmoid(self.theta).detach()
            return (torch.sigmoid(self.theta) * (_HC_ZETA - _HC_GAMMA) + _HC_GAMMA).clamp(0.0, 1.0).detach()

    def penalty(self, m: Tensor) -> Tensor:
        if self.kind == "hard_concrete":
            return torch.sigmoid(self.theta - _HC_BETA * math.log(-_HC_GAMMA / _HC_ZETA)).sum()
        return (m + 0.001).pow(0.5).sum()


@dataclass
class TrainedMask:
    """A learned mask before evaluation.

    Attributes:
        sites: the components, in mask order.
        mask: the relaxed (deterministic) mask ``[C]`` in ``[0, 1]``; 1 = patched from the alternate.
        kept: components whose mask exceeds the threshold.
        history: per step ``{"loss", "task", "penalty", "n_above"}``.
    """

    sites: list[Site]
    mask: Tensor
    kept: list[Site]
    history: list[dict[str, float]] = field(default_factory=list)


def train_mask(
    model: Model,
    train: Sequence[TokenizedDesideratum],
    comps: Sequence[Site],
    config: DBMConfig,
    *,
    on_step: Callable[[int, float, int], None] | None = None,
    prepared: list[_Group] | None = None,
) -> TrainedMask:
    """Learn a relaxed mask over ``comps`` on the training tuples (see the module docstring).

    Args:
        model: the model (its parameters are not updated).
        train: tokenized training desiderata.
        comps: components (from :func:`components`).
        config: :class:`DBMConfig`.
        on_step: called as ``on_step(step, loss, n_above_threshold)`` after each step.
        prepared: the cached runs from :func:`prepare` for these tuples and components (a λ sweep
            reuses them); computed here when None.

    Returns:
        :class:`TrainedMask`.
    """
    if not comps:
        raise DBMError("no components to mask")
    groups = prepared if prepared is not None else prepare(model, train, comps)
    n_tuples: dict[str, int] = defaultdict(int)
    for g in groups:
        n_tuples[g.name] += g.target.shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    param = _MaskParam(len(comps), config.parametrization, model.device, gen)
    opt = torch.optim.Adam([param.theta], lr=config.lr)
    history: list[dict[str, float]] = []
    for step in range(config.steps):
        param.project()
        opt.zero_grad()
        m = param.train_mask()
        task_loss = torch.zeros((), device=model.device)
        for g in groups:
            logits = masked_logits(model, g, m)
            ce = F.cross_entropy(logits, g.target, reduction="sum") / n_tuples[g.name]
            task_loss = task_loss + g.weight * ce
        pen = param.penalty(m)
        loss = task_loss + config.lam * pen
        loss.backward()
        opt.step()
        n_above = int((param.eval_mask() > config.threshold).sum())
        history.append({"loss": loss.item(), "task": task_loss.item(), "penalty": pen.item(), "n_above": n_above})
        if on_step is not None:
            on_step(step, history[-1]["loss"], n_above)
    param.project()
    mask = param.eval_mask().cpu()
    kept = [s for s, v in zip(comps, mask.tolist(), strict=True) if v > config.threshold]
    return TrainedMask(list(comps), mask, kept, history)


# -- exact evaluation -------------------------------------------------------------------------------


class TargetMarginScorer(Scorer):
    """Scores a patched run by ``logit[target] − max_{v ≠ target} logit[v]`` (> 0 ⇔ target is the argmax)."""

    def __init__(self, target: Tensor) -> None:
        t = target.view(-1, 1)
        super().__init__(Metric("prob"), t, t)  # "prob" reads the full vocabulary: no column restriction
        self.target = target.view(-1)

    def __call__(self, logits: Tensor, n_patches: int, cols_used: bool) -> Tensor:
        return target_margin(logits.float(), self.target.repeat(n_patches)).view(n_patches, -1)


def target_margin(logits: Tensor, target: Tensor) -> Tensor:
    """``[N]`` margin of the target over the best other token, from ``[N, V]`` logits."""
    tl = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.scatter(1, target[:, None], float("-inf")).max(-1).values
    return tl - other


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

    Returns:
        ``[S, N]`` margins ``logit[target] − max_{v≠target} logit[v]`` at the last position
        (> 0 ⇔ the patched run predicts the target).
    """
    out = torch.empty(len(site_sets), len(td))
    points = {s.point for ss in site_sets for s in ss}
    nonempty = [i for i, ss in enumerate(site_sets) if ss]
    empty = [i for i, ss in enumerate(site_sets) if not ss]
    for idx in td.groups():
        ids_o = td.ids("original", idx).to(model.device)
        T = ids_o.shape[1]
        store = runs if runs is not None else RunStore()
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
    (:func:`site_set_margins` > 0).
    """
    acc = torch.zeros(len(site_sets), len(tds))
    for di, td in enumerate(tds):
        acc[:, di] = (site_set_margins(model, td, site_sets, max_memory=max_memory, runs=runs) > 0).float().mean(1)
    return acc


def exact_patching_ranking(
    model: Model,
    tds: Sequence[TokenizedDesideratum],
    specs: Sequence[SiteSpec],
    *,
    max_memory: int | None = None,
    runs: RunStore | None = None,
) -> list[tuple[Site, float]]:
    """Rank components by exact single-site activation patching on the given tuples.

    Each desideratum runs as a noising sweep on the sweep engine (the same computation as
    :func:`patchtrace.methods.activation_patching.run` with ``direction="noise"``: base = original,
    source = alternate), one patch per component, with ``logit_diff`` of target vs contrast; a tuple
    without a contrast uses the original run's top token, or the alternate's when that is the
    target, or the original's runner-up. A component's score is the sum over desiderata of its mean
    effect ``M(patched) − M(original)``. Best first.
    """
    comps = components(model, specs)
    points = {c.point for c in comps}
    store = runs if runs is not None else RunStore()
    total = torch.zeros(len(comps))
    for td in tds:
        contrast = _contrasts(model, td)
        eff = torch.zeros(len(comps))
        for idx in td.groups():
            ids_o = td.ids("original", idx).to(model.device)
            T = ids_o.shape[1]
            base, source = store.get(model, td, "original", idx, points), store.get(model, td, "alternate", idx, points)
            scorer = Scorer(Metric("logit_diff"), td.target[idx, None].to(model.device), contrast[idx, None].to(model.device))
            patched = run_patches(
                model, ids_o, base, source, [Patch((resolve(c, model, T),)) for c in comps], scorer,
                max_memory=max_memory,
            ).cpu()
            base_m = scorer(base.logits, 1, False)[0].cpu()
            eff += (patched - base_m[None]).sum(1)
        total += eff / len(td)
    order = torch.argsort(total, descending=True, stable=True).tolist()
    return [(comps[i], float(total[i])) for i in order]


class RunStore:
    """Caches :func:`~patchtrace.engine.sweep.collect` runs of desiderata batches, so ranking, training
    and evaluation on the same tuples share their forward passes."""

    def __init__(self) -> None:
        self._d: dict[tuple[int, str, tuple[int, ...]], tuple[frozenset[HookPoint], Any]] = {}

    def get(self, model: Model, td: TokenizedDesideratum, which: Literal["original", "alternate"],
            idx: Sequence[int], points: set[HookPoint]) -> Any:
        key = (id(td), which, tuple(idx))
        hit = self._d.get(key)
        if hit is not None and set(points) <= hit[0]:
            return hit[1]
        run = collect(model, td.ids(which, idx).to(model.device), points)
        self._d[key] = (frozenset(points), run)
        return run


def _contrasts(model: Model, td: TokenizedDesideratum) -> Tensor:
    out = td.contrast.clone()
    missing = (out < 0).nonzero().flatten().tolist()
    if not missing:
        return out
    for idx in td.groups():
        need = [i for i in idx if i in set(missing)]
        if not need:
            continue
        with torch.no_grad():
            lo = model.runner.forward(td.ids("original", need).to(model.device), last_only=True).logits
            la = model.runner.forward(td.ids("alternate", need).to(model.device), last_only=True).logits
        assert lo is not None and la is not None
        for j, i in enumerate(need):
            top2 = lo[j, -1].topk(2).indices.tolist()
            a = int(la[j, -1].argmax())
            t = int(td.target[i])
            out[i] = top2[0] if top2[0] != t else a if a != t else top2[1]
    return out


# -- the method ---------------------------------------------------------------------------------------


def _as_desiderata(task: Any, model: Model) -> list[Desideratum]:
    if isinstance(task, Desideratum):
        return [task]
    if isinstance(task, Task):
        if task.params.get("desiderata") == "variable_binding":
            from patchtrace.tasks.variable_binding import desiderata_from_variable_binding

            return desiderata_from_variable_binding(task)
        return [desiderata_from_task(task)]
    if isinstance(task, Sequence) and task and all(isinstance(d, Desideratum) for d in task):
        return list(task)
    raise DBMError("DBM needs desiderata: a Desideratum, a list of them, or a Task (read as a value desideratum)")


def _grid_scores(kind: str, comps: Sequence[Site], mask: Tensor, binary: Tensor, model: Model) -> tuple[Tensor, Tensor, tuple[str, ...], dict[str, list[str]]]:
    sel = [i for i, s in enumerate(comps) if s.kind == kind]
    layers: list[int] = sorted({int(comps[i].layer) for i in sel if comps[i].layer is not None})  # type: ignore[arg-type]
    units: list[int] = sorted({int(comps[i].unit) for i in sel if comps[i].unit is not None})  # type: ignore[arg-type]
    poss: list[int] = sorted({int(comps[i].pos) for i in sel if comps[i].pos is not None})  # type: ignore[arg-type]
    axes: list[str] = ["layer"]
    shape = [len(layers)]
    labels: dict[str, list[str]] = {"layer_index": [str(x) for x in layers]}
    if units:
        ax = "neuron" if kind == "neuron" else "kv_head" if kind in KV_KINDS else "head"
        axes.append(ax)
        shape.append(len(units))
        labels[f"{ax}_index"] = [str(u) for u in units]
    if len(poss) > 1:
        axes.append("pos")
        shape.append(len(poss))
        labels["pos_index"] = [str(p) for p in poss]
    elif len(poss) == 1:
        labels["fixed_pos"] = [str(poss[0])]
    v = torch.zeros(shape)
    b = torch.zeros(shape)
    for i in sel:
        s = comps[i]
        key: list[int] = [layers.index(s.layer)]  # type: ignore[arg-type]
        if units:
            key.append(units.index(s.unit))  # type: ignore[arg-type]
        if len(poss) > 1:
            key.append(poss.index(s.pos))  # type: ignore[arg-type]
        v[tuple(key)] = mask[i]
        b[tuple(key)] = binary[i]
    return v, b, tuple(axes), labels


def run(
    model: Model,
    task: Any,
    sites: str | SiteSpec | Sequence[SiteSpec | str] = "head,mlp_out",
    config: DBMConfig | None = None,
    *,
    heldout: Sequence[Desideratum] | None = None,
    on_step: Callable[[int, float, int], None] | None = None,
) -> Scores:
    """Learn a mask, binarize it and evaluate it exactly on held-out tuples.

    Args:
        model: a loaded model.
        task: desiderata (a :class:`~patchtrace.desiderata.Desideratum` or a list), or a
            :class:`~patchtrace.tasks.Task` read as one value desideratum.
        sites: site kinds, e.g. ``"head,mlp_out"`` or SiteSpecs (positions default to the last token).
        config: :class:`DBMConfig`.
        heldout: held-out desiderata; default: split ``task`` by ``config.train_fraction``.
        on_step: progress callback ``on_step(step, loss, n_above_threshold)``.

    Returns:
        :class:`Scores` with ``value_name="mask"``: ``values`` is the relaxed mask of the first site
        kind on its grid; ``extras`` hold ``mask``/``binary`` (all components, flat, in the order of
        ``provenance["components"]``), ``mask.<kind>``/``binary.<kind>`` grids per kind and the
        training curve; ``provenance["kept"]`` lists the kept sites and ``provenance["evaluation"]``
        the held-out accuracies (mask, unpatched, top-k exact patching at equal k).

    Raises:
        DBMError, DesiderataError: bad sites, settings or data (before any compute).
    """
    cfg = config or DBMConfig()
    ds = _as_desiderata(task, model)
    specs = parse_specs(sites)
    comps = components(model, specs)
    if heldout is None:
        train, test = split_desiderata(ds, cfg.train_fraction, cfg.seed)
    else:
        train, test = list(ds), list(heldout)
    train_t = tokenize_desiderata(train, model.tokenizer)
    test_t = tokenize_desiderata(test, model.tokenizer)
    trained = train_mask(model, train_t, comps, cfg, on_step=on_step)
    k = len(trained.kept)
    site_sets: list[list[Site]] = [trained.kept, []]
    ranking: list[tuple[Site, float]] = []
    if cfg.baseline:
        ranking = exact_patching_ranking(model, train_t, specs, max_memory=cfg.max_memory)
        site_sets.append([s for s, _ in ranking[:k]])
    acc = evaluate_site_sets(model, test_t, site_sets, max_memory=cfg.max_memory)
    train_acc = evaluate_site_sets(model, train_t, [trained.kept], max_memory=cfg.max_memory)
    names = [td.name for td in test_t]
    evaluation: dict[str, Any] = {
        "desiderata": names,
        "n_components": len(comps),
        "n_kept": k,
        "accuracy": float(acc[0].mean()),
        "accuracy_per_desideratum": dict(zip(names, acc[0].tolist(), strict=True)),
        "train_accuracy": float(train_acc[0].mean()),
        "unpatched_accuracy": float(acc[1].mean()),
        "unpatched_per_desideratum": dict(zip(names, acc[1].tolist(), strict=True)),
        "n_train": {td.name: len(td) for td in train_t},
        "n_heldout": {td.name: len(td) for td in test_t},
    }
    if cfg.baseline:
        evaluation["topk_accuracy"] = float(acc[2].mean())
        evaluation["topk_per_desideratum"] = dict(zip(names, acc[2].tolist(), strict=True))
        evaluation["topk_sites"] = [str(s) for s, _ in ranking[:k]]
    binary = torch.tensor([1.0 if s in set(trained.kept) else 0.0 for s in comps])
    extras: dict[str, Tensor] = {"mask": trained.mask, "binary": binary}
    first_v = None
    first_axes: tuple[str, ...] = ()
    first_labels: dict[str, list[str]] = {}
    for spec in specs:
        v, b, axes, labels = _grid_scores(spec.kind, comps, trained.mask, binary, model)
        extras[f"mask.{spec.kind}"] = v
        extras[f"binary.{spec.kind}"] = b
        if first_v is None:
            first_v, first_axes, first_labels = v, axes, labels
    for key in ("loss", "task", "penalty", "n_above"):
        extras[f"history.{key}"] = torch.tensor([h[key] for h in trained.history], dtype=torch.float32)
    if ranking:
        extras["baseline_score"] = torch.tensor([dict(ranking).get(s, 0.0) for s in comps])
    assert first_v is not None
    prov = make_provenance(model, {"desiderata": [d.describe() for d in ds]}, "dbm", cfg)
    prov["task"] = {"desiderata": [d.describe() for d in ds]}
    prov["sites"] = [str(s) for s in specs]
    prov["components"] = [str(s) for s in comps]
    prov["kept"] = [str(s) for s in trained.kept]
    prov["evaluation"] = evaluation
    prov["mask_semantics"] = "m=1: component patched from the alternate into the original run; kept = m > threshold"
    return Scores(
        values=first_v.clone(),
        axes=first_axes,
        site_kind=specs[0].kind,
        value_name="mask",
        metric="target_accuracy",
        baselines={"unpatched": evaluation["unpatched_accuracy"], "mask": evaluation["accuracy"]},
        labels=first_labels,
        extras=extras,
        provenance=prov,
    )


@dataclass
class MaskResult:
    """A saved mask read back: components, relaxed and binary mask, kept sites, evaluation."""

    sites: list[Site]
    mask: Tensor
    binary: Tensor
    kept: list[Site]
    evaluation: dict[str, Any]
    config: dict[str, Any]


def mask_from_scores(scores: Scores) -> MaskResult:
    """Recover the mask from DBM :class:`Scores` (e.g. after :meth:`Scores.load`).

    Raises:
        DBMError: the scores were not made by :func:`run`.
    """
    prov = scores.provenance
    if prov.get("method") != "dbm" or "mask" not in scores.extras:
        raise DBMError("these scores were not produced by DBM (no mask in extras)")
    sites = [parse_site(s) for s in prov["components"]]
    return MaskResult(
        sites, scores.extras["mask"], scores.extras["binary"], [parse_site(s) for s in prov["kept"]],
        dict(prov.get("evaluation", {})), dict(prov.get("config", {})),
    )


def load_mask(path: str | Path) -> MaskResult:
    """Load a DBM result folder written by ``Scores.save`` and return its mask."""
    return mask_from_scores(Scores.load(path))


def config_dict(cfg: DBMConfig) -> dict[str, Any]:
    return asdict(cfg)
