"""ROME causal tracing (Meng et al. 2022; methods.md §1), on the exact sweep engine.

The idea: corrupt a prompt by adding Gaussian noise to the embeddings of its *subject* tokens
("The capital of **France** is"), which wrecks the model's recall, then restore the clean value of
one hidden state at a time and see how much of the recall comes back. States whose restoration
brings the answer back carry the fact at that layer and token.

Concretely, for every example and ``samples`` noisy copies of it:

* the **noisy run** is the clean prompt with ``ν·ε`` added to the embedding output at the subject
  positions, ``ε ~ N(0, I)`` from a seeded generator (the same noise in every run), and
  ``ν = noise_scale × σ`` where ``σ`` is the standard deviation of all entries of the subject
  tokens' embedding outputs across the task;
* a **restored run** is the noisy run with one clean state written back at one token:
  ``resid_post[l]`` (``kind="resid"``), or the sublayer outputs ``mlp_out`` / ``attn_out`` of a
  window of layers ``[max(0, l − w//2), min(L, l + ceil(w/2)))`` (``kind="mlp"|"attn"``);
* the metric (default: probability of the clean run's top-1 next token) is averaged over the noisy
  copies, and the **indirect effect** of a state is ``M(restored) − M(noisy)``.

Everything runs on :mod:`patchtrace.engine.sweep`: the noise is a position-aware ``embed`` hook used
for the base (noisy) run and for every patched run (``base_hooks``), and each window is one
multi-site :class:`~patchtrace.engine.sweep.Patch`. The fast path therefore starts a restored run at
the restored layer and token, reusing the noisy run's cached prefix: with noise only on earlier
(subject) tokens, that prefix already carries the noise.

The result is a :class:`~patchtrace.results.Scores` with axes ``(layer, pos)``; ``values`` are the
indirect effects averaged over examples, ``extras['patched']`` the restored metric, and the
baselines ``clean`` and ``corrupt`` (= noisy). Subject positions come from ``example.meta['subject']``
(the ``factual`` generator sets it), located with the tokenizer's offset mapping.

Example:
    >>> from patchtrace import load_model, make_task                        # doctest: +SKIP
    >>> from patchtrace.methods.causal_tracing import TracingConfig, run     # doctest: +SKIP
    >>> m = load_model()                                                     # doctest: +SKIP
    >>> s = run(m, make_task("factual", n=8, model=m), TracingConfig(kind="mlp"))  # doctest: +SKIP
    >>> s.top_k(3)                                                           # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from patchtrace.engine.sweep import Patch, RunCache, Scorer, collect, resolve, run_patches
from patchtrace.metrics import Metric
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn, RunCtx
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import HookPoint, Site, SiteKind
from patchtrace.tasks.base import Task, TaskError, TokenizedTask

TraceKind = Literal["resid", "mlp", "attn"]
_SITE_OF_KIND: dict[str, SiteKind] = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


@dataclass(frozen=True)
class TracingConfig:
    """Settings of a causal trace.

    Attributes:
        noise_scale: noise std as a multiple of the subject embeddings' std (ROME: 3).
        samples: noisy copies per example (ROME: 10).
        seed: seed of the noise generator.
        kind: restore ``resid`` (the residual stream after a layer), or a window of ``mlp`` /
            ``attn`` sublayer outputs.
        window: window width in layers for ``mlp`` / ``attn`` (ROME: 10; 1 restores one layer).
        metric: metric name (:data:`patchtrace.metrics.METRICS`); ``prob`` as in ROME.
        target: ``top1`` scores the clean run's top-1 next token (ROME), ``answer`` the task's answer.
        fast: use the engine's fast path (same numbers as plain full forwards).
        max_memory: working-memory budget in bytes (None: engine default).
    """

    noise_scale: float = 3.0
    samples: int = 10
    seed: int = 0
    kind: TraceKind = "resid"
    window: int = 10
    metric: str = "prob"
    target: Literal["top1", "answer"] = "top1"
    fast: bool = True
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _SITE_OF_KIND:
            raise ValueError(f"causal tracing kind {self.kind!r}: use one of {', '.join(_SITE_OF_KIND)}")
        if self.window < 1:
            raise ValueError(f"causal tracing window must be ≥ 1 (got {self.window})")
        if self.samples < 1:
            raise ValueError(f"causal tracing needs ≥ 1 noise sample (got {self.samples})")
        if self.target not in ("top1", "answer"):
            raise ValueError(f"causal tracing target {self.target!r}: use 'top1' or 'answer'")
        Metric(self.metric)  # validates the name (MetricError)


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers restored together around ``layer``: ``[max(0, l − w//2), min(L, l + ceil(w/2)))``."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer + math.ceil(window / 2))))


def subject_positions(task: Task, tokenizer: Any, tok: TokenizedTask | None = None) -> list[list[int]]:
    """Token positions of each example's subject (``example.meta['subject']``) in its clean prompt.

    Located through the tokenizer's character offsets: every token overlapping the subject's first
    occurrence in the prompt.

    Raises:
        TaskError: an example without ``meta['subject']``, a subject not in its prompt, or a
            tokenizer without offset mappings.
    """
    out: list[list[int]] = []
    for i, ex in enumerate(task.examples):
        subj = ex.meta.get("subject")
        if not subj:
            raise TaskError(
                f"example {i}: causal tracing needs the subject string in example.meta['subject'] "
                f"(prompt {ex.clean!r}); the 'factual' task sets it"
            )
        start = ex.clean.find(subj)
        if start < 0:
            raise TaskError(f"example {i}: subject {subj!r} does not occur in the clean prompt {ex.clean!r}")
        end = start + len(subj)
        try:
            enc = tokenizer(ex.clean, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError) as e:
            raise TaskError(f"causal tracing needs a tokenizer with offset mappings (a fast tokenizer): {e}") from None
        if tok is not None and list(enc["input_ids"]) != list(tok.clean[i]):
            raise TaskError(f"example {i}: tokenizing with offsets gave different ids than the task's tokenization")
        pos = [t for t, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
        if not pos:
            raise TaskError(f"example {i}: no token of the prompt {ex.clean!r} covers the subject {subj!r}")
        out.append(pos)
    return out


def make_noise(
    model: Model, tok: TokenizedTask, subj: list[list[int]], config: TracingConfig
) -> tuple[Tensor, float]:
    """The noise added to the embeddings: ``[N * samples, T, D]`` (zero off the subject) and σ.

    Rows are example-major (row ``i * samples + s``). ``σ`` is the std of every entry of the subject
    tokens' embedding outputs over the task; the draws come from a generator seeded with
    ``config.seed``, example by example, so a run is reproducible.
    """
    T = tok.uniform_length()
    assert T is not None
    D, S = model.dims.d_model, config.samples
    with torch.no_grad():
        emb = model.runner.embed(tok.ids("clean", range(len(tok))).to(model.device))
    vals = torch.cat([emb[i, p].reshape(-1).float() for i, p in enumerate(subj)])
    sigma = float(vals.std())
    g = torch.Generator().manual_seed(config.seed)
    noise = torch.zeros(len(tok) * S, T, D)
    for i, p in enumerate(subj):
        eps = torch.randn(S, len(p), D, generator=g)
        noise[i * S : (i + 1) * S, p] = config.noise_scale * sigma * eps
    return noise.to(device=model.device, dtype=model.dtype), sigma


def noise_hook(noise: Tensor) -> HookFn:
    """An ``embed`` hook adding ``noise`` ``[R, T, D]`` at this call's absolute positions.

    Works in the noisy base run (``R`` rows) and in batched patched runs (``k × R`` rows, tiled
    patch-major, row ``r`` ↔ noise row ``r % R``), and in suffix-only runs through ``ctx.pos_offset``.
    """
    R = noise.shape[0]

    def fn(x: Tensor, ctx: RunCtx) -> Tensor:
        n = x.shape[1]
        part = noise[:, ctx.pos_offset : ctx.pos_offset + n]
        reps = x.shape[0] // R
        return x + (part.repeat(reps, 1, 1) if reps > 1 else part)

    return fn


def run(
    model: Model,
    task: Task | TokenizedTask,
    config: TracingConfig | None = None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> Scores:
    """Causal trace of every (layer, token) of the task's prompts.

    Args:
        model: a loaded model.
        task: examples with ``meta['subject']``, all of one token length (the position axis is shared).
        config: :class:`TracingConfig`.
        on_progress: called as ``on_progress(done, total)`` in patches.

    Returns:
        :class:`Scores` with axes ``(layer, pos)`` of indirect effects (``value_name='effect'``),
        ``per_example`` ``[N, L, T]``, extras ``patched`` (restored metric), ``clean_per_example``,
        ``corrupt_per_example`` (noisy), ``subject_mask`` ``[N, T]`` and ``target`` ``[N]``.

    Raises:
        TaskError: missing/unlocatable subjects, or prompts of different token lengths.
    """
    cfg = config or TracingConfig()
    tok = task if isinstance(task, TokenizedTask) else task.tokenize(model.tokenizer)
    T = tok.uniform_length()
    if T is None:
        lens = sorted(set(tok.lengths))
        raise TaskError(
            f"causal tracing shares one position axis, so all clean prompts must have the same token length "
            f"(got lengths {lens}); use task.subset(...) with equal-length examples or a single template"
        )
    subj = subject_positions(tok.task, model.tokenizer, tok)
    N, S, L = len(tok), cfg.samples, model.dims.n_layers
    dev = model.device
    metric = Metric(cfg.metric)
    ids = tok.ids("clean", range(N)).to(dev)
    site_kind = _SITE_OF_KIND[cfg.kind]

    # patches: one per (layer, token), a window of sites for mlp/attn
    cells: list[Patch] = []
    for layer in range(L):
        layers = [layer] if cfg.kind == "resid" else window_layers(layer, cfg.window, L)
        for t in range(T):
            cells.append(Patch(tuple(resolve(Site(site_kind, j, None, t), model, T) for j in layers)))
    points = {HookPoint(site_kind, j) for j in range(L)}

    # clean run (source), expanded to the noisy rows (example-major)
    clean = collect(model, ids, points)
    if cfg.target == "top1":
        target = clean.logits.argmax(-1)[:, None]
    else:
        target = tok.answer[:, :1].to(dev)
    wrong = tok.wrong.to(dev)
    ref = torch.log_softmax(clean.logits, -1) if metric.name == "kl" else None
    clean_scorer = Scorer(metric, target, wrong, ref)
    clean_metric = clean_scorer(clean.logits, 1, False)[0].cpu()
    source = RunCache(
        {hp: a.repeat_interleave(S, 0) for hp, a in clean.acts.items()},
        [(k.repeat_interleave(S, 0), v.repeat_interleave(S, 0)) for k, v in clean.kv],
        clean.logits.repeat_interleave(S, 0),
    )

    # noisy run (base)
    noise, sigma = make_noise(model, tok, subj, cfg)
    hooks: dict[HookPoint, list[HookFn]] = {HookPoint("embed", None): [noise_hook(noise)]}
    rows = ids.repeat_interleave(S, 0)
    base = collect(model, rows, (), hooks=hooks)
    scorer = Scorer(
        metric,
        target.repeat_interleave(S, 0),
        wrong.repeat_interleave(S, 0),
        ref.repeat_interleave(S, 0) if ref is not None else None,
    )
    noisy_metric = scorer(base.logits, 1, False)[0].view(N, S).mean(1).cpu()

    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if on_progress is not None:
            on_progress(done, len(cells))

    restored = run_patches(
        model, rows, base, source, cells, scorer, fast=cfg.fast, base_hooks=hooks, max_memory=cfg.max_memory,
        on_chunk=tick,
    ).cpu()  # [P, N*S]
    restored = restored.view(L, T, N, S).mean(-1).permute(2, 0, 1)  # [N, L, T]
    effects = restored - noisy_metric[:, None, None]
    mask = torch.zeros(N, T)
    for i, p in enumerate(subj):
        mask[i, p] = 1.0
    prov = make_provenance(model, tok.task, "causal_tracing", cfg, seeds={"noise": cfg.seed})
    prov.update(
        {
            "sigma_emb": sigma,
            "noise_std": cfg.noise_scale * sigma,
            "subject_positions": subj,
            "site": f"{site_kind} (window {cfg.window})" if cfg.kind != "resid" else site_kind,
            "target_tokens": model.tokenizer.convert_ids_to_tokens(target[:, 0].tolist()),
        }
    )
    return Scores(
        values=effects.mean(0),
        axes=("layer", "pos"),
        site_kind=site_kind,
        value_name="effect",
        metric=cfg.metric,
        baselines={"clean": float(clean_metric.mean()), "corrupt": float(noisy_metric.mean())},
        labels={
            "layer_index": [str(x) for x in range(L)],
            "pos_index": [str(t) for t in range(T)],
            "pos": list(tok.tokens[0]),
        },
        per_example=effects,
        extras={
            "patched": restored.mean(0),
            "clean_per_example": clean_metric,
            "corrupt_per_example": noisy_metric,
            "subject_mask": mask,
            "target": target[:, 0].cpu().float(),
        },
        provenance=prov,
    )
