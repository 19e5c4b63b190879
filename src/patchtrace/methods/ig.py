"""Integrated gradients along the base → source interpolation (EAP-IG-style node scores).

AtP linearises at the base run. Integrated gradients average the gradient along the straight path
from the base to the source activations, ``a(α) = a_base + α (a_source − a_base)``, and multiply by
the difference:

    IG(site) = (a_source − a_base) · (1/m) Σ_k ∂M/∂a |_{a(α_k)}

Two paths (``IGConfig.path``):

* ``"inputs"`` (default; EAP-IG): interpolate the *embeddings* of the base and source prompts; every
  site's gradient is read along that one path, so ``m`` batched forward+backward passes score all
  sites. Complete (the scores sum to ``M(source) − M(base)``) for the embedding itself.
* ``"site"``: interpolate the activations *at the scored hook point* (at the positions its cells
  cover, all units together), one hook point at a time, resuming the forward at that layer. Then IG
  is complete for that hook point: the cells' scores add up to the exact effect of patching all of
  them at once, and a grid with one cell per hook point (e.g. ``positions=None`` or one position,
  not split per unit) converges to exact patching as ``steps`` grows. Costs ``m`` passes per point.

Step rule (``IGConfig.rule``): ``"left"`` uses ``α = k/m, k = 0..m−1`` (EAP-IG's convention; it
includes the base endpoint, so ``steps=1`` is AtP); ``"midpoint"`` uses ``α = (k + ½)/m`` (second-order
accurate, converges faster).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from patchtrace.kinds import kind_info
from patchtrace.methods.gradients import (
    EMBED,
    AttributionError,
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
from patchtrace.methods.validate import check_choice, check_direction, check_int, check_metric
from patchtrace.models.load import Model
from patchtrace.models.runner import RunCtx
from patchtrace.progress import Progress
from patchtrace.results import Scores
from patchtrace.sites import HookPoint, SiteSpec
from patchtrace.tasks.base import Task, TokenizedTask


@dataclass(frozen=True, kw_only=True)
class IGConfig:
    """Settings of integrated gradients (keyword-only; checked when built).

    Attributes:
        direction: ``denoise`` (path from corrupt to clean) or ``noise`` (clean to corrupt).
        metric: metric name.
        steps: number of points ``m`` on the path (≥ 1).
        path: ``inputs`` (interpolate embeddings; all sites in one batch) or ``site`` (interpolate each
            scored hook point itself; exact completeness per point).
        rule: ``left`` (α = k/m, EAP-IG) or ``midpoint`` (α = (k+½)/m).

    Raises:
        ConfigError: an unknown direction, metric, path or rule, or ``steps < 1``.
    """

    direction: Direction = "denoise"
    metric: str = "logit_diff"
    steps: int = 5
    path: Literal["inputs", "site"] = "inputs"
    rule: Literal["left", "midpoint"] = "left"

    def __post_init__(self) -> None:
        check_direction(self)
        check_metric(self)
        check_int(self, "steps", low=1)
        check_choice(self, "path", ("inputs", "site"))
        check_choice(self, "rule", ("left", "midpoint"))


def _alphas(cfg: IGConfig, device: torch.device) -> Tensor:
    k = torch.arange(cfg.steps, dtype=torch.float32, device=device)
    return (k + (0.5 if cfg.rule == "midpoint" else 0.0)) / cfg.steps


def _inputs_group(model: Model, g: Group, cfg: IGConfig) -> GroupResult:
    pts = list(g.cells.points)
    m_ = cfg.steps
    B = g.base_ids.shape[0]
    with torch.no_grad():
        src = traced_forward(model, g.src_ids, set(pts) | {EMBED}, cols=g.cols, readout=g.readout)
    e_src = src.acts[EMBED].repeat(m_, 1, 1)
    a = _alphas(cfg, g.base_ids.device).repeat_interleave(B)[:, None, None]

    def interp(x: Tensor, ctx: RunCtx) -> Tensor:
        return x + a.to(x.dtype) * (e_src - x)

    run = traced_forward(model, g.base_ids.repeat(m_, 1), pts, cols=g.cols, readout=g.readout, hooks={EMBED: [interp]})
    vals = g.score(run.logits)
    grads = grads_of(vals.sum(), [run.acts[p] for p in pts])
    if cfg.rule == "left":  # the first B rows are the base run itself (α = 0)
        base_acts = {p: run.acts[p][:B].detach() for p in pts}
        base_metric = vals[:B].detach()
    else:
        with torch.no_grad():
            base = traced_forward(model, g.base_ids, pts, cols=g.cols, readout=g.readout)
        base_acts, base_metric = base.acts, g.score(base.logits)
    R = {
        p: product(p.kind, src.acts[p] - base_acts[p], gr.unflatten(0, (m_, B)).mean(0))
        for p, gr in zip(pts, grads, strict=True)
    }
    return GroupResult(g.cells.values(R), base_metric, g.score(src.logits))


def _site_group(model: Model, g: Group, cfg: IGConfig) -> GroupResult:
    pts = list(g.cells.points)
    m_ = cfg.steps
    B, T = g.base_ids.shape
    L = model.dims.n_layers
    need = set(pts) | {HookPoint("resid_pre", li) for li in range(L)}
    with torch.no_grad():
        src = traced_forward(model, g.src_ids, pts, cols=g.cols, readout=g.readout)
        base = traced_forward(model, g.base_ids, need, cols=g.cols, readout=g.readout)
    a = _alphas(cfg, g.base_ids.device).repeat_interleave(B)
    R: dict[HookPoint, Tensor] = {}
    for p in pts:
        b, s = base.acts[p], src.acts[p]
        pos = g.cells.positions(p)
        pos_ax = kind_info(p.kind).pos_dim
        sel = torch.zeros(T, dtype=torch.bool, device=b.device)
        sel[pos if pos is not None else slice(None)] = True
        shape = [1] * b.dim()
        shape[pos_ax] = T
        d = (s - b) * sel.view(shape)
        path = b.repeat(m_, *[1] * (b.dim() - 1)) + a.view(-1, *[1] * (b.dim() - 1)).to(b.dtype) * d.repeat(
            m_, *[1] * (b.dim() - 1)
        )
        leaf = path.detach().requires_grad_(True)

        def put(x: Tensor, ctx: RunCtx, leaf: Tensor = leaf, p: HookPoint = p) -> Tensor:
            if x.shape != leaf.shape:
                raise AttributionError(f"internal: IG path for {p} has shape {tuple(leaf.shape)}, site {tuple(x.shape)}")
            return leaf

        if p.layer is None:
            run = traced_forward(model, g.base_ids.repeat(m_, 1), (), cols=g.cols, readout=g.readout, hooks={p: [put]})
        else:
            resid = base.acts[HookPoint("resid_pre", p.layer)].repeat(m_, 1, 1)
            run = traced_forward(
                model, None, (), cols=g.cols, readout=g.readout, hooks={p: [put]}, resid=resid, start_layer=p.layer,
            )
        (gr,) = grads_of(g.score(run.logits).sum(), [leaf])
        R[p] = product(p.kind, d, gr.unflatten(0, (m_, B)).mean(0))
    return GroupResult(g.cells.values(R), g.score(base.logits), g.score(src.logits))


def run_many(
    model: Model, task: Task | TokenizedTask, sites: Sequence[SiteSpec], config: IGConfig | None = None,
    *, on_progress: Progress | None = None,
) -> list[Scores]:
    """Integrated gradients over several grids (with ``path='inputs'`` they share every pass)."""
    cfg = config or IGConfig()
    fn = _inputs_group if cfg.path == "inputs" else _site_group
    return estimate(
        model, task, sites, method="ig", config=cfg, group_fn=lambda g: fn(model, g, cfg), on_progress=on_progress
    )


def run(
    model: Model, task: Task | TokenizedTask, sites: SiteSpec, config: IGConfig | None = None,
    *, on_progress: Progress | None = None,
) -> Scores:
    """Integrated-gradients estimate of the patching effect of every cell of ``sites``.

    Args:
        model: a loaded model.
        task: a task or tokenized task.
        sites: the grid.
        config: :class:`IGConfig`.
        on_progress: ``on_progress(done, total)`` in example groups (:mod:`patchtrace.progress`).

    Returns:
        :class:`Scores` of signed effect estimates (``value_name='attribution'``).
    """
    return single(run_many(model, task, [sites], config, on_progress=on_progress))


register_method(
    "ig", IGConfig, run, result=Scores, sweep=False, estimates="activation_patching", run_many=run_many,
    description="integrated gradients: the gradient averaged along the base → source path, × the difference",
    tiny_config=lambda: IGConfig(steps=3), tiny_inputs=tiny_inputs(SiteSpec("resid_pre", positions=[-2, -1])),
    plain_baselines=("clean", "corrupt"),
    invalid_configs=({"direction": "sideways"}, {"metric": "accuracy"}, {"steps": 0}, {"path": "edges"},
                     {"rule": "right"}),
)
