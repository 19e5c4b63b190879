"""Compare localization methods against exact activation patching on the same task and sites.

``run(model, task, sites, methods=["exact", "atp", "atp*", "ig", "relp"])`` computes every method on
the same grids and reports, per site kind: Pearson and Spearman correlation with exact patching,
top-k overlap (by magnitude), and each method's wall time, also as a multiple of one clean+corrupt
forward pair measured in the same process. Everything is kept as :class:`Scores` (one per method and
site kind); with ``out_dir`` they are saved with ``report.json`` and a scatter plot per method.

What is compared with what: signed estimates (``value_name='attribution'``) with the exact
``effect``; AtP*'s GradDrop magnitudes (``contribution``) with the mean over examples of
``|effect|`` per example, the quantity they estimate.

Example:
    >>> from patchtrace import load_model, make_task, SiteSpec                    # doctest: +SKIP
    >>> rep, scores = run(load_model(), make_task("ioi"), [SiteSpec("head", per_unit=True)])  # doctest: +SKIP
    >>> rep["kinds"]["head"]["atp"]["pearson"]                                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchtrace.methods import activation_patching, atp, ig, relp
from patchtrace.methods.gradients import AttributionError
from patchtrace.models.load import Model
from patchtrace.results import Scores
from patchtrace.sites import SiteSpec
from patchtrace.tasks.base import Task, TokenizedTask

METHODS = ("exact", "atp", "atp*", "ig", "relp")


@dataclass(frozen=True)
class CompareConfig:
    """Settings shared by every compared method.

    Attributes:
        direction: ``denoise`` or ``noise``.
        metric: metric name.
        ig_steps: IG steps.
        top_k: size of the top-k sets compared.
        qk_fix: AtP*'s QK fix (query/key sites only).
        grad_drop: AtP*'s GradDrop (its scores are then magnitudes, compared with ``E|effect|``).
        repeats: time each gradient method this many times (the fastest counts; exact runs once);
            a clean+corrupt forward pair is timed before every run and its fastest time is the unit.
    """

    direction: str = "denoise"
    metric: str = "logit_diff"
    ig_steps: int = 5
    top_k: int = 10
    qk_fix: bool = True
    grad_drop: bool = True
    repeats: int = 1


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


def _runners(model: Model, cfg: CompareConfig) -> dict[str, Callable[[TokenizedTask, list[SiteSpec]], list[Scores]]]:
    d = cfg.direction
    return {
        "exact": lambda t, ss: [
            activation_patching.run(
                model, t, s, activation_patching.PatchingConfig(direction=d, metric=cfg.metric, sanity_check=False)  # type: ignore[arg-type]
            )
            for s in ss
        ],
        "atp": lambda t, ss: atp.run_many(model, t, ss, atp.AtPConfig(d, cfg.metric)),  # type: ignore[arg-type]
        "atp*": lambda t, ss: atp.run_star_many(
            model, t, ss, atp.AtPStarConfig(d, cfg.metric, cfg.qk_fix, cfg.grad_drop)  # type: ignore[arg-type]
        ),
        "ig": lambda t, ss: ig.run_many(model, t, ss, ig.IGConfig(d, cfg.metric, cfg.ig_steps)),  # type: ignore[arg-type]
        "relp": lambda t, ss: relp.run_many(model, t, ss, relp.RelPConfig(d, cfg.metric)),  # type: ignore[arg-type]
    }


def forward_pair_seconds(model: Model, tok: TokenizedTask, repeats: int = 3) -> float:
    """Median wall time of one plain clean + corrupt forward over the whole task (no grad)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for idx in tok.groups():
                for which in ("clean", "corrupt"):
                    model.runner.forward(tok.ids(which, idx).to(model.device), last_only=True)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def spec_tag(spec: SiteSpec) -> str:
    """A folder name for a grid: the kind, plus ``-unit`` when split per unit."""
    return spec.kind + ("-unit" if spec.per_unit and spec.kind not in ("head", "neuron") else "")


