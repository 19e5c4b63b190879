"""Turning interventions into tensor writes: the one place that does index arithmetic on activations.

The runner calls hook functions ``fn(x, ctx)`` at each hook point (:mod:`patchtrace.models.runner`).
:func:`intervention_hook` builds such a function from interventions on the sites of one hook point.
Batch rows are *patch-major*: rows ``i·N .. i·N + N − 1`` belong to patch ``i`` (``N`` examples), so
one hook serves a whole batch of patches. ``ctx.pos_offset`` says which absolute positions ``x``
holds (the fast path computes only a suffix of the prompt), so a write at position ``t`` lands in
column ``t − offset``.

Two paths, same numbers:

* the *vectorized* path, for the common case — replace from the default source run at the target
  site, one position (and one unit, for kinds that have units) — writes every patch of the batch
  with one advanced-indexing assignment (a 46,080-neuron sweep would otherwise loop in Python);
* the *general* path reads each intervention's source value (another layer, position or run, or a
  permutation of examples), applies its operation and writes it.

Where positions and units sit in each kind's activation comes from the kind table
(:mod:`patchtrace.kinds`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceError
from patchtrace.interventions import Add, Intervention, LogitBias, Mean, Mix, Replace, Resample, Zero
from patchtrace.kinds import kind_info
from patchtrace.models.runner import HookFn, RunCtx
from patchtrace.sites import HookPoint, Site


class ApplyError(PatchtraceError, ValueError):
    """An intervention whose source was not recorded, or whose tensor does not fit (names it)."""


def _canon(x: Tensor, kind: str) -> Tensor:
    """A view with positions at dim 1 and units (if any) at dim 2."""
    return x.transpose(1, 2) if kind_info(kind).pos_dim == 2 else x


def select(acts: Tensor, site: Site, pos0: int = 0) -> Tensor:
    """The values of ``site`` in a recorded ``[N, ...]`` activation: ``[N, *feature]`` at one
    position, ``[N, T, *feature]`` for all positions (a unit, if given, is selected too).

    ``pos0``: the first position the recording holds (:attr:`~patchtrace.engine.cache.RunCache.pos0`);
    ``site.pos`` is absolute."""
    t = _canon(acts, site.kind)
    if site.unit is not None:
        t = t.select(2, site.unit)
    if site.pos is not None:
        if site.pos < pos0:
            raise ApplyError(f"{site}: position {site.pos} was not recorded (the run keeps positions {pos0}..)")
        t = t.select(1, site.pos - pos0)
    return t


def source_value(iv: Intervention, runs: Mapping[str, Any], n_examples: int) -> Tensor | None:
    """The value an intervention reads from its source run, ``[N, ...]`` (None: it needs none).

    ``runs`` maps run names to caches with an ``acts`` dict (:class:`~patchtrace.engine.sweep.RunCache`).

    Raises:
        ApplyError: the run or the source site's hook point was not recorded.
    """
    s = iv.source_site
    if s is None or iv.source is None:
        return None
    run = runs.get(iv.source.run)
    if run is None:
        raise ApplyError(f"{iv}: no run named {iv.source.run!r} (runs: {', '.join(runs)})")
    acts = run.acts.get(s.point)
    if acts is None:
        raise ApplyError(f"{iv}: the {iv.source.run!r} run did not record {s.point}; cannot read {s}")
    pos0 = getattr(run, "pos0", 0)
    v = select(acts, s, pos0)
    if s.pos is None and pos0 > 0:  # all positions from a trimmed run: absolute positions again
        v = torch.cat((v.new_zeros(v.shape[0], pos0, *v.shape[2:]), v), dim=1)
    if isinstance(iv.op, Resample):
        if len(iv.op.order) != n_examples or max(iv.op.order) >= v.shape[0]:
            raise ApplyError(f"{iv}: resample order has {len(iv.op.order)} entries for {n_examples} examples "
                             f"drawn from {v.shape[0]}")
        v = v[torch.tensor(iv.op.order, device=v.device)]
    return v


def _fit(t: Tensor, cur: Tensor, has_pos: bool, off: int, n: int, what: str, iv: Intervention) -> Tensor:
    """Broadcast an Add/Mean tensor onto ``cur`` (``[N, *f]`` or ``[N, n, *f]``): see the shapes in
    :mod:`patchtrace.interventions`."""
    feat = cur.dim() - (1 if has_pos else 2)
    t = t.to(device=cur.device, dtype=cur.dtype)
    if has_pos:
        if t.dim() in (feat, feat + 1):
            return t
    else:
        if t.dim() == feat:
            return t
        if t.dim() == feat + 1:
            return t[off : off + n]
        if t.dim() == feat + 2:
            return t[:, off : off + n]
    raise ApplyError(f"{iv}: {what} tensor of shape {tuple(t.shape)} does not fit values of shape {tuple(cur.shape)}")


def new_value(iv: Intervention, cur: Tensor, src: Tensor | None, off: int = 0) -> Tensor:
    """The value ``iv`` writes, given the current target value ``cur`` (``[N, *f]`` at one position
    or ``[N, n, *f]`` over the computed positions ``off .. off + n − 1``) and its source value."""
    has_pos = iv.target.pos is not None
    n = 1 if has_pos else cur.shape[1]
    if src is not None and not has_pos:
        src = src[:, off : off + n]
    op = iv.op
    if isinstance(op, (Replace, Resample)):
        assert src is not None
        return src.to(cur.dtype).expand_as(cur)
    if isinstance(op, Mix):
        assert src is not None
        w = op.weight
        return cur + (w if not isinstance(w, Tensor) else w.to(cur.dtype)) * (src.to(cur.dtype) - cur)
    if isinstance(op, Zero):
        return torch.zeros_like(cur)
    if isinstance(op, Add):
        return cur + _fit(op.vector, cur, has_pos, off, n, "add", iv)
    if isinstance(op, Mean):
        return _fit(op.reference, cur, has_pos, off, n, "mean", iv).expand_as(cur)
    if isinstance(op, LogitBias):
        b = op.bias.to(device=cur.device, dtype=torch.float32)
        K = cur.shape[-1]
        if b.shape[-1] > K:
            raise ApplyError(f"{iv}: bias over {b.shape[-1]} keys but the pattern has {K}")
        b = torch.nn.functional.pad(b, (0, K - b.shape[-1]))
        w = cur.float() * b.exp()
        return (w / w.sum(-1, keepdim=True)).to(cur.dtype)
    raise ApplyError(f"{iv}: unknown operation {op!r}")


def _vectorizable(iv: Intervention) -> bool:
    """Replace or Mix from the target site of a run, at one position (and one unit where the kind has
    units): one advanced-indexing write serves all of them."""
    info = kind_info(iv.target.kind)
    same_site = iv.source is not None and iv.source.site in (None, iv.target)
    return (
        same_site and isinstance(iv.op, (Replace, Mix)) and iv.target.pos is not None and iv.target.pos >= 0
        and (iv.target.unit is not None or not info.has_units)
    )


def intervention_hook(
    point: HookPoint,
    entries: Sequence[tuple[int, Intervention]],
    runs: Mapping[str, Any],
    n_examples: int,
    n_patches: int = -1,
) -> HookFn:
    """A hook applying ``entries`` — ``(patch row block i, intervention)`` — at ``point``.

    Args:
        point: the hook point every entry's target lives at.
        entries: interventions with the patch (row block) each belongs to; positions absolute.
        runs: recorded runs by name (``"source"``, ``"base"`` ...).
        n_examples: ``N``, the rows of one patch.
        n_patches: patches in the batch (-1: ``x.shape[0] // N``, for batches whose rows join
            part-way through the layers).

    Raises:
        ApplyError: an entry whose target is not at ``point``, or whose source was not recorded.
    """
    N = n_examples
    for _, iv in entries:
        if iv.target.point != point:
            raise ApplyError(f"internal: {iv} is not at {point}")
    fast = [(i, iv) for i, iv in entries if _vectorizable(iv)]
    slow = [(i, iv, source_value(iv, runs, N)) for i, iv in entries if not _vectorizable(iv)]
    by_run: dict[tuple[str, bool], list[tuple[int, Intervention]]] = {}
    for i, iv in fast:
        assert iv.source is not None
        by_run.setdefault((iv.source.run, isinstance(iv.op, Mix)), []).append((i, iv))
    tables: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]] = []
    for (run_name, mix), ivs in by_run.items():
        run = runs.get(run_name)
        if run is None or point not in run.acts:
            raise ApplyError(f"{ivs[0][1]}: the {run_name!r} run did not record {point}")
        dev = run.acts[point].device
        ii = torch.tensor([i for i, _ in ivs], device=dev)
        tt = torch.tensor([iv.target.pos for _, iv in ivs], device=dev)
        uu = torch.tensor([iv.target.unit for _, iv in ivs], device=dev) if ivs[0][1].target.unit is not None else None
        w = _stack_weights([iv.op for _, iv in ivs], dev) if mix else None  # type: ignore[misc]
        tables.append((_canon(run.acts[point], point.kind), ii, tt, tt - getattr(run, "pos0", 0), uu, w))

    def fn(x: Tensor, ctx: RunCtx) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            x = x.clone()  # never write in place into a tensor autograd may have saved
        xv = _canon(x, point.kind)
        P = x.shape[0] // N if n_patches < 0 else n_patches
        xv = xv.unflatten(0, (P, N))
        off, n = ctx.pos_offset, xv.shape[2]
        ar = torch.arange(N, device=x.device)
        for s, ii, tt, ts, uu, w in tables:  # tt: absolute positions; ts: where they sit in the source run
            where = (ii[:, None], ar[None, :], (tt - off)[:, None]) + (() if uu is None else (uu[:, None],))
            val = s[(ar[None, :], ts[:, None]) + (() if uu is None else (uu[:, None],))].to(x.dtype)
            if w is not None:  # mix: cur + w · (val − cur), w per intervention (may require grad)
                cur = xv[where]
                val = cur + w.to(x.dtype).view(-1, *([1] * (cur.dim() - 1))) * (val - cur)
            xv[where] = val
        for i, iv, sv in slow:
            _write(xv, i, iv, sv, off, n)  # (vectorized entries carry absolute positions: resolved upstream)
        return x

    return fn


def _stack_weights(ops: Sequence[Mix], device: torch.device) -> Tensor:
    """Mix weights as one ``[E]`` tensor (a stack of tensor weights keeps their autograd graph)."""
    ws = [o.weight for o in ops]
    if all(isinstance(w, Tensor) for w in ws):
        return torch.stack([w.reshape(()) for w in ws]).to(device)  # type: ignore[union-attr]
    return torch.tensor([float(w) for w in ws], device=device)


def _write(xv: Tensor, i: int, iv: Intervention, src: Tensor | None, off: int, n: int) -> None:
    """Apply one intervention to patch ``i`` of ``xv`` ``[P, N, n, (U,) ...]`` (a negative position
    counts from the end of this call's sequence, ``off + n``)."""
    t, u = iv.target.pos, iv.target.unit
    if t is not None and t < 0:
        t += off + n
    block = xv[i]
    if t is not None:
        if not off <= t < off + n:
            raise ApplyError(f"internal: {iv} writes position {t} outside computed positions {off}..{off + n - 1}")
        view = block[:, t - off] if u is None else block[:, t - off, u]
    else:
        view = block if u is None else block[:, :, u]
    view.copy_(new_value(iv, view, src, off))


def mean_over(acts: Tensor, site: Site) -> Tensor:
    """The mean of ``site`` over the examples of a recorded activation: the :class:`Mean` reference."""
    return select(acts, site).mean(0)


def base_interventions_hooks(
    interventions: Sequence[Intervention], runs: Mapping[str, Any], n_examples: int
) -> dict[HookPoint, list[HookFn]]:
    """Hooks applying the same interventions to every row of a run (e.g. causal tracing's noise,
    present in the noisy base run and in every patched run made from it)."""
    by_point: dict[HookPoint, list[tuple[int, Intervention]]] = {}
    for iv in interventions:
        by_point.setdefault(iv.target.point, []).append((0, iv))
    hooks: dict[HookPoint, list[HookFn]] = {}
    for hp, ents in by_point.items():
        hooks[hp] = [_all_rows_hook(hp, ents, runs, n_examples)]
    return hooks


def _all_rows_hook(point: HookPoint, entries: list[tuple[int, Intervention]], runs: Mapping[str, Any], N: int) -> HookFn:
    inner = intervention_hook(point, entries, runs, N, n_patches=1)

    def one(x: Tensor, ctx: RunCtx) -> Tensor:
        out = inner(x, ctx)
        assert out is not None
        return out

    def fn(x: Tensor, ctx: RunCtx) -> Tensor:
        reps = x.shape[0] // N
        if reps == 1:
            return one(x, ctx)
        return torch.cat([one(x[r * N : (r + 1) * N], ctx) for r in range(reps)], 0)

    return fn


__all__ = [
    "ApplyError",
    "base_interventions_hooks",
    "intervention_hook",
    "mean_over",
    "new_value",
    "select",
    "source_value",
]
