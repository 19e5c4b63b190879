"""The sweep engine: run many exact patches, as few FLOPs as exactness allows.

A *patch* is a set of sites whose activations are replaced, in a *base* run, by their values in a
*source* run (denoising: base = corrupt, source = clean; noising: the reverse). For every patch the
engine returns the metric per example. It is the one place where patched forwards happen; activation
patching, causal tracing, mask evaluation and back-patching all call it.

Why it is fast (and still exact). Patching a site at layer ``L`` and positions ``≥ p`` changes
nothing below layer ``L`` and, with causal attention, nothing at positions ``< p``. So:

(a) **resume at the patched layer**: the run starts from the base run's cached residual stream
    entering layer ``L``;
(b) **suffix only**: only positions ``p..T-1`` are computed, attending to the base run's cached
    keys/values of positions ``< p`` (positions are absolute, so rotary and learned position
    embeddings come out the same);
(c) **many patches per batch**: rows are ``patch × example``; the prefix keys/values are shared;
(d) **answer columns only**: when the metric reads a few logits (logit difference), only those
    columns of the unembedding are computed, at the last position only.

The *plain* path runs every patch as a full forward from the embeddings (still batched); it is used
when ``fast=False`` and serves as the in-library cross-check. The test-suite checks both against an
independent reference written with hooks on the Hugging Face modules.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceError
from patchtrace.metrics import Metric
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn, RunCtx, RunOutput
from patchtrace.sites import HookPoint, Site


class EngineError(PatchtraceError, ValueError):
    """A patch that does not fit the model or the prompts (names the site)."""


# where the position and unit axes are, per kind, in the [B, ...] activation
def _layout(kind: str) -> tuple[int, int | None]:
    if kind == "pattern":
        return 2, 1
    if kind in ("head", "q", "k", "v", "neuron"):
        return 1, 2
    return 1, None


@dataclass
class RunCache:
    """Activations of one run over an equal-length group of examples.

    Attributes:
        acts: full-length activations per hook point, ``[N, T, ...]`` (``pattern``: ``[N, H, T, T]``).
        kv: per layer, keys and values ``[N, K, T, d]``.
        logits: last-position logits ``[N, V]``.
    """

    acts: dict[HookPoint, Tensor]
    kv: list[tuple[Tensor, Tensor]]
    logits: Tensor


def collect(
    model: Model,
    ids: Tensor,
    points: Iterable[HookPoint] = (),
    *,
    hooks: dict[HookPoint, list[HookFn]] | None = None,
) -> RunCache:
    """One forward over ``ids`` ``[N, T]``, recording ``resid_pre`` of every layer, the given points,
    all keys/values, and the last-position logits."""
    n_layers = model.dims.n_layers
    want = set(points) | {HookPoint("resid_pre", i) for i in range(n_layers)}
    acts: dict[HookPoint, Tensor] = {}
    all_hooks: dict[HookPoint, list[HookFn]] = defaultdict(list)
    for hp, fns in (hooks or {}).items():
        all_hooks[hp].extend(fns)

    def rec(hp: HookPoint) -> HookFn:
        def fn(x: Tensor, ctx: RunCtx) -> None:
            acts[hp] = x.detach().clone()

        return fn

    for hp in want:
        all_hooks[hp].append(rec(hp))
    explicit = any(hp.kind == "pattern" for hp in want)
    with torch.no_grad():
        out = model.runner.forward(ids, hooks=all_hooks, keep_kv=True, last_only=True, explicit_attention=explicit)
    assert out.logits is not None and out.kv is not None
    kv = [(k.clone(), v.clone()) for k, v in out.kv if k is not None]  # type: ignore[misc]
    return RunCache(acts, kv, out.logits[:, -1].float())


@dataclass(frozen=True)
class Patch:
    """Sites replaced together (positions absolute and non-negative, or None for all positions)."""

    sites: tuple[Site, ...]

    @property
    def start_layer(self) -> int:
        """First layer the patch touches (-1 for ``embed``)."""
        return min(-1 if s.layer is None else s.layer for s in self.sites)

    @property
    def start_pos(self) -> int:
        return min(0 if s.pos is None else s.pos for s in self.sites)


def resolve(site: Site, model: Model, T: int) -> Site:
    """Check a site against the model and sequence length; make its position absolute."""
    d = model.dims
    if site.layer is not None and not 0 <= site.layer < d.n_layers:
        raise EngineError(f"site {site}: layer {site.layer} out of range (model has {d.n_layers} layers)")
    if site.kind == "resid_mid" and d.parallel_residual:
        raise EngineError(f"site {site}: {model.family.name} blocks are parallel; there is no resid_mid")
    if site.unit is not None:
        n_units = {"neuron": d.d_mlp, "k": d.n_kv_heads, "v": d.n_kv_heads}.get(site.kind, d.n_heads)
        if not 0 <= site.unit < n_units:
            raise EngineError(f"site {site}: unit {site.unit} out of range ({site.kind} has {n_units})")
    pos = site.pos
    if pos is not None:
        if not -T <= pos < T:
            raise EngineError(f"site {site}: position {pos} out of range for prompts of {T} tokens")
        pos %= T
    return Site(site.kind, site.layer, site.unit, pos)


@dataclass
class Scorer:
    """Turns last-position logits of ``P × N`` rows into the metric ``[P, N]``."""

    metric: Metric
    answer: Tensor
    wrong: Tensor
    ref_logprobs: Tensor | None = None
    cols: Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        self.cols = self.metric.columns(self.answer, self.wrong)

    def __call__(self, logits: Tensor, n_patches: int, cols_used: bool) -> Tensor:
        reps = n_patches
        ref = self.ref_logprobs.repeat(reps, 1) if self.ref_logprobs is not None else None
        vals = self.metric.score(
            logits,
            self.answer.repeat(reps, 1),
            self.wrong.repeat(reps, 1),
            ref,
            self.cols if cols_used else None,
        )
        return vals.view(n_patches, -1)


@dataclass
class SweepPlan:
    """How a sweep will run, before it runs (``--dry-run`` prints this)."""

    mode: str
    n_patches: int
    n_examples: int
    rows_per_chunk: int
    n_chunks: int
    forward_equivalents: float
    peak_bytes: int

    def describe(self) -> str:
        return (
            f"mode={self.mode} patches={self.n_patches} examples={self.n_examples} "
            f"chunks={self.n_chunks} (≤{self.rows_per_chunk} rows) "
            f"≈{self.forward_equivalents:.1f} full-forward equivalents, est. peak {self.peak_bytes / 2**20:.0f} MiB"
        )


def row_bytes(model: Model, n: int, T: int, ncols: int | None) -> int:
    """Estimated peak working memory (bytes) of one batch row computing ``n`` positions of a
    ``T``-token prompt: what the runner's stages allocate (:meth:`~patchtrace.models.stages.Stages.row_bytes`)."""
    return model.runner.row_bytes(n, T, ncols, model.dtype)


