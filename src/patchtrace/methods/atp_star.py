"""AtP* (Kramár et al. 2024): attribution patching without its two false-negative modes.

AtP (:mod:`patchtrace.methods.atp`) linearises the metric around the base run. That misses sites in
two ways, and AtP* fixes each:

* *QK fix* (attention saturation): when a site is a query or key, the attention softmax is recomputed
  exactly and only the step from the pattern onwards is linearised. Query of head ``h`` at position
  ``t``: ``Î = (softmax(q_src,t·K_base/√d) − A_t) · ∂M/∂A_t``. Key of KV head ``g`` at position
  ``s``: for every query head of the group and every query ``t ≥ s``, row ``t`` is recomputed with
  only its logit ``s`` replaced by ``q_t·k_src,s/√d``; the changes are summed. A key site covering
  all positions recomputes every row with all keys replaced (joint, not a sum). Values, head outputs
  and every other kind are linear in the pattern and keep plain AtP.
* *GradDrop* (cancellation between paths): for each layer ``l`` the backward pass is repeated with
  layer ``l``'s contribution to the residual stream stop-gradiented (forward unchanged), and the
  score is ``c(n) = mean_examples( Σ_l |Î_l(n)| / (L − 1) )``: a *magnitude* (value name
  ``contribution``), to be compared with ``E|effect|``. The signed QK-fixed estimate is kept in
  ``extras['signed']``. Implementation: one ordinary backward, then for each ``l`` one
  vector–Jacobian product from layer ``l``'s input down with the gradient that went through the
  block (``g_pre,l − g_post,l``): dropping the block subtracts exactly that, so the L extra passes
  each run only through the layers below ``l`` (about L/2 backward passes in all).

Example:
    Keys of layer 23 (three KV heads under GQA): the QK fix applies, GradDrop gives magnitudes, and the
    signed estimate is kept alongside:

    >>> from patchtrace import load_model, make_task, SiteSpec
    >>> s = run(load_model(), make_task("ioi", n=2), SiteSpec("k", per_unit=True, layers=(23,)), AtPStarConfig())
    >>> s.value_name, s.axes, tuple(s.extras["signed"].shape)
    ('contribution', ('layer', 'kv_head'), (1, 3))
    >>> bool((s.values >= 0).all())                      # magnitudes, to compare with E|effect|
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patchtrace.methods.gradients import (
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
from patchtrace.methods.validate import check_bool, check_direction, check_metric
from patchtrace.models.attention import visible
from patchtrace.models.load import Model
from patchtrace.progress import Progress
from patchtrace.results import Scores
from patchtrace.sites import HookPoint, SiteSpec
from patchtrace.tasks.base import Task, TokenizedTask


@dataclass(frozen=True, kw_only=True)
class AtPStarConfig:
    """Settings of AtP* (keyword-only; checked when built).

    Attributes:
        direction: ``denoise`` or ``noise``, as for :class:`~patchtrace.methods.atp.AtPConfig`.
        metric: metric name.
        qk_fix: recompute the attention softmax exactly for query and key sites.
        grad_drop: average ``|estimate|`` over L backward passes, each dropping one layer's gradient;
            the result is then a magnitude (``contribution``).

    Raises:
        ConfigError: an unknown direction or metric, or a flag that is not a bool.
    """

    direction: Direction = "denoise"
    metric: str = "logit_diff"
    qk_fix: bool = True
    grad_drop: bool = True

    def __post_init__(self) -> None:
        check_direction(self)
        check_metric(self)
        check_bool(self, "qk_fix")
        check_bool(self, "grad_drop")


def qk_fix(
    kind: str, A: Tensor, G: Tensor, q_base: Tensor, k_base: Tensor, q_src: Tensor, k_src: Tensor, scale: float,
    *, window: int | None = None, max_elems: int = 1 << 24,
) -> tuple[Tensor, Tensor | None]:
    """Exact-softmax estimates for query or key sites of one layer.

    Args:
        kind: ``q`` or ``k``.
        A: base attention pattern ``[B, H, T, T]``; G: ``∂M/∂A`` at the base run, same shape.
        q_base, q_src: queries ``[B, T, H, d]``; k_base, k_src: keys ``[B, T, K, d]``.
        scale: the attention scale (``1/√d`` for most families).
        window: the layer's sliding window (None: global causal attention); see
            :func:`patchtrace.models.attention.visible`.
        max_elems: chunk the key fix so no intermediate exceeds this many elements.

    Returns:
        ``(R, joint)``: ``R`` ``[B, T, U]`` per position and unit (query heads for ``q``, KV heads for
        ``k``); ``joint`` ``[B, U]`` the value of patching a unit's keys at all positions at once
        (None for ``q``, where rows are independent and the per-position values add up exactly).
    """
    B, H, T, _ = A.shape
    K = k_base.shape[2]
    rep = H // K
    A, G = A.float(), G.float()
    mask = visible(0, T, window, A.device)  # [query t, key j]
    neg = torch.finfo(torch.float32).min
    D = (A * G).sum(-1)  # [B, H, T]
    kb = k_base.float().repeat_interleave(rep, dim=2)
    if kind == "q":
        S = torch.einsum("bthd,bshd->bhts", q_src.float(), kb) * scale
        Ap = torch.softmax(S.masked_fill(~mask, neg), -1)
        return ((Ap * G).sum(-1) - D).transpose(1, 2), None
    if kind != "k":
        raise AttributionError(f"qk_fix: kind must be 'q' or 'k', not {kind!r}")
    qb = q_base.float()
    ks = k_src.float().repeat_interleave(rep, dim=2)
    S = (torch.einsum("bthd,bshd->bhts", qb, kb) * scale).masked_fill(~mask, neg)  # [B, H, t, j]
    Sn = torch.einsum("bthd,bshd->bhts", qb, ks) * scale  # logit of query t against source key s
    per_s = torch.zeros(B, H, T, device=A.device)
    step = max(1, max_elems // max(1, B * H * T * T))
    ar = torch.arange(T, device=A.device)
    for s0 in range(0, T, step):
        ss = ar[s0 : s0 + step]
        eye = ss[:, None] == ar[None, :]  # [S, j]
        col = Sn[..., ss].permute(0, 1, 3, 2)[..., None]  # [B, H, S, t, 1]
        X = torch.where(eye[None, None, :, None, :], col, S[:, :, None])  # [B, H, S, t, j]
        X = X.masked_fill(~mask[None, None, None], neg)
        fix = (torch.softmax(X, -1) * G[:, :, None]).sum(-1) - D[:, :, None]  # [B, H, S, t]
        fix = fix * mask[:, ss].T  # only queries that can see key s
        per_s[:, :, ss] = fix.sum(-1)
    R = per_s.view(B, K, rep, T).sum(2).transpose(1, 2)  # [B, T, K]
    Aj = torch.softmax(Sn.masked_fill(~mask, neg), -1)
    joint = ((Aj * G).sum(-1) - D).sum(-1).view(B, K, rep).sum(2)  # [B, K]
    return R, joint


def _below(hp: HookPoint, layer: int) -> bool:
    """Does ``hp`` sit below ``layer``'s block (so dropping the block changes its gradient)?"""
    if hp.layer is None:
        return True
    if hp.kind == "resid_pre":
        return hp.layer <= layer
    return hp.layer < layer