def method_dir(method: str) -> str:
    return method.replace("*", "_star")


def run(
    model: Model,
    task: Task | TokenizedTask,
    sites: Sequence[SiteSpec],
    methods: Sequence[str] = METHODS,
    config: CompareConfig | None = None,
    *,
    out_dir: str | Path | None = None,
) -> tuple[dict[str, Any], dict[str, list[Scores]]]:
    """Run ``methods`` on the same task and grids and compare each with exact patching.

    Args:
        model: a loaded model.
        task: a task or tokenized task.
        sites: the grids (one per site kind is typical).
        methods: names from :data:`METHODS` (``exact`` is added if missing: it is the reference).
        config: :class:`CompareConfig`.
        out_dir: save ``<method>/<kind>/`` Scores, ``report.json`` and ``scatter_<method>.png`` there.

    Returns:
        ``(report, scores)``: ``report['kinds'][kind][method]`` has ``pearson``, ``spearman``,
        ``top_k_overlap`` and ``n_cells``; ``report['time_s'][method]`` the wall time of the method
        over all grids and ``report['time_vs_forward_pair']`` the ratio to one clean+corrupt forward
        pair; ``scores[method]`` one :class:`Scores` per grid.

    Raises:
        AttributionError: an unknown method name or no grids.
    """
    cfg = config or CompareConfig()
    specs = list(sites)
    if not specs:
        raise AttributionError("compare needs at least one site grid")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise AttributionError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    order = ["exact"] + [m for m in dict.fromkeys(methods) if m != "exact"]
    tok = task if isinstance(task, TokenizedTask) else task.tokenize(model.tokenizer)
    runners = _runners(model, cfg)
    pairs: list[float] = []
    scores: dict[str, list[Scores]] = {}
    times: dict[str, float] = {}
    for name in order:
        for _ in range(1 if name == "exact" else max(1, cfg.repeats)):
            pairs.append(forward_pair_seconds(model, tok))
            t0 = time.perf_counter()
            scores[name] = runners[name](tok, specs)
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - t0)
    pair = min(pairs)
    kinds: dict[str, dict[str, Any]] = {}
    for j, spec in enumerate(specs):
        ex = scores["exact"][j]
        row: dict[str, Any] = {}
        for name in order[1:]:
            est = scores[name][j]
            ref = reference_for(ex, est)
            row[name] = {
                "pearson": pearson(ref, est.values),
                "spearman": spearman(ref, est.values),
                "top_k_overlap": top_k_overlap(ref, est.values, cfg.top_k),
                "compared_with": "E|effect|" if est.value_name == "contribution" else "effect",
                "n_cells": est.values.numel(),
            }
        kinds[spec_tag(spec)] = row
    report: dict[str, Any] = {
        "task": tok.task.describe(),
        "model": model.describe(),
        "sites": [str(s) for s in specs],
        "config": cfg.__dict__,
        "forward_pair_s": pair,
        "time_s": times,
        "time_vs_forward_pair": {k: v / pair for k, v in times.items()},
        "kinds": kinds,
    }
    if out_dir is not None:
        save(report, scores, specs, out_dir)
    return report, scores


def save(report: dict[str, Any], scores: dict[str, list[Scores]], specs: Sequence[SiteSpec], out_dir: str | Path) -> Path:
    """Write every Scores, ``report.json`` and one scatter PNG per compared method into ``out_dir``."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name, lst in scores.items():
        for spec, s in zip(specs, lst, strict=True):
            s.save(root / method_dir(name) / spec_tag(spec))
    (root / "report.json").write_text(json.dumps(report, indent=2, default=str))
    for name in scores:
        if name != "exact":
            scatter(scores["exact"], scores[name], specs, name, root / f"scatter_{method_dir(name)}.png")
    return root


def scatter(exact: list[Scores], est: list[Scores], specs: Sequence[SiteSpec], name: str, path: Path) -> Path:
    """One panel per site kind: exact (x) against the estimate (y), with the identity line and r."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(specs)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
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
    plt.close(fig)
    return path