#: Default ceiling of the working-memory budget. Beyond a few thousand rows per batch a CPU gains
#: nothing from bigger batches, so the default stays small (peak memory no worse than a plain forward loop).
DEFAULT_BUDGET_CAP = 64 << 20


def default_budget(model: Model) -> int:
    """Working-memory budget in bytes: on CPU a quarter of available RAM capped at
    :data:`DEFAULT_BUDGET_CAP`; on CUDA half of the free VRAM. At least 64 MiB."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return max(64 << 20, int(free * 0.5))
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        avail = info.get("MemAvailable", 8 << 30)
    except OSError:
        avail = 8 << 30
    return max(64 << 20, min(DEFAULT_BUDGET_CAP, avail // 4))


def patches_per_chunk(model: Model, n: int, T: int, ncols: int | None, n_examples: int, budget: int) -> int:
    """How many patches (each ``n_examples`` rows of ``n`` positions) fit in ``budget`` bytes.

    Raises:
        EngineError: the budget cannot hold even one patch.
    """
    need = row_bytes(model, n, T, ncols) * n_examples
    if need > budget:
        raise EngineError(
            f"memory budget {budget / 2**20:.0f} MiB cannot hold one patch of {n_examples} examples × {n} positions "
            f"(needs ~{need / 2**20:.0f} MiB); raise max_memory (--max-memory) or use fewer examples"
        )
    return max(1, budget // need)


def plan_sweep(
    model: Model, patches: Sequence[Patch], n_examples: int, T: int, *, fast: bool = True,
    max_memory: int | None = None, ncols: int | None = None,
) -> SweepPlan:
    """Estimate chunks, full-forward equivalents and peak memory of a sweep, without running it.

    Forward equivalents count position-layers computed, relative to one full forward of the
    ``n_examples`` prompts (the no-op skip of :func:`run_patches` is not predicted here).
    Peak memory = the cached base/source runs + the largest chunk's working memory.

    Raises:
        EngineError: the budget cannot hold even one patch's rows.
    """
    budget = max_memory or default_budget(model)
    d = model.dims
    L = d.n_layers
    groups: dict[int, list[int]] = defaultdict(list)
    for i, pt in enumerate(patches):
        groups[pt.start_pos if fast else 0].append(i)
    fe = 0.0
    chunks = 0
    max_rows = 0
    for p, idx in groups.items():
        n = T - p
        per_chunk = patches_per_chunk(model, n, T, ncols if fast else None, n_examples, budget)
        chunks += math.ceil(len(idx) / per_chunk)
        max_rows = max(max_rows, min(len(idx), per_chunk) * n_examples)
        for i in idx:
            if fast:
                key = _join_key(patches[i], model)
                layers = L - max(key[0], 0) - (0.5 if key[1] == 1 else 0.0)
                fe += max(layers, 0.0) / L * n / T
            else:
                fe += 1.0
    caches = 2 * model.runner.cache_bytes(n_examples, T, model.dtype)  # the base and the source run
    n_max = T - min(groups) if groups else T
    peak = caches + max_rows * row_bytes(model, n_max, T, ncols if fast else None)
    return SweepPlan("fast" if fast else "plain", len(patches), n_examples, max_rows, chunks, fe, int(peak))


def run_patches(
    model: Model,
    base_ids: Tensor,
    base: RunCache,
    source: RunCache,
    patches: Sequence[Patch],
    scorer: Scorer,
    *,
    fast: bool = True,
    base_hooks: dict[HookPoint, list[HookFn]] | None = None,
    max_memory: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    skip_noops: bool = True,
) -> Tensor:
    """Run every patch; return the metric ``[P, N]``.

    Args:
        model: the model.
        base_ids: ``[N, T]`` token ids of the base run.
        base: the base run's cache (from :func:`collect`, with ``base_hooks`` applied); activations
            the fast path needs and the cache lacks are recorded by one extra base forward.
        source: the source run's cache holding every patched hook point.
        patches: patches with resolved sites (see :func:`resolve`).
        scorer: metric of the last-position logits.
        fast: use the fast path (a)–(d); False runs plain full forwards.
        base_hooks: hooks present in the base run too (e.g. causal-tracing noise); they must be
            position-aware through ``ctx.pos_offset``.
        max_memory: working-memory budget in bytes (default: :func:`default_budget`).
        on_chunk: called with the number of patches finished after each chunk (progress bars).
        skip_noops: return the base metric, uncomputed, for patches whose source values equal
            the base's bit for bit (exact). Turn off to force computation (sanity checks).
    """
    N, T = base_ids.shape
    out = torch.empty(len(patches), N)
    budget = max_memory or default_budget(model)
    use_cols = fast and scorer.cols is not None
    ncols = len(scorer.cols) if use_cols and scorer.cols is not None else None
    if fast:
        need = set().union(*[_base_points(pt, model) for pt in patches]) if patches else set()
        missing = need - set(base.acts)
        if missing:
            extra = collect(model, base_ids, missing, hooks=base_hooks)
            base = RunCache({**base.acts, **extra.acts}, base.kv, base.logits)
    groups: dict[int, list[int]] = defaultdict(list)
    base_metric: Tensor | None = None
    for i, pt in enumerate(patches):
        if fast and skip_noops and _is_noop(pt, base, source):
            # the source equals the base at every patched site: the patched run IS the base run
            if base_metric is None:
                base_metric = scorer(base.logits, 1, False)[0].cpu()
            out[i] = base_metric
            continue
        groups[pt.start_pos if fast else 0].append(i)
    for p, idx in sorted(groups.items()):
        idx.sort(key=lambda i: _join_key(patches[i], model) if fast else (0, 0, 0))
        n = T - p
        per_chunk = patches_per_chunk(model, n, T, ncols if fast else None, N, budget)
        for c0 in range(0, len(idx), per_chunk):
            sel = idx[c0 : c0 + per_chunk]
            chunk = [patches[i] for i in sel]
            if fast:
                vals = _run_chunk_fast(model, base_ids, base, source, chunk, p, scorer, use_cols, base_hooks)
            else:
                vals = _run_chunk_plain(model, base_ids, source, chunk, scorer, base_hooks)
            out[sel] = vals.cpu()
            if on_chunk is not None:
                on_chunk(len(chunk))
    return out


def _site_values(cache: RunCache, site: Site) -> Tensor | None:
    t = cache.acts.get(site.point)
    if t is None:
        return None
    pos_ax, unit_ax = _layout(site.kind)
    if site.pos is not None:
        t = t.select(pos_ax, site.pos)
    if site.unit is not None and unit_ax is not None:
        t = t.select(unit_ax if site.pos is None or unit_ax < pos_ax else unit_ax - 1, site.unit)
    return t


def _is_noop(patch: Patch, base: RunCache, source: RunCache) -> bool:
    """True if, for every example, the source's values at all of the patch's sites are bitwise equal
    to the base run's. Patching then changes nothing, exactly: typically every position before the
    first token where the clean and corrupt prompts differ."""
    for site in patch.sites:
        a, b = _site_values(base, site), _site_values(source, site)
        if a is None or b is None or not torch.equal(a, b):
            return False
    return True


_ATTN_SIDE = frozenset({"head", "attn_out"})
_MLP_SIDE = frozenset({"neuron", "mlp_out"})


def _join_key(patch: Patch, model: Model) -> tuple[int, int, int]:
    """Where a patch's rows join the staggered batch: ``(layer, stage, shortcut)``.

    ``stage`` 0 = rows enter layer ``layer`` (the runner's ``("pre", layer)`` join), 1 = rows enter its
    MLP (``("mid", layer)``). ``shortcut`` 1 = the engine builds the rows itself from cached base
    activations (attention-side or MLP-side sites of a single layer); 0 = the rows are the base
    residual stream and the runner's hooks apply the patch. Layer -1: rows start from the embeddings.
    Sorting patches by this key gives the row order of the staggered batch.
    """
    layers = {s.layer for s in patch.sites}
    kinds = {s.kind for s in patch.sites}
    if None in layers:
        return (-1, 0, 0)
    if len(layers) == 1:
        (L,) = layers
        assert L is not None
        if kinds <= _ATTN_SIDE and not model.dims.parallel_residual:
            return (L, 1, 1)
        if kinds <= _MLP_SIDE or kinds == {"resid_post"}:
            return (L + 1, 0, 1)
    return (min(s.layer for s in patch.sites if s.layer is not None), 0, 0)


def _is_shortcut(patch: Patch, key: tuple[int, int, int]) -> bool:
    """True when the engine builds the patch's joining rows itself (attn-side or MLP-side sites of one layer)."""
    return key[2] == 1


def base_points(patches: Sequence[Patch], model: Model) -> set[HookPoint]:
    """Activations the fast path reads from the base run for these patches (record them in :func:`collect`)."""
    out: set[HookPoint] = set()
    for pt in patches:
        out |= _base_points(pt, model)
    return out


def _base_points(patch: Patch, model: Model) -> set[HookPoint]:
    """Base-run activations the fast path reads to build a patch's joining rows."""
    key = _join_key(patch, model)
    if not _is_shortcut(patch, key):
        return set()
    L = patch.start_layer
    kinds = {s.kind for s in patch.sites}
    if key[1] == 1:
        return {HookPoint("head", L), HookPoint("attn_out", L)}
    if kinds == {"resid_post"}:
        return {HookPoint("resid_post", L)}
    pts = {HookPoint("neuron", L), HookPoint("mlp_out", L)}
    pts.add(HookPoint("attn_out", L) if model.dims.parallel_residual else HookPoint("resid_mid", L))
    return pts


def _patch_all(x: Tensor, sites_by_block: list[tuple[int, Site]], src: RunCache, kind: str, N: int, ctx: RunCtx) -> Tensor:
    ents = [(i, s.unit, s.pos) for i, s in sites_by_block if s.kind == kind]
    if not ents:
        return x
    hp = HookPoint(kind, sites_by_block[0][1].layer)
    return _patch_hook(src.acts[hp], ents, x.shape[0] // N, N, kind)(x, ctx)  # type: ignore[return-value]


def _joining_rows(
    model: Model, base: RunCache, source: RunCache, block: list[Patch], key: tuple[int, int, int], p: int, N: int, T: int
) -> Tensor:
    """Build the rows a block of patches (same join key) contributes to the staggered batch.

    The rows are composed from the runner's own stages (``attn_out`` = o_proj + any post-norm,
    ``add_attn``, ``mlp_out``, ``resid_post``), fed with cached base activations and the patch.
    """
    R = len(block)
    L, stage, _ = key
    kinds = {s.kind for pt in block for s in pt.sites}
    ctx = RunCtx(p, T)
    sites = [(i, s) for i, pt in enumerate(block) for s in pt.sites]
    runner = model.runner

    def cached(kind: str, layer: int) -> Tensor:
        t = base.acts[HookPoint(kind, layer)][:, p:]
        return t.repeat(R, *([1] * (t.dim() - 1)))

    if stage == 1:  # head / attn_out at layer L: rebuild attn_out, join at resid_mid
        if "head" in kinds:
            attn_out = runner.attn_out(L, _patch_all(cached("head", L), sites, source, "head", N, ctx))
        else:
            attn_out = cached("attn_out", L)
        attn_out = _patch_all(attn_out, sites, source, "attn_out", N, ctx)
        return runner.add_attn(cached("resid_pre", L), attn_out)
    Lp = L - 1
    if kinds == {"resid_post"}:
        return _patch_all(cached("resid_post", Lp), sites, source, "resid_post", N, ctx)
    if "neuron" in kinds:
        mlp_out = runner.mlp_out(Lp, _patch_all(cached("neuron", Lp), sites, source, "neuron", N, ctx))
    else:
        mlp_out = cached("mlp_out", Lp)
    mlp_out = _patch_all(mlp_out, sites, source, "mlp_out", N, ctx)
    if model.dims.parallel_residual:
        return runner.resid_post(cached("resid_pre", Lp), mlp_out, cached("attn_out", Lp))
    return runner.resid_post(cached("resid_mid", Lp), mlp_out)


def _run_chunk_fast(
    model: Model,
    base_ids: Tensor,
    base: RunCache,
    source: RunCache,
    chunk: list[Patch],
    p: int,
    scorer: Scorer,
    use_cols: bool,
    base_hooks: dict[HookPoint, list[HookFn]] | None,
) -> Tensor:
    """Staggered batch: each block of patches joins where it first differs from the base run."""
    N, T = base_ids.shape
    keys = [_join_key(pt, model) for pt in chunk]
    cols = scorer.cols if use_cols else None
    explicit = any(s.kind == "pattern" for pt in chunk for s in pt.sites)
    hooks: dict[HookPoint, list[HookFn]] = defaultdict(list)
    for hp, fns in (base_hooks or {}).items():
        hooks[hp].extend(fns)
    # patches whose sites the runner must apply (generic joins)
    entries: dict[HookPoint, list[tuple[int, int | None, int | None]]] = defaultdict(list)
    blocks: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, (pt, key) in enumerate(zip(chunk, keys)):
        if i and key < keys[i - 1]:
            raise EngineError("internal: patches must be sorted by join key")
        blocks[key].append(i)
        if not _is_shortcut(pt, key):
            for s in pt.sites:
                entries[s.point].append((i, s.unit, s.pos))
    for hp, ents in entries.items():
        if hp not in source.acts:
            raise EngineError(f"the source run did not record {hp}; cannot patch it")
        hooks[hp].append(_patch_hook(source.acts[hp], ents, -1, N, hp.kind))
    past = [(k[:, :, :p], v[:, :, :p]) for k, v in base.kv] if p > 0 else None
    joins = _joins(model, base, source, chunk, blocks, p, N, T)
    common = dict(pos_offset=p, past_kv=past, hooks=hooks, last_only=True, unembed_cols=cols, explicit_attention=explicit)
    with torch.no_grad():
        if keys[0][0] < 0:  # embed patches: their rows start from the token ids
            n_embed = len(blocks[(-1, 0, 0)])
            res = model.runner.forward(base_ids[:, p:].repeat(n_embed, 1), joins=joins, **common)  # type: ignore[arg-type]
        else:
            stage, start_layer = min(joins, key=lambda k: (k[1], k[0] == "mid"))
            first = joins.pop((stage, start_layer)) if stage == "pre" else None
            h0 = first if first is not None else base.acts[HookPoint("resid_pre", start_layer)][:, p:][:0]
            if start_layer >= model.dims.n_layers:
                res = _unembed_only(model, h0, cols)
            else:
                res = model.runner.forward(resid=h0, start_layer=start_layer, joins=joins, **common)  # type: ignore[arg-type]
    assert res.logits is not None
    return scorer(res.logits[:, -1], len(chunk), cols is not None)


def _unembed_only(model: Model, h: Tensor, cols: Tensor | None) -> RunOutput:
    return RunOutput(model.runner.unembed(h[:, -1:], cols), h, None)


def _joins(
    model: Model, base: RunCache, source: RunCache, chunk: list[Patch], blocks: dict[tuple[int, int, int], list[int]],
    p: int, N: int, T: int,
) -> dict[tuple[str, int], Tensor]:
    """Rows per runner join point ``("pre"|"mid", layer)``, in block order (embed patches excluded)."""
    parts: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
    for key, members in sorted(blocks.items()):
        L, stage, _ = key
        if L < 0:
            continue
        block = [chunk[i] for i in members]
        if _is_shortcut(block[0], key):
            rows = _joining_rows(model, base, source, block, key, p, N, T)
        else:
            rows = base.acts[HookPoint("resid_pre", L)][:, p:].repeat(len(block), 1, 1)
        parts[("mid" if stage == 1 else "pre", L)].append(rows)
    return {k: torch.cat(v, dim=0) if len(v) > 1 else v[0] for k, v in parts.items()}


def _run_chunk_plain(
    model: Model,
    base_ids: Tensor,
    source: RunCache,
    chunk: list[Patch],
    scorer: Scorer,
    base_hooks: dict[HookPoint, list[HookFn]] | None,
) -> Tensor:
    """Reference path inside the library: one full forward per patch (patches batched)."""
    P = len(chunk)
    N = base_ids.shape[0]
    hooks: dict[HookPoint, list[HookFn]] = defaultdict(list)
    for hp, fns in (base_hooks or {}).items():
        hooks[hp].extend(fns)
    entries: dict[HookPoint, list[tuple[int, int | None, int | None]]] = defaultdict(list)
    for i, patch in enumerate(chunk):
        for s in patch.sites:
            entries[s.point].append((i, s.unit, s.pos))
    for hp, ents in entries.items():
        if hp not in source.acts:
            raise EngineError(f"the source run did not record {hp}; cannot patch it")
        hooks[hp].append(_patch_hook(source.acts[hp], ents, P, N, hp.kind))
    explicit = any(hp.kind == "pattern" for hp in entries)
    with torch.no_grad():
        res = model.runner.forward(base_ids.repeat(P, 1), hooks=hooks, last_only=True, explicit_attention=explicit)
    assert res.logits is not None
    return scorer(res.logits[:, -1], P, False)


def _patch_hook(
    src: Tensor, ents: list[tuple[int, int | None, int | None]], P: int, N: int, kind: str
) -> HookFn:
    """A hook writing source values into the rows of each patch (rows are patch-major)."""
    pos_ax, unit_ax = _layout(kind)
    # put positions at axis 1 and units at axis 2 (views)
    s = src.transpose(1, 2) if pos_ax == 2 else src
    single = [(i, u, t) for i, u, t in ents if t is not None and (u is not None or unit_ax is None)]
    other = [e for e in ents if e not in single]
    ar = torch.arange(N, device=src.device)

    def fn(x: Tensor, ctx: RunCtx) -> Tensor:
        xv = x.transpose(1, 2) if pos_ax == 2 else x
        xv = xv.unflatten(0, (x.shape[0] // N if P < 0 else P, N))
        off, n = ctx.pos_offset, xv.shape[2]
        if single:
            ii = torch.tensor([e[0] for e in single], device=x.device)
            tt = torch.tensor([e[2] for e in single], device=x.device)  # type: ignore[misc]
            if unit_ax is None:
                xv[ii[:, None], ar[None, :], (tt - off)[:, None]] = s[ar[None, :], tt[:, None]]
            else:
                uu = torch.tensor([e[1] for e in single], device=x.device)  # type: ignore[misc]
                xv[ii[:, None], ar[None, :], (tt - off)[:, None], uu[:, None]] = s[ar[None, :], tt[:, None], uu[:, None]]
        for i, u, t in other:
            if t is None:
                if u is None:
                    xv[i] = s[:, off : off + n]
                else:
                    xv[i, :, :, u] = s[:, off : off + n, u]
            else:
                if not off <= t < off + n:
                    raise EngineError(f"internal: patch position {t} outside computed positions {off}..{off + n - 1}")
                xv[i, :, t - off] = s[:, t]
        return x

    return fn