def _atp_star_group(model: Model, g: Group, cfg: AtPStarConfig) -> GroupResult:
    L = model.dims.n_layers
    grid_pts = list(g.cells.points)
    qk_pts = [p for p in grid_pts if cfg.qk_fix and p.kind in ("q", "k")]
    qk_layers = sorted({p.layer for p in qk_pts if p.layer is not None})
    qk_need = {HookPoint(k, li) for li in qk_layers for k in ("q", "k")}
    pat = [HookPoint("pattern", li) for li in qk_layers]
    # points whose gradient we need: the grid (q/k replaced by the pattern), plus all resid_pre for GradDrop
    grad_pts = [p for p in grid_pts if p not in qk_pts] + pat
    resid_pts = [HookPoint("resid_pre", li) for li in range(L)] if cfg.grad_drop else []
    grad_pts = list(dict.fromkeys(grad_pts + resid_pts))
    with torch.no_grad():
        src = traced_forward(model, g.src_ids, set(grid_pts) | qk_need, cols=g.cols)
    base = traced_forward(model, g.base_ids, set(grad_pts) | set(grid_pts) | qk_need, cols=g.cols, explicit=bool(pat))
    m = g.score(base.logits)
    inputs = [base.acts[p] for p in grad_pts] + ([base.resid] if cfg.grad_drop else [])
    gl = grads_of(m.sum(), inputs, retain_graph=cfg.grad_drop)
    G = dict(zip(grad_pts, gl, strict=False))
    diff = {p: (src.acts[p] - base.acts[p]).detach() for p in grid_pts}
    scale = model.dims.attn_scale

    def estimate_with(Gx: dict[HookPoint, Tensor]) -> Tensor:
        R: dict[HookPoint, Tensor] = {}
        joint: dict[HookPoint, Tensor] = {}
        for p in grid_pts:
            if p in qk_pts:
                li = p.layer
                r, j = qk_fix(
                    p.kind, base.acts[HookPoint("pattern", li)].detach(), Gx[HookPoint("pattern", li)],
                    base.acts[HookPoint("q", li)].detach(), base.acts[HookPoint("k", li)].detach(),
                    src.acts[HookPoint("q", li)], src.acts[HookPoint("k", li)], scale, window=model.dims.window(li),
                )
                R[p] = r
                if j is not None:
                    joint[p] = j
            else:
                R[p] = product(p.kind, diff[p], Gx[p])
        return g.cells.values(R, joint)

    signed = estimate_with(G)
    src_metric = g.score(src.logits)
    if not cfg.grad_drop:
        return GroupResult(signed, m.detach(), src_metric)
    g_post = [gl[grad_pts.index(HookPoint("resid_pre", li + 1))] if li + 1 < L else gl[-1] for li in range(L)]
    total = torch.zeros_like(signed)
    for li in range(L):
        pre = HookPoint("resid_pre", li)
        delta = G[pre] - g_post[li]  # the gradient that went through block li
        below = [p for p in grad_pts if _below(p, li)]
        vj = grads_of(base.acts[pre], [base.acts[p] for p in below], retain_graph=True, grad_output=delta)
        vjp = dict(zip(below, vj, strict=True))
        Gl: dict[HookPoint, Tensor] = {}
        for p in grad_pts:
            if p in vjp:
                Gl[p] = G[p] - vjp[p]  # for resid_pre[li] itself this is g_post: the skip path
            elif p.layer == li and p.kind not in ("resid_pre", "resid_post"):
                Gl[p] = g_post[li] if p.kind == "resid_mid" else torch.zeros_like(G[p])
            else:
                Gl[p] = G[p]
        total += estimate_with(Gl).abs()
    contrib = total / max(L - 1, 1)
    return GroupResult(contrib, m.detach(), src_metric, extras={"signed": signed})


