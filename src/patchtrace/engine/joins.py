"""Where a patch's rows join the fast path's staggered batch, and how the engine builds them.

The fast path runs many patches in one batch that starts at the lowest layer any of them touches.
Each patch's rows *join* the batch where they first differ from the base run. The kind table's
``join`` rule (:mod:`patchtrace.kinds`) says where that is:

* ``attn`` (``head``, ``attn_out`` of one layer, sequential blocks): the engine rebuilds that layer's
  attention output from the cached base activations with the interventions applied (the runner's
  ``attn_out`` stage: output projection and any post-norm) and the rows enter the layer's MLP;
* ``mlp`` (``neuron``, ``mlp_out``) and ``resid_post``: the engine rebuilds the layer's output and
  the rows enter the next layer;
* ``generic``: the rows are the base residual stream entering the target layer, and the runner's
  hooks apply the interventions on the way;
* ``embed``: the rows start from the token ids.

A cross-layer write joins at its *target* layer (the source value is read from a recorded run), so
back-patching rides the same path. The block arithmetic used here is the runner's own stages, so a
family's block exists once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from patchtrace.engine.apply import intervention_hook
from patchtrace.engine.cache import RunCache
from patchtrace.engine.patch import Patch
from patchtrace.kinds import kind_info
from patchtrace.models.load import Model
from patchtrace.models.runner import RunCtx
from patchtrace.sites import HookPoint

JoinKey = tuple[int, int, int]


def join_key(patch: Patch, model: Model) -> JoinKey:
    """Where a patch's rows join the staggered batch: ``(layer, stage, shortcut)``.

    ``stage`` 0 = rows enter layer ``layer`` (the runner's ``("pre", layer)`` join), 1 = rows enter its
    MLP (``("mid", layer)``). ``shortcut`` 1 = the engine builds the rows itself from cached base
    activations (2: the patched ``resid_post`` itself, a block of its own so that it never shares the
    rebuilt-MLP rows of ``mlp_out``/``neuron`` patches joining at the same layer); 0 = the rows are the
    base residual stream and the runner's hooks apply the patch.
    Layer -1: rows start from the embeddings. Sorting patches by this key gives the row order.
    """
    layers = {s.layer for s in patch.sites}
    rules = {kind_info(s.kind).join for s in patch.sites}
    if None in layers:
        return (-1, 0, 0)
    if len(layers) == 1:
        (L,) = layers
        assert L is not None
        if rules == {"attn"} and not model.dims.parallel_residual:
            return (L, 1, 1)
        if rules == {"mlp"} or rules == {"resid_post"}:
            return (L + 1, 0, 1 if rules == {"mlp"} else 2)
    return (min(s.layer for s in patch.sites if s.layer is not None), 0, 0)


def is_shortcut(key: JoinKey) -> bool:
    """True when the engine builds the patch's joining rows itself."""
    return key[2] >= 1


def base_points(patches: Sequence[Patch], model: Model) -> set[HookPoint]:
    """Activations the fast path reads from the base run for these patches (record them in ``collect``)."""
    out: set[HookPoint] = set()
    for pt in patches:
        out |= patch_base_points(pt, model)
    return out


def patch_base_points(patch: Patch, model: Model) -> set[HookPoint]:
    """Base-run activations the fast path reads to build one patch's joining rows: the sublayer
    output it rebuilds, the kinds that feed it (from the kind table) and the stream it is added to."""
    key = join_key(patch, model)
    if not is_shortcut(key):
        return set()
    L = patch.start_layer
    rules = {kind_info(s.kind).join for s in patch.sites}
    if rules == {"resid_post"}:
        return {HookPoint("resid_post", L)}
    out = "attn_out" if key[1] == 1 else "mlp_out"
    # a block rebuilds ``out`` from the cached kind that feeds it when one of its patches patches that
    # kind (``joining_rows.sublayer``), else it reads the cached ``out``: the union over a block's
    # patches covers both, and a head sweep keeps no ``attn_out`` (a neuron-free MLP sweep no ``neuron``)
    feeding = {s.kind for s in patch.sites if kind_info(s.kind).feeds == out}
    pts = {HookPoint(k, L) for k in feeding} if feeding else {HookPoint(out, L)}
    if out == "mlp_out":
        pts.add(HookPoint("attn_out", L) if model.dims.parallel_residual else HookPoint("resid_mid", L))
    return pts


def _apply(x: Tensor, block: list[Patch], point: HookPoint, runs: Mapping[str, Any], N: int, ctx: RunCtx) -> Tensor:
    """Apply the block's interventions at ``point`` to rows ``x`` (patch-major)."""
    ents = [(i, iv) for i, pt in enumerate(block) for iv in pt.interventions if iv.target.point == point]
    if not ents:
        return x
    out = intervention_hook(point, ents, runs, N)(x, ctx)
    assert out is not None
    return out


def joining_rows(
    model: Model, base: RunCache, runs: Mapping[str, Any], block: list[Patch], key: JoinKey, p: int, N: int, T: int
) -> Tensor:
    """Build the rows a block of patches (same join key) contributes to the staggered batch.

    The rows are composed from the runner's own stages (``attn_out`` = o_proj + any post-norm,
    ``add_attn``, ``mlp_out``, ``resid_post``), fed with cached base activations and the patch.
    """
    R = len(block)
    L, stage, _ = key
    kinds = {s.kind for pt in block for s in pt.sites}
    ctx = RunCtx(p, T)
    runner = model.runner

    def cached(kind: str, layer: int) -> Tensor:
        t = base.acts[HookPoint(kind, layer)][:, base.local(p):]
        return t.repeat(R, *([1] * (t.dim() - 1)))

    def patched(x: Tensor, kind: str, layer: int) -> Tensor:
        return _apply(x, block, HookPoint(kind, layer), runs, N, ctx)

    def sublayer(out: str, layer: int) -> Tensor:
        """The sublayer output ``out`` with the block's interventions: rebuilt by the runner's stage of
        that name from a patched feeding kind (the kind table's ``feeds``), or the cached one."""
        feeding = [k for k in kinds if kind_info(k).feeds == out]
        if feeding:
            (k,) = feeding
            x = getattr(runner, out)(layer, patched(cached(k, layer), k, layer))
        else:
            x = cached(out, layer)
        return patched(x, out, layer)

    if stage == 1:  # attention side of layer L: rebuild attn_out, join entering its MLP
        return runner.add_attn(cached("resid_pre", L), sublayer("attn_out", L), L)
    Lp = L - 1
    if {kind_info(k).join for k in kinds} == {"resid_post"}:
        return patched(cached("resid_post", Lp), "resid_post", Lp)
    mlp_out = sublayer("mlp_out", Lp)
    if model.dims.parallel_residual:
        return runner.resid_post(cached("resid_pre", Lp), mlp_out, cached("attn_out", Lp))
    return runner.resid_post(cached("resid_mid", Lp), mlp_out, li=Lp)


def joins(
    model: Model, base: RunCache, runs: Mapping[str, Any], chunk: list[Patch], blocks: dict[JoinKey, list[int]],
    p: int, N: int, T: int,
) -> dict[tuple[str, int], Tensor]:
    """Rows per runner join point ``("pre"|"mid", layer)``, in block order (embed patches excluded)."""
    parts: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
    for key, members in sorted(blocks.items()):
        L, stage, _ = key
        if L < 0:
            continue
        block = [chunk[i] for i in members]
        if is_shortcut(key):
            rows = joining_rows(model, base, runs, block, key, p, N, T)
        else:
            rows = base.acts[HookPoint("resid_pre", L)][:, base.local(p):].repeat(len(block), 1, 1)
        parts[("mid" if stage == 1 else "pre", L)].append(rows)
    return {k: torch.cat(v, dim=0) if len(v) > 1 else v[0] for k, v in parts.items()}


__all__ = ["JoinKey", "base_points", "is_shortcut", "join_key", "joining_rows", "joins", "patch_base_points"]
