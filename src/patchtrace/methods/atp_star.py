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
  ``extras['signed']``. Implementation (:func:`grad_drop`): one ordinary backward; dropping block
  ``l`` subtracts exactly the gradient that went through it (``g_pre,l − g_post,l``) at its input,
  and the backward is linear, so each dropped gradient is the full one minus that signal carried
  down through the layers below ``l``. All L signals are carried down *together*, one batched
  vector–Jacobian product per block. The work is still ``L(L−1)/2`` block VJPs (about L/2 backward
  passes: GradDrop is exact, not approximated), but in L − 1 calls with tall matrix products.
  That floor, ``(L − 1)/4`` forward pairs for GradDrop alone (7.25 on SmolLM2's 30 layers), is why
  the paper's one knob, the drop *granularity*, is used: by default (``grad_drop_groups=5``) the
  layers are dropped in 5 contiguous groups (:func:`layer_groups`), ``Σ_S |Î_S| / (G − 1)``; the work
  falls to about ``L(G − 1)/2`` block VJPs. A model of at most 5 layers gets per-layer GradDrop
  exactly, and ``grad_drop_groups=None`` always does. On SmolLM2 IOI (BENCHMARKS.md) 5 groups cost
  2.5 forward pairs against 10 for per-layer GradDrop, and agree with it at Pearson ≥ 0.995 and
  Spearman ≥ 0.994 on four grids (their agreement with exact patching differs by ≤ 0.007).

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patchtrace.methods.gradients import (
    AttributionError,
    CellMap,
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
from patchtrace.methods.validate import check_bool, check_direction, check_int, check_metric
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
        grad_drop: average ``|estimate|`` over backward passes that each drop the gradient through one
            layer group (``grad_drop_groups``); the result is then a magnitude (``contribution``).
        grad_drop_groups: drop at most this many contiguous groups of layers in turn (``≥ 2``;
            :func:`layer_groups`; per layer when the model has no more layers than that), or None: per
            layer always (the paper's GradDrop, ``(L − 1)/4`` forward pairs). Module docstring: why 5.

    Raises:
        ConfigError: an unknown direction or metric, or a flag that is not a bool.
    """

    direction: Direction = "denoise"
    metric: str = "logit_diff"
    qk_fix: bool = True
    grad_drop: bool = True
    grad_drop_groups: int | None = 5

    def __post_init__(self) -> None:
        check_direction(self)
        check_metric(self)
        check_bool(self, "qk_fix")
        check_bool(self, "grad_drop")
        check_int(self, "grad_drop_groups", low=2, optional=True)


def layer_groups(L: int, n: int | None) -> list[tuple[int, int]]:
    """``n`` contiguous groups ``(first, last)`` covering layers ``0..L−1``, sizes differing by at most
    one (the larger ones first); one group per layer when ``n`` is None or ``n ≥ L``."""
    if n is None or n >= L:
        return [(li, li) for li in range(L)]
    q, r = divmod(L, n)
    bounds, a = [], 0
    for i in range(n):
        b = a + q + (i < r)
        bounds.append((a, b - 1))
        a = b
    return bounds


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


def _relation(hp: HookPoint, a: int, b: int) -> str:
    """How stop-gradienting blocks ``a..b`` changes the gradient at ``hp``: ``below`` (the dropped
    signal is carried down to it), ``skip`` (inside the group on the residual stream: only the skip
    path is left, the gradient at block ``b``'s output), ``cut`` (inside a dropped block: zero) or
    ``whole`` (above the group: unchanged)."""
    if hp.layer is None:
        return "below"
    j = hp.layer + 1 if hp.kind == "resid_post" else hp.layer  # resid_post j is resid_pre j+1
    if hp.kind in ("resid_pre", "resid_post"):
        return "below" if j <= a else "skip" if j <= b else "whole"
    if j < a:
        return "below"
    if j <= b:
        return "skip" if hp.kind == "resid_mid" else "cut"
    return "whole"


def _inside(hp: HookPoint, layer: int) -> bool:
    """Is ``hp`` inside ``layer``'s block (a block VJP must deliver its gradient)?"""
    return hp.layer == layer and hp.kind not in ("resid_pre", "resid_post")


# estimate(Gx, points, n): cell values [n·B, n_cells] of `points` (zeros elsewhere) from gradients stacked n times
Estimator = Callable[[dict[HookPoint, Tensor], Sequence[HookPoint], int], Tensor]


#: Working memory one batched block VJP may take (a block's widest intermediates are ~8 residual
#: streams per cotangent); beyond it the streams cross the block in several calls (the same numbers).
VJP_BUDGET = 256 << 20


def _vjp(out: Tensor, inputs: Sequence[Tensor], cot: Tensor) -> list[Tensor]:
    """Batched vector–Jacobian products: ``cot`` ``[n, *out.shape]`` → one ``[n, *x.shape]`` per input."""
    step = max(1, VJP_BUDGET // (8 * cot[0].numel() * cot.element_size()))
    parts = [torch.autograd.grad(out, list(inputs), c, retain_graph=True, allow_unused=True, is_grads_batched=True)
             for c in cot.split(step)]
    return [cot if x is out else torch.zeros(cot.shape[:1] + x.shape, dtype=x.dtype, device=x.device) if gs[0] is None
            else torch.cat(gs) for x, gs in zip(inputs, zip(*parts, strict=True), strict=True)]


def grad_drop(
    L: int, carriers: dict[HookPoint, list[HookPoint]], acts: dict[HookPoint, Tensor], G: dict[HookPoint, Tensor],
    g_post: list[Tensor], estimate: Estimator, groups: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """``Σ_S |Î_S|`` over the dropped groups of blocks (default: each block), every dropped gradient
    carried down at once.

    Dropping block ``l`` removes ``δ_l = G[resid_pre l] − g_post,l`` (what flowed back through the
    block) at its input. The backward pass is linear in its cotangent, so below ``l`` the dropped
    gradient is ``G − V_l``, ``V_l`` being ``δ_l`` alone carried down; above ``l`` it is ``G``; inside
    the block it is cut (zero), but for ``resid_mid``, which keeps the skip path ``g_post,l``. The
    ``V_l`` are carried down *together*: crossing block ``k``, the streams ``l > k`` are stacked on a
    leading axis and go through ONE batched vector–Jacobian product on the base run's graph
    (``is_grads_batched``). The work is still ``L(L−1)/2`` single-stream block VJPs, but as ``L − 1``
    calls whose matrix products are up to ``L − 1`` times taller (far better used on a CPU).

    Args:
        L: layers.
        carriers: per point whose gradient the estimates read (a grid point, or the ``pattern`` a
            QK-fixed query/key reads), the grid points reading it.
        acts: the base run's recorded activations, still in its autograd graph (every carrier and
            every ``resid_pre``).
        G: the full gradient at every carrier and every ``resid_pre``.
        g_post: per layer, the full gradient at the block's output.
        estimate: see :data:`Estimator`.
        groups: the dropped units, ``(first, last)`` layer ranges (:func:`layer_groups`); default one
            per layer. Dropping ``a..b`` removes ``G[resid_pre a] − g_post,b`` at block ``a``'s input.

    Returns:
        ``[B, n_cells]``: ``Σ_S |Î_S|`` over the groups.
    """
    pre = [HookPoint("resid_pre", li) for li in range(L)]
    total: Tensor | None = None

    def add(Gx: dict[HookPoint, Tensor], cs: Sequence[HookPoint], n: int, times: int = 1) -> None:
        nonlocal total
        pts = [p for c in cs for p in carriers[c]]
        if not pts or not times:
            return
        v = estimate(Gx, pts, n)
        v = v.view(n, v.shape[0] // n, -1).abs().sum(0) * times
        total = v if total is None else total + v

    def dropped(cs: Sequence[HookPoint], V: Sequence[Tensor]) -> dict[HookPoint, Tensor]:
        return {c: (G[c][None] - v).flatten(0, 1) for c, v in zip(cs, V, strict=True)}

    groups = list(groups) if groups is not None else layer_groups(L, None)
    for c in carriers:  # the groups that leave c's gradient whole, or only its skip path
        rel = [_relation(c, a, b) for a, b in groups]
        add({c: G[c]}, [c], 1, rel.count("whole"))
        for (_, b), r in zip(groups, rel, strict=True):
            if r == "skip":
                add({c: g_post[b]}, [c], 1)
    last = {a: b for a, b in groups}  # a group's first layer → its last
    C: Tensor | None = None  # cotangents at resid_pre k+1 of the groups starting above k, stacked
    for k in range(L - 1, -1, -1):
        if C is not None:
            inner = [c for c in carriers if _inside(c, k)]
            down = k > 0 or any(c.layer is None or c == pre[0] for c in carriers)  # is resid_pre k read below?
            if not (down or inner):
                break
            V = _vjp(acts[pre[k + 1]], [acts[pre[k]]] * down + [acts[c] for c in inner], C)
            add(dropped(inner, V[down:]), inner, C.shape[0])
            if not down:
                break
            C = V[0]
        if k in last:  # the group starting here: its dropped signal enters at its first block's input
            delta = (G[pre[k]] - g_post[last[k]])[None]
            C = delta if C is None else torch.cat((delta, C))
        if C is None:
            continue
        # now every stream of a group starting at k or above, at resid_pre k (also resid_post k-1: one tensor)
        at = [c for c in carriers if c.layer is not None and (c == pre[k] or c == HookPoint("resid_post", k - 1))]
        assert all(acts[c] is acts[pre[k]] for c in at)
        add(dropped(at, [C] * len(at)), at, C.shape[0])
    emb = [c for c in carriers if c.layer is None]
    if emb and C is not None:
        add(dropped(emb, _vjp(acts[pre[0]], [acts[c] for c in emb], C)), emb, C.shape[0])
    assert total is not None
    return total


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

    def carrier(p: HookPoint) -> HookPoint:
        return HookPoint("pattern", p.layer) if p in qk_pts else p

    def estimate_with(Gx: dict[HookPoint, Tensor], pts: Sequence[HookPoint] = grid_pts, n: int = 1) -> Tensor:
        """Cell values of ``pts`` ``[n·B, n_cells]`` from carrier gradients stacked ``n`` times."""

        def rep(t: Tensor) -> Tensor:
            return t.detach() if n == 1 else t.detach().repeat(n, *(1,) * (t.dim() - 1))

        R: dict[HookPoint, Tensor] = {}
        joint: dict[HookPoint, Tensor] = {}
        for p in pts:
            if p in qk_pts:
                li = p.layer
                r, j = qk_fix(
                    p.kind, rep(base.acts[HookPoint("pattern", li)]), Gx[carrier(p)],
                    rep(base.acts[HookPoint("q", li)]), rep(base.acts[HookPoint("k", li)]),
                    rep(src.acts[HookPoint("q", li)]), rep(src.acts[HookPoint("k", li)]), scale,
                    window=model.dims.window(li),
                )
                R[p] = r
                if j is not None:
                    joint[p] = j
            else:
                R[p] = product(p.kind, rep(diff[p]), Gx[p])
        cells = g.cells if pts is grid_pts else CellMap(g.cells.T, g.cells.n_cells, {p: g.cells.entries[p] for p in pts})
        return cells.values(R, joint)

    signed = estimate_with(G)
    src_metric = g.score(src.logits)
    if not cfg.grad_drop:
        return GroupResult(signed, m.detach(), src_metric)
    g_post = [gl[grad_pts.index(HookPoint("resid_pre", li + 1))] if li + 1 < L else gl[-1] for li in range(L)]
    carriers: dict[HookPoint, list[HookPoint]] = {}
    for p in grid_pts:
        carriers.setdefault(carrier(p), []).append(p)
    groups = layer_groups(L, cfg.grad_drop_groups)
    total = grad_drop(L, carriers, base.acts, G, g_post, estimate_with, groups)
    contrib = total / max(len(groups) - 1, 1)
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
    invalid_configs=({"direction": "sideways"}, {"metric": "accuracy"}, {"qk_fix": 1}, {"grad_drop": "yes"},
                     {"grad_drop_groups": 1}, {"grad_drop_groups": 2.5}),
)
