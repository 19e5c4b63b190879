"""Relevance patching (RelP; Rezaei Jafari et al. 2025).

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

Encoders (BERT, RoBERTa) take the same rules (the LN rule is stated for a LayerNorm wherever it
sits): the LayerNorms after each residual add and in the MLM head are norms like any other, the
head's activation takes the identity rule, and the metric is read at the mask token. With biases
and post-norms, relevance is not conserved exactly there.
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
    tiny_inputs,
    traced_forward,
)
from patchtrace.methods.registry import register_method
from patchtrace.methods.validate import check_direction, check_instance, check_metric
from patchtrace.models.load import Model
from patchtrace.models.runner import LRPRules
from patchtrace.progress import Progress
from patchtrace.results import Scores
from patchtrace.sites import SiteSpec
from patchtrace.tasks.base import Task, TokenizedTask


@dataclass(frozen=True, kw_only=True)
class RelPConfig:
    """Settings of relevance patching (keyword-only; checked when built).

    Attributes:
        direction: ``denoise`` or ``noise`` (as for AtP).
        metric: metric name.
        rules: the LRP rules (default: norm, identity and half rules; attention pattern not frozen).

    Raises:
        ConfigError: an unknown direction or metric, or ``rules`` that are not :class:`LRPRules`.
    """

    direction: Direction = "denoise"
    metric: str = "logit_diff"
    rules: LRPRules = field(default_factory=lambda: LRPRules(attention=False))

    def __post_init__(self) -> None:
        check_direction(self)
        check_metric(self)
        check_instance(self, "rules", LRPRules)


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
    model: Model, task: Task | TokenizedTask, sites: Sequence[SiteSpec], config: RelPConfig | None = None,
    *, on_progress: Progress | None = None,
) -> list[Scores]:
    """RelP over several grids sharing one source forward, one LRP base forward and one backward."""
    cfg = config or RelPConfig()
    return estimate(
        model, task, sites, method="relp", config=cfg, group_fn=lambda g: _relp_group(model, g, cfg.rules),
        on_progress=on_progress,
    )


def run(
    model: Model, task: Task | TokenizedTask, sites: SiteSpec, config: RelPConfig | None = None,
    *, on_progress: Progress | None = None,
) -> Scores:
    """Relevance patching of every cell of ``sites``.

    Args:
        model: a loaded model.
        task: a task or tokenized task.
        sites: the grid.
        config: :class:`RelPConfig`.
        on_progress: ``on_progress(done, total)`` in example groups (:mod:`patchtrace.progress`).

    Returns:
        :class:`Scores` of signed effect estimates (``value_name='attribution'``).
    """
    return single(run_many(model, task, [sites], config, on_progress=on_progress))


register_method(
    "relp", RelPConfig, run, result=Scores, sweep=False, estimates="activation_patching", run_many=run_many,
    description="relevance patching: AtP with LRP propagation rules in place of the plain gradient",
    tiny_config=RelPConfig, tiny_inputs=tiny_inputs(SiteSpec("mlp_out", positions="last")),
    plain_baselines=("clean", "corrupt"),
    invalid_configs=({"direction": "sideways"}, {"metric": "accuracy"}, {"rules": "lrp"}),
)
