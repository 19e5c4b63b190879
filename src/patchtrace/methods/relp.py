"""Relevance patching (RelP; Rezaei Jafari et al. 2025), methods.md §3.

The AtP recipe (one source forward, one base forward, one backward) with the gradient replaced by
LRP propagation coefficients:

    RelP(site) = (a_source − a_base) · ĝ(site)|_base

``ĝ`` is the gradient of the metric in a forward whose nonlinear steps use LRP rules, written as
detach tricks so the forward values stay the same and only the backward changes
(:class:`patchtrace.models.runner.LRPRules`):

* LN rule: the LayerNorm/RMSNorm scale is a constant (identity rule through the normalisation);
* identity rule: ``act(x)`` becomes ``x · const(act(x)/x)``, so relevance passes the activation;
* half rule: the gated product ``act(gate)·up`` passes half of the gradient to each factor;
* AH rule / CP-LRP (option): the attention pattern is a constant, all relevance flows through V.

The rules are an argument of that one forward call: nothing is patched on the Hugging Face classes
and the model is left exactly as it was (LXT patches classes process-wide; the authors' fork binds
the activation rule at build time, where it can silently not apply). With every rule on, a Llama-
style model without biases *conserves* relevance: the relevance of every layer's residual stream
sums to the metric (tested).

The default rule set is the authors' (norm, identity, half; AH rule off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from patchtrace.methods.gradients import (
    Direction,
    Group,
    GroupResult,
    estimate,
    grads_of,
    product,
    single,
    traced_forward,
)
from patchtrace.models.load import Model
from patchtrace.models.runner import LRPRules
from patchtrace.results import Scores
from patchtrace.sites import SiteSpec
from patchtrace.tasks.base import Task, TokenizedTask


@dataclass(frozen=True)
class RelPConfig:
    """Settings of relevance patching.

    Attributes:
        direction: ``denoise`` or ``noise`` (as for AtP).
        metric: metric name.
        rules: the LRP rules (default: norm, identity and half rules; attention pattern not frozen).
    """

    direction: Direction = "denoise"
    metric: str = "logit_diff"
    rules: LRPRules = field(default_factory=lambda: LRPRules(attention=False))


def _relp_group(model: Model, g: Group, rules: LRPRules) -> GroupResult:
    pts = list(g.cells.points)
    with torch.no_grad():
        src = traced_forward(model, g.src_ids, pts, cols=g.cols)
    base = traced_forward(model, g.base_ids, pts, cols=g.cols, lrp=rules)
    m = g.score(base.logits)
    grads = grads_of(m.sum(), [base.acts[p] for p in pts])
    R = {p: product(p.kind, src.acts[p] - base.acts[p].detach(), gr) for p, gr in zip(pts, grads, strict=True)}
    return GroupResult(g.cells.values(R), m.detach(), g.score(src.logits))


def run_many(
    model: Model, task: Task | TokenizedTask, sites: Sequence[SiteSpec], config: RelPConfig | None = None
) -> list[Scores]:
    """RelP over several grids sharing one source forward, one LRP base forward and one backward."""
    cfg = config or RelPConfig()
    return estimate(
        model, task, sites, method="relp", config=cfg, direction=cfg.direction, metric=cfg.metric,
        group_fn=lambda g: _relp_group(model, g, cfg.rules),
    )


def run(model: Model, task: Task | TokenizedTask, sites: SiteSpec, config: RelPConfig | None = None) -> Scores:
    """Relevance patching of every cell of ``sites``.

    Args:
        model: a loaded model.
        task: a task or tokenized task.
        sites: the grid.
        config: :class:`RelPConfig`.

    Returns:
        :class:`Scores` of signed effect estimates (``value_name='attribution'``).
    """
    return single(run_many(model, task, [sites], config))
