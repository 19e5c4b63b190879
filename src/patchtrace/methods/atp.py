"""Attribution patching (AtP; Nanda 2023): every site's patching effect from one backward pass.

Exact activation patching pays one patched forward per site. AtP replaces each by a first-order
Taylor estimate around the base run, so with one source forward, one base forward and one backward
pass it scores every site of a grid at once:

    Î(site) = (a_source − a_base) · ∂M/∂a |_base

(denoising: base = corrupt, source = clean, the TransformerLens demo's form; noising: base = clean,
source = corrupt, Kramár's form). The estimate is of the same ``effect`` exact patching measures, on
the same grid, so the two are directly comparable (:mod:`patchtrace.methods.compare`). Where the
metric is far from linear in a site (attention saturation, cancelling paths) AtP has false
negatives; :mod:`patchtrace.methods.atp_star` fixes the two main modes.

Example:
    One backward pass scores every head of layer 23; the estimate ranks the same head first as exact
    patching does (:mod:`patchtrace.methods.activation_patching`):

    >>> from patchtrace import load_model, make_task, SiteSpec
    >>> s = run(load_model(), make_task("ioi", n=2), SiteSpec("head", per_unit=True, layers=(23,)))
    >>> s.value_name, tuple(s.values.shape)
    ('attribution', (1, 9))
    >>> str(s.top_k(1)[0][0])
    'head[23].h3@-1'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchtrace.methods.gradients import (
    Direction,
    Group,
    GroupResult,
    estimate,
    grads_of,
    product,
    single,
    tiny_inputs,
    traced_forward,
)
from patchtrace.methods.registry import register_method
from patchtrace.methods.validate import check_direction, check_metric
from patchtrace.models.load import Model
from patchtrace.progress import Progress
from patchtrace.results import Scores
from patchtrace.sites import SiteSpec
from patchtrace.tasks.base import Task, TokenizedTask


@dataclass(frozen=True, kw_only=True)
class AtPConfig:
    """Settings of attribution patching (keyword-only; checked when built).

    Attributes:
        direction: ``denoise`` (gradient at the corrupt run × (clean − corrupt)) or ``noise``.
        metric: metric name (:data:`patchtrace.metrics.METRICS`).

    Raises:
        ConfigError: an unknown direction or metric.
    """

    direction: Direction = "denoise"
    metric: str = "logit_diff"

    def __post_init__(self) -> None:
        check_direction(self)
        check_metric(self)


def _atp_group(model: Model, g: Group) -> GroupResult:
    pts = list(g.cells.points)
    with torch.no_grad():
        src = traced_forward(model, g.src_ids, pts, cols=g.cols)
    base = traced_forward(model, g.base_ids, pts, cols=g.cols)
    m = g.score(base.logits)
    grads = grads_of(m.sum(), [base.acts[p] for p in pts])
    R = {p: product(p.kind, src.acts[p] - base.acts[p].detach(), gr) for p, gr in zip(pts, grads, strict=True)}
    return GroupResult(g.cells.values(R), m.detach(), g.score(src.logits))


def run_many(
    model: Model, task: Task | TokenizedTask, sites: Sequence[SiteSpec], config: AtPConfig | None = None,
    *, on_progress: Progress | None = None,
) -> list[Scores]:
    """AtP over several grids sharing one source forward, one base forward and one backward."""
    cfg = config or AtPConfig()
    return estimate(
        model, task, sites, method="atp", config=cfg, group_fn=lambda g: _atp_group(model, g), on_progress=on_progress
    )


def run(
    model: Model, task: Task | TokenizedTask, sites: SiteSpec, config: AtPConfig | None = None,
    *, on_progress: Progress | None = None,
) -> Scores:
    """Attribution patching of every cell of ``sites``.

    Args:
        model: a loaded model.
        task: a task or tokenized task.
        sites: the grid (same axes as exact activation patching).
        config: :class:`AtPConfig`.
        on_progress: ``on_progress(done, total)`` in example groups (:mod:`patchtrace.progress`).

    Returns:
        :class:`Scores` of signed effect estimates (``value_name='attribution'``).
    """
    return single(run_many(model, task, [sites], config, on_progress=on_progress))


register_method(
    "atp", AtPConfig, run, result=Scores, sweep=False, estimates="activation_patching", run_many=run_many,
    description="attribution patching: (a_source − a_base) · gradient, every site from one backward",
    tiny_config=AtPConfig, tiny_inputs=tiny_inputs(SiteSpec("head", per_unit=True, positions="last", layers=(0, 2))),
    plain_baselines=("clean", "corrupt"),
    invalid_configs=({"direction": "sideways"}, {"metric": "accuracy"}),
)
