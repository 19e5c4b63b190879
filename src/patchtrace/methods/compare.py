"""Compare localization methods against exact activation patching on the same task and sites.

Every registered method that ``estimates="activation_patching"`` (:mod:`patchtrace.methods.registry`;
built-in: AtP, AtP*, IG, RelP) scores the same grid as exact patching, so each can be checked cell by
cell against the exact numbers. ``run(model, task, sites)`` runs exact patching and the estimators on
the same grids and reports, per site kind: Pearson and Spearman correlation with exact patching,
top-k overlap (by magnitude), and each method's wall time, also as a multiple of one clean+corrupt
forward pair measured in the same process. The estimators come from the registry, so a method
registered tomorrow is compared without an edit here.

Encoders (BERT, RoBERTa): every method reads the mask position. The default set leaves out the
estimators whose definition does not carry over (:data:`~patchtrace.methods.gradients.NOT_FOR_ENCODERS`:
AtP*; the report lists them under ``skipped`` with the reason); naming one is refused before any
compute.

What is compared with what: signed estimates (``value_name='attribution'``) with the exact
``effect``; AtP*'s GradDrop magnitudes (``contribution``) with the mean over examples of
``|effect|`` per example, the quantity they estimate.

Example:
    AtP against exact patching on the heads of layer 23 (leave out the method list to compare every
    registered estimator):

    >>> from patchtrace import load_model, make_task, SiteSpec
    >>> heads = SiteSpec("head", per_unit=True, layers=(23,))
    >>> res = run(load_model(), make_task("ioi", n=2), [heads], ["atp"])
    >>> row = res.report["kinds"]["head"]["atp"]
    >>> row["n_cells"], row["pearson"] > 0.9                  # AtP tracks the exact effects here
    (9, True)
    >>> sorted(res.scores), str(res.scores["atp"][0].top_k(1)[0][0])
    (['activation_patching', 'atp'], 'head[23].h3@-1')
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchtrace.methods import activation_patching
from patchtrace.methods.gradients import NOT_FOR_ENCODERS, AttributionError, Direction, check_family
from patchtrace.methods.registry import MethodRegistryError, MethodSpec, estimators_of, get_method
from patchtrace.methods.validate import ConfigError, check_direction, check_instance, check_int, check_metric
from patchtrace.models.load import Model
from patchtrace.progress import counter
from patchtrace.results import Scores
from patchtrace.sites import SiteSpec
from patchtrace.tasks.base import Task, TokenizedTask

#: The method every estimator is compared with.
REFERENCE = "activation_patching"


def estimator_names() -> list[str]:
    """The registered methods that estimate exact patching (the default set compared)."""
    return [s.name for s in estimators_of(REFERENCE)]


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Settings shared by every compared method (keyword-only; checked when built).

    Attributes:
        direction: ``denoise`` or ``noise`` (every method runs in this direction).
        metric: metric name (every method scores this metric).
        top_k: size of the top-k sets compared.
        repeats: time each estimator this many times (the fastest counts; exact runs once);
            a clean+corrupt forward pair is timed before every run and its fastest time is the unit.
        options: per-method settings besides direction and metric, by registry name, e.g.
            ``{"ig": {"steps": 5}, "atp_star": {"grad_drop": False}}``.

    Raises:
        ConfigError: a bad field, an options entry for a method that is not an estimator, or
            options its config refuses.
    """

    direction: Direction = "denoise"
    metric: str = "logit_diff"
    top_k: int = 10
    repeats: int = 1
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_direction(self)
        check_metric(self)
        check_int(self, "top_k", low=1)
        check_int(self, "repeats", low=1)
        check_instance(self, "options", Mapping)
        for name in self.options:
            self.method_config(name)  # builds (and so checks) every configured method's settings

    def method_config(self, name: str) -> Any:
        """The config of estimator ``name``: this direction and metric plus ``options[name]``.

        Raises:
            ConfigError: ``name`` is not a registered estimator, or its config refuses the options.
        """
        try:
            spec = get_method(name)
        except MethodRegistryError as e:
            raise ConfigError(f"CompareConfig.options: {e}") from None
        if spec.estimates != REFERENCE:
            raise ConfigError(f"CompareConfig.options: {name!r} does not estimate {REFERENCE}")
        kw = dict(self.options.get(name, {}))
        if {"direction", "metric"} & set(kw):
            raise ConfigError(f"CompareConfig.options[{name!r}]: set direction and metric on CompareConfig itself")
        try:
            return spec.config(direction=self.direction, metric=self.metric, **kw)
        except TypeError as e:
            raise ConfigError(f"CompareConfig.options[{name!r}] = {kw!r}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class CompareResult:
    """What :func:`run` returns.

    Attributes:
        report: ``report['kinds'][kind][method]`` has ``pearson``, ``spearman``, ``top_k_overlap``,
            ``compared_with`` and ``n_cells``; ``report['time_s'][method]`` is the method's wall time
            over all grids and ``report['time_vs_forward_pair']`` its ratio to one clean+corrupt
            forward pair; plus the task, model, sites and config.
        scores: method name → one :class:`Scores` per grid (``activation_patching`` included).
        sites: the grids, in order.
    """

    report: dict[str, Any]
    scores: Mapping[str, list[Scores]]
    sites: tuple[SiteSpec, ...]

    def save(self, out_dir: str | Path) -> Path:
        """Write every Scores (``<method>/<kind>/``), ``report.json`` and ``scatter_<method>.png``."""
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        for name, lst in self.scores.items():
            for spec, s in zip(self.sites, lst, strict=True):
                s.save(root / name / spec_tag(spec))
        (root / "report.json").write_text(json.dumps(self.report, indent=2, default=str))
        for name, lst in self.scores.items():
            if name != REFERENCE:
                scatter(self.scores[REFERENCE], lst, self.sites, name, root / f"scatter_{name}.png")
        return root


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), as Spearman needs."""
    x = x.double()
    order = torch.argsort(x)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    return (sums / counts)[inv]


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two equally-sized tensors (flattened); NaN when one is constant."""
    a, b = x.flatten().double(), y.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(_ranks(x.flatten()), _ranks(y.flatten()))


