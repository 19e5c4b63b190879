"""The shared kernel of the gradient-based estimators: AtP, AtP*, integrated gradients, RelP.

All of them estimate the same number as exact activation patching,

    effect(site) = M(base | do(site ← its value in the source run)) − M(base),  averaged over examples,

with one recipe, *activation difference × a backward signal*:

    Î(site) = Σ_components (a_source − a_base) ⊙ ĝ

The sum runs over the components a site covers (the ``d_model`` of a residual-stream site, the
``d_head`` of a head, and, for a whole-layer site, every position and/or unit). The estimators differ
only in ``ĝ``: the plain gradient at the base run (AtP), the gradient averaged along a base → source
path (IG), or the LRP-modified gradient (RelP). The direction is the one of exact patching:
``denoise`` = base corrupt, source clean; ``noise`` = base clean, source corrupt. So a score here and
the ``effect`` of :func:`patchtrace.methods.activation_patching.run` for the same site are directly
comparable, and the grids have exactly the same axes and labels (both use
:func:`~patchtrace.methods.activation_patching.build_grid`).

How gradients with respect to *every* site come out of one backward pass: the runner's embedding is
made a leaf that requires grad, each hook point the grid needs is recorded (not replaced) during the
forward, and :func:`torch.autograd.grad` is asked for the gradient at all of them at once. Nothing is
detached, so gradients of early sites still flow through later ones. Examples are independent rows, so
the gradient of the *sum* of per-example metrics gives every example its own gradient, and the
per-example estimates are kept (``Scores.per_example``).

Examples of different lengths run as separate equal-length groups (:meth:`TokenizedTask.groups`);
negative positions are resolved per group.

Encoders (BERT, RoBERTa; ``model.family.causal`` False): the metric is read at each prompt's one
mask token (:meth:`TokenizedTask.readout`, checked before any forward; ``Group.readout``), not the
last position. Nothing else changes: autograd already gives the gradient at *every* position, and
with bidirectional attention positions after the mask get a non-zero one, as they should (RelP's
norm rule applies to the LayerNorms after each residual add as to any other). AtP*'s key fix assumes
a causal mask and its GradDrop a pre-norm skip path: :func:`check_family` refuses it by name before
any compute (:data:`NOT_FOR_ENCODERS`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from patchtrace.engine.sweep import EngineError, resolve
from patchtrace.grid import Grid
from patchtrace.kinds import gradient_product, needs_explicit_attention
from patchtrace.methods.activation_patching import build_grid, result_labels
from patchtrace.metrics import Metric
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn, LRPRules, RunCtx
from patchtrace.progress import Progress, counter
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import HookPoint, SiteSpec
from patchtrace.tasks.base import Task, TokenizedTask

Direction = Literal["denoise", "noise"]
EMBED = HookPoint("embed", None)


class AttributionError(EngineError):
    """A gradient-based estimate that cannot be computed as asked (names the site or setting)."""


#: Estimators whose definition does not carry over to encoders (bidirectional, post-norm), and why.
NOT_FOR_ENCODERS: dict[str, str] = {
    "atp_star": "its key fix (qk_fix) recomputes each query's softmax under a causal mask, and GradDrop drops a "
                "layer's gradient except the residual skip path, which post-norm blocks route through a LayerNorm "
                "(with qk_fix=False and grad_drop=False it is plain AtP: use atp)",
}


def check_family(model: Model, method: str) -> None:
    """Refuse, before any compute, a method whose definition does not carry over to ``model``'s family.

    Raises:
        AttributionError: an encoder with a method in :data:`NOT_FOR_ENCODERS` (names both and why).
    """
    why = NOT_FOR_ENCODERS.get(method)
    if why is not None and not model.family.causal:
        raise AttributionError(f"{method} does not support {model.family.name} (an encoder: bidirectional attention, "
                               f"post-norm blocks): {why}. On encoders use activation patching, causal tracing, "
                               "AtP, IG or RelP")


# -- one traced forward ----------------------------------------------------------------------------


@dataclass
class Trace:
    """A forward pass whose recorded activations are still part of the autograd graph.

    Attributes:
        acts: the activation at each requested hook point (``[B, ...]``, see :mod:`patchtrace.sites`).
        logits: last-position logits ``[B, V]`` (or ``[B, len(cols)]``); an encoder's: at the readout.
        resid: the residual stream after the last layer ``[B, T, D]`` (before the final norm).
    """

    acts: dict[HookPoint, Tensor]
    logits: Tensor
    resid: Tensor


def traced_forward(
    model: Model,
    ids: Tensor | None,
    points: Iterable[HookPoint],
    *,
    cols: Tensor | None = None,
    lrp: LRPRules | None = None,
    hooks: dict[HookPoint, list[HookFn]] | None = None,
    resid: Tensor | None = None,
    start_layer: int = 0,
    explicit: bool = False,
    readout: Tensor | None = None,
) -> Trace:
    """Run the model once, recording ``points`` without detaching them.

    When grad mode is on and the run starts from ``ids``, the embedding is turned into a leaf that
    requires grad (after any ``hooks`` at ``embed`` ran), so every later activation is differentiable.

    Args:
        model: the model.
        ids: ``[B, T]`` token ids (None when ``resid`` is given).
        points: hook points to record.
        cols: compute only these vocabulary columns of the logits.
        lrp: LRP rules for this call (RelP).
        hooks: extra hooks run before the recorders (e.g. an interpolation).
        resid: start from this residual stream entering ``start_layer``.
        start_layer: first layer to run when ``resid`` is given.
        explicit: compute attention patterns explicitly (needed to record ``pattern``).
        readout: ``[N]`` positions to read the logits at, row ``r`` reading ``readout[r % N]`` (an
            encoder's mask positions). None: the last position; an encoder then reads the one mask
            token of each row of ``ids`` (:func:`mask_readout`).
    """
    pts = set(points)
    acts: dict[HookPoint, Tensor] = {}
    all_hooks: dict[HookPoint, list[HookFn]] = defaultdict(list)
    for hp, fns in (hooks or {}).items():
        all_hooks[hp].extend(fns)
    if resid is None and torch.is_grad_enabled():

        def leaf(x: Tensor, ctx: RunCtx) -> Tensor:
            return x if x.requires_grad else x.detach().requires_grad_(True)

        all_hooks[EMBED].append(leaf)

    def recorder(hp: HookPoint) -> HookFn:
        def fn(x: Tensor, ctx: RunCtx) -> None:
            acts[hp] = x

        return fn

    for hp in pts:
        all_hooks[hp].append(recorder(hp))
    explicit = explicit or needs_explicit_attention(hp.kind for hp in pts)
    if readout is None and ids is not None and not model.family.causal:
        readout = mask_readout(model, ids)
    out = model.runner.forward(
        ids, resid=resid, start_layer=start_layer, hooks=all_hooks, last_only=True, unembed_cols=cols,
        lrp=lrp, explicit_attention=explicit, readout=readout,
    )
    assert out.logits is not None
    missing = pts - set(acts)
    if missing:
        raise AttributionError(f"the forward pass never reached {sorted(map(str, missing))}")
    return Trace(acts, out.logits[:, -1], out.resid)


def mask_readout(model: Model, ids: Tensor) -> Tensor:
    """``[B]``: the position of the one mask token in each row of ``ids`` (an encoder's readout).

    The rows are prompts :meth:`TokenizedTask.readout` already checked (one mask token each), or
    repeats of them; this finds it again for callers that pass only the ids.

    Raises:
        AttributionError: a tokenizer without a mask token, or a row with none or several.
    """
    mask_id = getattr(model.tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise AttributionError(f"{model.family.name} is read at its mask token, but the model has no tokenizer with "
                               "one: pass readout= positions")
    hits = ids == mask_id
    n = hits.sum(1)
    if bool((n != 1).any()):
        r = int((n != 1).nonzero()[0, 0])
        raise AttributionError(f"row {r} has {int(n[r])} mask tokens; {model.family.name} is read at exactly one")
    return hits.int().argmax(1)


def grads_of(
    value: Tensor, inputs: Sequence[Tensor], *, retain_graph: bool = False, grad_output: Tensor | None = None
) -> list[Tensor]:
    """``d value / d input`` for each input (zeros where the input does not reach ``value``).

    With ``grad_output`` (same shape as ``value``) this is the vector–Jacobian product instead.
    """
    gs = torch.autograd.grad(
        value, list(inputs), grad_outputs=grad_output, retain_graph=retain_graph, allow_unused=True
    )
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs, strict=True)]


def product(kind: str, diff: Tensor, grad: Tensor) -> Tensor:
    """``diff ⊙ grad`` summed over the feature axis, laid out ``[B, T, U]``: the kind table's rule
    (:func:`patchtrace.kinds.gradient_product`)."""
    return gradient_product(kind, diff, grad)


# -- grids and cells ----------------------------------------------------------------------------------


@dataclass
class CellMap:
    """Where each cell of one or more grids reads its value, for one group of equal-length examples.

    Per hook point: the cells there, their position (``T`` = all positions) and unit (``U`` = all
    units) indices into the extended ``[B, T+1, U+1]`` table built by :meth:`values`.
    """

    T: int
    n_cells: int
    entries: dict[HookPoint, tuple[Tensor, Tensor, Tensor]]  # cell ids, pos idx, unit idx

    @property
    def points(self) -> set[HookPoint]:
        return set(self.entries)

    def positions(self, hp: HookPoint) -> list[int] | None:
        """Absolute positions the cells at ``hp`` touch (None: some cell covers all positions)."""
        pos = self.entries[hp][1]
        if bool((pos == self.T).any()):
            return None
        return sorted(set(pos.tolist()))

    def values(self, R: dict[HookPoint, Tensor], joint: dict[HookPoint, Tensor] | None = None) -> Tensor:
        """Cell values ``[B, n_cells]`` from per-point tables ``R[hp]`` ``[B, T, U]``.

        A cell over all positions sums the table over positions, unless ``joint[hp]`` ``[B, U]`` gives
        the value of patching every position at once (AtP*'s key fix, which is not additive).
        """
        some = next(iter(R.values()))
        out = torch.zeros(some.shape[0], self.n_cells, dtype=torch.float32, device=some.device)
        for hp, (cells, pos, unit) in self.entries.items():
            r = R[hp].float()
            U = r.shape[2]
            all_pos = r.sum(1, keepdim=True)
            if joint is not None and hp in joint:
                all_pos = joint[hp].float()[:, None, :]
            x = torch.cat((r, all_pos), 1)
            x = torch.cat((x, x.sum(2, keepdim=True)), 2)  # [B, T+1, U+1]
            u = torch.where(unit < 0, torch.full_like(unit, U), unit)
            out[:, cells] = x[:, pos, u]
        return out


def cell_map(model: Model, grids: Sequence[Grid], T: int) -> CellMap:
    """Resolve the sites of ``grids`` (concatenated, in order) for prompts of ``T`` tokens."""
    per: dict[HookPoint, tuple[list[int], list[int], list[int]]] = defaultdict(lambda: ([], [], []))
    c = 0
    for g in grids:
        for s in g.sites():
            r = resolve(s, model, T)
            ids, pos, unit = per[r.point]
            ids.append(c)
            pos.append(T if r.pos is None else r.pos)
            unit.append(-1 if r.unit is None else r.unit)
            c += 1
    entries = {hp: (torch.tensor(a), torch.tensor(b), torch.tensor(u)) for hp, (a, b, u) in per.items()}
    return CellMap(T, c, entries)


# -- the driver shared by every estimator --------------------------------------------------------------


@dataclass
class Group:
    """One equal-length group of examples, as an estimator sees it.

    Attributes:
        idx: example indices in the task.
        base_ids, src_ids: ``[B, T]`` ids of the base run (the one patched) and the source run.
        cols: the vocabulary columns the metric reads (None: all).
        cells: the cell map of the requested grids.
        score: per-example metric of last-position logits; accepts ``k·B`` rows (repeats examples).
        readout: ``[B]`` mask positions the metric reads (encoders); None: the last position.
    """

    idx: list[int]
    base_ids: Tensor
    src_ids: Tensor
    cols: Tensor | None
    cells: CellMap
    score: Callable[[Tensor], Tensor]
    readout: Tensor | None = None


@dataclass
class GroupResult:
    """What an estimator returns for one group: cell values per example, and the two baselines."""

    values: Tensor  # [B, n_cells]
    base_metric: Tensor  # [B]
    src_metric: Tensor  # [B]
    extras: dict[str, Tensor] = field(default_factory=dict)  # each [B, n_cells]


def _scorer(model: Model, metric: Metric, answer: Tensor, wrong: Tensor, ref: Tensor | None) -> tuple[Tensor | None, Callable[[Tensor], Tensor]]:
    cols = metric.columns(answer, wrong)
    B = answer.shape[0]

    def score(logits: Tensor) -> Tensor:
        reps = logits.shape[0] // B
        r = ref.repeat(reps, 1) if ref is not None else None
        return metric.score(logits, answer.repeat(reps, 1), wrong.repeat(reps, 1), r, cols)

    return cols, score


def estimate(
    model: Model,
    task: Task | TokenizedTask,
    sites: SiteSpec | Sequence[SiteSpec],
    *,
    method: str,
    config: Any,
    group_fn: Callable[[Group], GroupResult],
    value_name: str = "attribution",
    on_progress: Progress | None = None,
) -> list[Scores]:
    """Run ``group_fn`` over every example group and assemble one :class:`Scores` per site spec.

    Args:
        model, task: as for :func:`patchtrace.methods.activation_patching.run`.
        sites: one grid or several (estimated together, sharing the forward/backward passes).
        method: name recorded in provenance.
        config: the estimator's config (recorded in provenance); its ``direction`` (``denoise`` or
            ``noise``, already checked when it was built) and ``metric`` are used.
        group_fn: the estimator for one group.
        value_name: ``attribution`` (signed effect estimate) or ``contribution`` (magnitude).
        on_progress: ``on_progress(done, total)`` in example groups (one call per group).

    Returns:
        One :class:`Scores` per spec, with the axes and labels of exact activation patching.

    Raises:
        AttributionError: no grids; EngineError/TaskError for bad sites or tasks.
    """
    direction: str = config.direction
    metric: str = config.metric
    specs = [sites] if isinstance(sites, SiteSpec) else list(sites)
    if not specs:
        raise AttributionError("no site grids given")
    check_family(model, method)
    tok = task if isinstance(task, TokenizedTask) else task.tokenize(model.tokenizer)
    m = Metric(metric)
    grids = [build_grid(model, s, tok) for s in specs]
    sizes = [len(g) for g in grids]
    n_total = sum(sizes)
    N = len(tok)
    per_ex = torch.zeros(N, n_total)
    extras: dict[str, Tensor] = {}
    clean_m, corrupt_m = torch.zeros(N), torch.zeros(N)
    dev = model.device
    groups = tok.groups()
    # an encoder's mask positions, every group's checked before the first forward
    readouts = [tok.readout(idx, mask=not model.family.causal) for idx in groups]
    tick = counter(on_progress, len(groups))
    for idx, ro in zip(groups, readouts, strict=True):
        ids_c, ids_k = tok.ids("clean", idx).to(dev), tok.ids("corrupt", idx).to(dev)
        answer, wrong = tok.answer[idx].to(dev), tok.wrong[idx].to(dev)
        ro = ro.to(dev) if ro is not None else None
        ref = None
        if m.name == "kl":
            with torch.no_grad():
                ref = torch.log_softmax(traced_forward(model, ids_c, (), readout=ro).logits.float(), -1)
        cols, score = _scorer(model, m, answer, wrong, ref)
        base_ids, src_ids = (ids_k, ids_c) if direction == "denoise" else (ids_c, ids_k)
        g = Group(list(idx), base_ids, src_ids, cols, cell_map(model, grids, ids_c.shape[1]), score, ro)
        res = group_fn(g)
        per_ex[idx] = res.values.detach().float().cpu()
        for k, v in res.extras.items():
            extras.setdefault(k, torch.zeros(N, n_total))[idx] = v.detach().float().cpu()
        b, s = res.base_metric.detach().float().cpu(), res.src_metric.detach().float().cpu()
        (corrupt_m if direction == "denoise" else clean_m)[idx] = b
        (clean_m if direction == "denoise" else corrupt_m)[idx] = s
        tick(1)
    return _assemble(model, tok, specs, grids, per_ex, extras, (clean_m, corrupt_m), method, config, value_name)


def _assemble(
    model: Model, tok: TokenizedTask, specs: Sequence[SiteSpec], grids: Sequence[Grid], per_ex: Tensor,
    extras: dict[str, Tensor], baselines: tuple[Tensor, Tensor], method: str, config: Any, value_name: str,
) -> list[Scores]:
    """Cut the concatenated per-example cell values back into one :class:`Scores` per grid."""
    clean_m, corrupt_m = baselines
    N = len(tok)
    out = []
    c0 = 0
    for spec, grid in zip(specs, grids, strict=True):
        n = len(grid)
        pe = per_ex[:, c0 : c0 + n].reshape(N, *grid.shape)
        ex = {k: v[:, c0 : c0 + n].reshape(N, *grid.shape).mean(0) for k, v in extras.items()}
        ex.update({"clean_per_example": clean_m, "corrupt_per_example": corrupt_m})
        prov = make_provenance(model, tok.task, method, config)
        prov["sites"] = str(spec)
        prov["direction"] = config.direction
        out.append(
            Scores(
                values=pe.mean(0), axes=grid.axes, site_kind=spec.kind, value_name=value_name,
                metric=config.metric,
                baselines={"clean": float(clean_m.mean()), "corrupt": float(corrupt_m.mean())},
                labels=result_labels(grid, tok), per_example=pe, extras=ex, provenance=prov,
            )
        )
        c0 += n
    return out


def single(scores: list[Scores]) -> Scores:
    """The one Scores of a single-spec :func:`estimate` call."""
    return scores[0]


def tiny_inputs(spec: SiteSpec) -> Callable[[Model], tuple[Task, SiteSpec]]:
    """A registry ``tiny_inputs`` for an estimator: two IOI examples and the grid ``spec``."""

    def make(model: Model) -> tuple[Task, SiteSpec]:
        from patchtrace.tasks import make_task

        return make_task("ioi", n=2, seed=0), spec

    return make