def run_many(
    model: Model, task: Task | TokenizedTask, sites: Sequence[SiteSpec], config: AtPStarConfig | None = None,
    *, on_progress: Progress | None = None,
) -> list[Scores]:
    """AtP* over several grids at once (shared passes)."""
    cfg = config or AtPStarConfig()
    return estimate(
        model, task, sites, method="atp_star", config=cfg, group_fn=lambda g: _atp_star_group(model, g, cfg),
        value_name="contribution" if cfg.grad_drop else "attribution", on_progress=on_progress,
    )


def run(
    model: Model, task: Task | TokenizedTask, sites: SiteSpec, config: AtPStarConfig | None = None,
    *, on_progress: Progress | None = None,
) -> Scores:
    """AtP* (QK fix and/or GradDrop) of every cell of ``sites``.

    Args:
        model: a loaded model.
        task: a task or tokenized task.
        sites: the grid (same axes as exact activation patching).
        config: :class:`AtPStarConfig`.
        on_progress: ``on_progress(done, total)`` in example groups (:mod:`patchtrace.progress`).

    Returns:
        :class:`Scores`: with GradDrop, magnitudes ``c(n)`` (``value_name='contribution'``) and the
        signed QK-fixed estimate in ``extras['signed']``; without it, signed estimates.
    """
    return single(run_many(model, task, [sites], config, on_progress=on_progress))


register_method(
    "atp_star", AtPStarConfig, run, result=Scores, sweep=False, estimates="activation_patching", run_many=run_many,
    description="AtP*: AtP with the exact softmax for queries/keys (QK fix) and GradDrop magnitudes",
    tiny_config=AtPStarConfig, tiny_inputs=tiny_inputs(SiteSpec("k", per_unit=True, positions="last", layers=(1, 2))),
    plain_baselines=("clean", "corrupt"),
    invalid_configs=({"direction": "sideways"}, {"metric": "accuracy"}, {"qk_fix": 1}, {"grad_drop": "yes"}),
)