def top_k_overlap(x: Tensor, y: Tensor, k: int) -> float:
    """Fraction of the ``k`` largest-magnitude cells of ``y`` that are among those of ``x``."""
    k = min(k, x.numel())
    a = set(torch.topk(x.flatten().abs(), k).indices.tolist())
    b = set(torch.topk(y.flatten().abs(), k).indices.tolist())
    return len(a & b) / k


def reference_for(exact: Scores, est: Scores) -> Tensor:
    """The exact quantity an estimate estimates: the effect, or ``E|effect|`` for magnitudes."""
    if est.value_name == "contribution":
        if exact.per_example is None:
            raise AttributionError("comparing a magnitude score needs the exact per-example effects")
        return exact.per_example.abs().mean(0)
    return exact.values


def forward_pair_seconds(model: Model, tok: TokenizedTask, repeats: int = 3) -> float:
    """Median wall time of one plain clean + corrupt forward over the whole task (no grad)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for idx in tok.groups():
                ro = tok.readout(idx, mask=not model.family.causal)  # an encoder's mask positions
                for which in ("clean", "corrupt"):
                    model.runner.forward(tok.ids(which, idx).to(model.device), last_only=True, readout=ro)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def spec_tag(spec: SiteSpec) -> str:
    """A folder name for a grid: the kind, plus ``-unit`` when split per unit."""
    return spec.kind + ("-unit" if spec.per_unit and spec.kind not in ("head", "neuron") else "")


def _estimate(spec: MethodSpec, model: Model, tok: TokenizedTask, specs: list[SiteSpec], cfg: CompareConfig) -> list[Scores]:
    """One estimator over every grid (sharing passes when the method has ``run_many``)."""
    mc = cfg.method_config(spec.name)
    out = spec.run_many(model, tok, specs, mc) if spec.run_many else [spec.run(model, tok, s, mc) for s in specs]
    got = [x for x in out if isinstance(x, Scores)]
    if len(got) != len(specs):
        raise AttributionError(f"method {spec.name!r} returned {[type(x).__name__ for x in out]}, not one Scores per grid")
    return got


def _exact(model: Model, tok: TokenizedTask, specs: list[SiteSpec], cfg: CompareConfig) -> list[Scores]:
    pc = activation_patching.PatchingConfig(direction=cfg.direction, metric=cfg.metric, sanity_check=False)
    return [activation_patching.run(model, tok, s, pc) for s in specs]


def _agreement(exact: Scores, est: Scores, k: int) -> dict[str, Any]:
    ref = reference_for(exact, est)
    return {
        "pearson": pearson(ref, est.values),
        "spearman": spearman(ref, est.values),
        "top_k_overlap": top_k_overlap(ref, est.values, k),
        "compared_with": "E|effect|" if est.value_name == "contribution" else "effect",
        "n_cells": est.values.numel(),
    }


def check_sites(model: Model, tok: TokenizedTask, specs: Sequence[SiteSpec]) -> None:
    """Resolve every site of every grid against the model and each example group's length.

    Raises:
        EngineError: a layer, unit or position that does not exist (names the site).
    """
    from patchtrace.engine.sweep import resolve

    for spec in specs:
        grid = activation_patching.build_grid(model, spec, tok)
        for idx in tok.groups():
            for site in grid.sites():
                resolve(site, model, tok.lengths[idx[0]])


def run(
    model: Model,
    task: Task | TokenizedTask,
    sites: Sequence[SiteSpec],
    methods: Sequence[str] | None = None,
    config: CompareConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> CompareResult:
    """Run the estimators on the same task and grids and compare each with exact patching.

    Args:
        model: a loaded model.
        task: a task or tokenized task.
        sites: the grids (one per site kind is typical).
        methods: registry names of estimators (default: every registered estimator; the reference
            ``activation_patching`` always runs and may be listed).
        config: :class:`CompareConfig`.
        out_dir: save the result there (:meth:`CompareResult.save`).
        on_progress: ``on_progress(done, total)`` in method runs (the reference, then each
            estimator × ``repeats``), so a long comparison shows how far it is.

    Returns:
        a :class:`CompareResult`.

    Raises:
        AttributionError: a method that is not a registered estimator, or no grids.
    """
    cfg = config or CompareConfig()
    specs = list(sites)
    if not specs:
        raise AttributionError("compare needs at least one site grid")
    known = estimator_names()
    names = [m for m in dict.fromkeys(known if methods is None else methods) if m != REFERENCE]
    bad = [m for m in names if m not in known]
    if bad:
        raise AttributionError(f"unknown method(s) {bad}; the estimators of {REFERENCE} are {', '.join(known)}")
    skipped: dict[str, str] = {}
    if not model.family.causal:  # encoders: leave out (default set) or refuse (named) what does not carry over
        if methods is None:
            skipped = {m: NOT_FOR_ENCODERS[m] for m in names if m in NOT_FOR_ENCODERS}
            names = [m for m in names if m not in skipped]
        for m in names:
            check_family(model, m)
    tok = task if isinstance(task, TokenizedTask) else task.tokenize(model.tokenizer)
    check_sites(model, tok, specs)  # a layer or position out of range fails here, before any forward
    pairs: list[float] = []
    scores: dict[str, list[Scores]] = {}
    times: dict[str, float] = {}
    tick = counter(on_progress, 1 + len(names) * cfg.repeats)
    for name in [REFERENCE, *names]:
        for _ in range(1 if name == REFERENCE else cfg.repeats):
            pairs.append(forward_pair_seconds(model, tok))
            t0 = time.perf_counter()
            scores[name] = _exact(model, tok, specs, cfg) if name == REFERENCE else _estimate(
                get_method(name), model, tok, specs, cfg
            )
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - t0)
            tick(1)
    pair = min(pairs)
    kinds = {
        spec_tag(spec): {name: _agreement(scores[REFERENCE][j], scores[name][j], cfg.top_k) for name in names}
        for j, spec in enumerate(specs)
    }
    report: dict[str, Any] = {
        "task": tok.task.describe(),
        "model": model.describe(),
        "sites": [str(s) for s in specs],
        "config": asdict(cfg),
        "forward_pair_s": pair,
        "time_s": times,
        "time_vs_forward_pair": {k: v / pair for k, v in times.items()},
        "kinds": kinds,
    }
    if skipped:
        report["skipped"] = skipped
    result = CompareResult(report=report, scores=scores, sites=tuple(specs))
    if out_dir is not None:
        result.save(out_dir)
    return result


def scatter(exact: list[Scores], est: list[Scores], specs: Sequence[SiteSpec], name: str, path: Path) -> Path:
    """One panel per site kind: exact (x) against the estimate (y), with the identity line and r."""
    from matplotlib.figure import Figure  # a standalone figure: pyplot and the caller's backend untouched

    n = len(specs)
    fig = Figure(figsize=(3.6 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, spec, e, s in zip(axes[0], specs, exact, est, strict=True):
        x, y = reference_for(e, s).flatten().numpy(), s.values.flatten().numpy()
        ax.scatter(x, y, s=8, alpha=0.6)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], lw=0.8, color="gray", ls="--")
        ax.set_title(f"{spec_tag(spec)}  r={pearson(torch.as_tensor(x), torch.as_tensor(y)):.3f}", fontsize=9)
        ax.set_xlabel("exact |effect|" if s.value_name == "contribution" else "exact effect", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
