"""ROME causal tracing (Meng et al. 2022), as a sweep job of the exact engine.

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

Encoders (BERT, RoBERTa): the metric (and the ``top1`` target) is read at each prompt's one mask
token (:meth:`TokenizedTask.readout`, checked when the job is built). Attention is bidirectional, so
the noise reaches every position from the first layer on and restoring a state *before* the subject
matters too; the engine knows it (no suffix shortcut, no prefix taken from the noisy run: every
restored run recomputes all positions from the restored layer, and only restorations bit-identical
to the noisy run are skipped).

Example:
    Restore windows of 10 MLP outputs, at every token, on two facts the model knows (two noise
    samples each, to keep it quick; ROME uses ten):

    >>> from patchtrace import SiteSpec, load_model, make_task
    >>> m = load_model()
    >>> task = make_task("factual", n=2, model=m)             # keeps facts the model recalls
    >>> task.examples[0].clean, task.examples[0].meta["subject"]
    ('The capital of Spain is', 'Spain')
    >>> s = run(m, task, SiteSpec("mlp_out", positions="all"), TracingConfig(samples=2))
    >>> s.axes, tuple(s.values.shape)                         # 30 layers × 5 tokens
    (('layer', 'pos'), (30, 5))
    >>> site, effect = s.top_k(1)[0]
    >>> s.labels["pos"][site.pos], site.layer < 15            # early MLPs at the subject's last token
    ('ĠSpain', True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from patchtrace.engine.apply import base_interventions_hooks
from patchtrace.engine.checkpoint import run_key
from patchtrace.engine.job import Block, Executor, execute
from patchtrace.engine.sweep import Patch, RunCache, Scorer, base_points, collect, resolve, run_patches
from patchtrace.grid import Grid
from patchtrace.interventions import Add, Intervention
from patchtrace.methods.registry import register_method
from patchtrace.methods.validate import check_bool, check_choice, check_float, check_int, check_metric
from patchtrace.metrics import Metric
from patchtrace.models.load import Model
from patchtrace.progress import Progress
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import HookPoint, Site, SiteError, SiteKind, SiteSpec
from patchtrace.tasks.base import Task, TaskError, TokenizedTask

TraceKind = Literal["resid", "mlp", "attn"]
_SITE_OF_KIND: dict[str, SiteKind] = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


@dataclass(frozen=True, kw_only=True)
class TracingConfig:
    """Settings of a causal trace (keyword-only; checked when built).

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

    Raises:
        ConfigError: a field of the wrong type or out of range.
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
        check_float(self, "noise_scale", low=0.0, open_low=True)
        check_int(self, "samples", low=1)
        check_int(self, "seed", low=0)
        check_choice(self, "kind", _SITE_OF_KIND)
        check_int(self, "window", low=1)
        check_metric(self)
        check_choice(self, "target", ("top1", "answer"))
        check_bool(self, "fast")
        check_int(self, "max_memory", low=1, optional=True)


def _for_sites(cfg: TracingConfig, sites: SiteSpec | None) -> TracingConfig:
    """The config with ``kind`` taken from ``sites`` (None keeps ``cfg.kind``).

    Raises:
        SiteError: sites that are not a whole ``(layer, pos)`` grid of resid_post, mlp_out or attn_out.
    """
    if sites is None:
        return cfg
    if isinstance(sites, TracingConfig):
        raise SiteError("causal tracing is run(model, task, sites, config): the config was passed as sites")
    kinds: dict[str, TraceKind] = {"resid_post": "resid", "mlp_out": "mlp", "attn_out": "attn"}
    kind = kinds.get(sites.kind)
    if kind is None or sites.per_unit or sites.positions != "all" or sites.layers is not None:
        raise SiteError(
            f"causal tracing restores every (layer, token) of resid_post, mlp_out or attn_out; got {sites} "
            "(use e.g. SiteSpec('mlp_out', positions='all'), or None for the config's kind)"
        )
    return replace(cfg, kind=kind)


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


def run(
    model: Model,
    task: Task | TokenizedTask,
    sites: SiteSpec | None = None,
    config: TracingConfig | None = None,
    *,
    on_progress: Progress | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> Scores:
    """Causal trace of every (layer, token) of the task's prompts.

    Args:
        model: a loaded model.
        task: examples with ``meta['subject']``, all of one token length (the position axis is shared).
        sites: what to restore: ``SiteSpec(kind, positions="all")`` with kind ``resid_post``,
            ``mlp_out`` or ``attn_out`` (overrides ``config.kind``); None uses ``config.kind``.
        config: :class:`TracingConfig`.
        on_progress: called as ``on_progress(done, total)`` in patches (:mod:`patchtrace.progress`).
        out_dir: if given, finished blocks are checkpointed there, a rerun resumes, and the result is
            saved there.
        overwrite: replace another run's result in ``out_dir`` (otherwise refused).
        executor: where the blocks run (default: this process; see :mod:`patchtrace.engine.executors`).

    Returns:
        :class:`Scores` with axes ``(layer, pos)`` of indirect effects (``value_name='effect'``),
        ``per_example`` ``[N, L, T]``, extras ``patched`` (restored metric), ``clean_per_example``,
        ``corrupt_per_example`` (noisy), ``subject_mask`` ``[N, T]`` and ``target`` ``[N]``.

    Raises:
        TaskError: missing/unlocatable subjects, or prompts of different token lengths.
        SiteError: ``sites`` that causal tracing cannot restore.
    """
    cfg = _for_sites(config or TracingConfig(), sites)
    tok = task if isinstance(task, TokenizedTask) else task.tokenize(model.tokenizer)
    T = tok.uniform_length()
    if T is None:
        lens = sorted(set(tok.lengths))
        raise TaskError(
            f"causal tracing shares one position axis, so all clean prompts must have the same token length "
            f"(got lengths {lens}); use task.subset(...) with equal-length examples or a single template"
        )
    job = TracingJob(model, tok, cfg)
    return execute(job, out_dir=out_dir, overwrite=overwrite, on_progress=on_progress, executor=executor)


#: Batch rows (cells × examples × noise samples) per checkpointed block.
ROWS_PER_BLOCK = 2048


class TracingJob:
    """Causal tracing as an engine sweep job: blocks of (layer, token) cells, noise as an intervention.

    The noisy base run is the clean prompt with an :class:`~patchtrace.interventions.Add` of the noise
    on the embeddings, applied to every row (the base run's and every restored run's); each cell
    restores the clean value at one (layer, token) — or a window of sublayers — from the clean run.
    """

    def __init__(self, model: Model, tok: TokenizedTask, cfg: TracingConfig) -> None:
        self.model, self.tok, self.cfg = model, tok, cfg
        T = tok.uniform_length()
        assert T is not None
        self.T, self.N, self.S, self.L = T, len(tok), cfg.samples, model.dims.n_layers
        self.subj = subject_positions(tok.task, model.tokenizer, tok)
        # an encoder's mask positions (None: the last position), refused here when missing
        self.readout = tok.readout(list(range(self.N)), mask=not model.family.causal)
        self.site_kind = _SITE_OF_KIND[cfg.kind]
        self.cells: list[Patch] = []
        for layer in range(self.L):
            layers = [layer] if cfg.kind == "resid" else window_layers(layer, cfg.window, self.L)
            for t in range(T):
                self.cells.append(Patch(tuple(resolve(Site(self.site_kind, j, None, t), model, T) for j in layers)))
        self.key = run_key({"model": model.weights_hash(), "task": tok.task.hash(), "config": asdict(cfg),
                            "m": "causal_tracing"})
        per = max(1, ROWS_PER_BLOCK // (self.N * self.S))
        self._where = [(b0, min(len(self.cells), b0 + per)) for b0 in range(0, len(self.cells), per)]
        self._blocks = [Block(i, b1 - b0, f"cells {b0}-{b1 - 1}") for i, (b0, b1) in enumerate(self._where)]
        self._runs: dict[str, Any] | None = None

    def blocks(self) -> list[Block]:
        return self._blocks

    def _prepare(self) -> dict[str, Any]:
        """The clean (source) and noisy (base) runs, their metrics and the noise (computed once)."""
        if self._runs is not None:
            return self._runs
        model, tok, cfg, N, S = self.model, self.tok, self.cfg, self.N, self.S
        dev = model.device
        metric = Metric(cfg.metric)
        ids = tok.ids("clean", range(N)).to(dev)
        ro = self.readout.to(dev) if self.readout is not None else None
        ro_rows = ro.repeat_interleave(S) if ro is not None else None  # row i·S + s reads example i's
        clean = collect(model, ids, {HookPoint(self.site_kind, j) for j in range(self.L)}, readout=ro)
        target = clean.logits.argmax(-1)[:, None] if cfg.target == "top1" else tok.answer[:, :1].to(dev)
        wrong = tok.wrong.to(dev)
        ref = torch.log_softmax(clean.logits, -1) if metric.name == "kl" else None
        clean_metric = Scorer(metric, target, wrong, ref)(clean.logits, 1, False)[0].cpu()
        source = RunCache(
            {hp: a.repeat_interleave(S, 0) for hp, a in clean.acts.items()},
            [(k.repeat_interleave(S, 0), v.repeat_interleave(S, 0)) for k, v in clean.kv],
            clean.logits.repeat_interleave(S, 0),
        )
        noise, sigma = make_noise(model, tok, self.subj, cfg)
        noise_iv = Intervention(Site("embed"), Add(noise))  # per noisy row, every position's share
        rows = ids.repeat_interleave(S, 0)
        hooks = base_interventions_hooks([noise_iv], {}, rows.shape[0])
        # record what the fast path reads from the noisy run once, here: otherwise every block's
        # run_patches call would re-run the noisy forward to fetch it
        need = base_points(self.cells, model) if cfg.fast else set()
        base = collect(model, rows, need, hooks=hooks, readout=ro_rows)
        scorer = Scorer(metric, target.repeat_interleave(S, 0), wrong.repeat_interleave(S, 0),
                        ref.repeat_interleave(S, 0) if ref is not None else None, pos=ro_rows)
        noisy_metric = scorer(base.logits, 1, False)[0].view(N, S).mean(1).cpu()
        self._runs = {"rows": rows, "base": base, "source": source, "hooks": hooks, "scorer": scorer,
                      "clean_metric": clean_metric, "noisy_metric": noisy_metric, "sigma": sigma, "target": target}
        return self._runs

    def run_block(self, block: Block, on_progress: Callable[[int], None] | None = None) -> dict[str, Tensor]:
        r = self._prepare()
        b0, b1 = self._where[block.index]
        vals = run_patches(
            self.model, r["rows"], r["base"], r["source"], self.cells[b0:b1], r["scorer"], fast=self.cfg.fast,
            base_hooks=r["hooks"], max_memory=self.cfg.max_memory, on_chunk=on_progress,
        )
        return {"restored": vals.cpu()}

    def merge(self, results: Sequence[dict[str, Tensor]]) -> Scores:
        r = self._prepare()
        model, tok, cfg = self.model, self.tok, self.cfg
        N, S, L, T = self.N, self.S, self.L, self.T
        restored = torch.cat([x["restored"] for x in results], 0)  # [P, N*S]
        restored = restored.view(L, T, N, S).mean(-1).permute(2, 0, 1)  # [N, L, T]
        noisy_metric, clean_metric, target = r["noisy_metric"], r["clean_metric"], r["target"]
        effects = restored - noisy_metric[:, None, None]
        mask = torch.zeros(N, T)
        for i, p in enumerate(self.subj):
            mask[i, p] = 1.0
        prov = make_provenance(model, tok.task, "causal_tracing", cfg, seeds={"noise": cfg.seed})
        prov.update({
            "sigma_emb": r["sigma"],
            "noise_std": cfg.noise_scale * r["sigma"],
            "subject_positions": self.subj,
            "site": f"{self.site_kind} (window {cfg.window})" if cfg.kind != "resid" else self.site_kind,
            "target_tokens": model.tokenizer.convert_ids_to_tokens(target[:, 0].tolist()),
            "run_key": self.key,
        })
        grid = Grid(self.site_kind, ("layer", "pos"), (tuple(range(L)), tuple(range(T))))
        return Scores(
            values=effects.mean(0),
            axes=grid.axes,
            site_kind=self.site_kind,
            value_name="effect",
            metric=cfg.metric,
            baselines={"clean": float(clean_metric.mean()), "corrupt": float(noisy_metric.mean())},
            labels={**grid.labels(), "pos": list(tok.tokens[0])},
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


def _tiny_inputs(model: Model) -> tuple[Task, SiteSpec]:
    """Two factual prompts of one token length with single-token answers, and the MLP windows."""
    from patchtrace.tasks.factual import factual

    tokz = model.tokenizer
    def single(text: Any) -> bool:
        return len(tokz(text, add_special_tokens=False).input_ids) == 1

    exs = [e for e in factual(n=30, seed=0).examples if single(e.answer) and single(e.wrong)]
    lengths = [len(tokz(e.clean).input_ids) for e in exs]
    common = max(set(lengths), key=lengths.count)
    chosen = [e for e, n in zip(exs, lengths, strict=True) if n == common][:2]
    return Task("factual", chosen), SiteSpec("mlp_out", positions="all")


register_method(
    "causal_tracing", TracingConfig, run, result=Scores, sweep=True,
    description="ROME: noise the subject's embeddings, restore one (layer, token) state at a time",
    tiny_config=lambda: TracingConfig(samples=2, window=2, metric="logprob", target="answer"),
    tiny_inputs=_tiny_inputs, plain_baselines=("clean",),
    invalid_configs=({"noise_scale": 0.0}, {"samples": 0}, {"kind": "mlp_out"}, {"window": 0},
                     {"metric": "accuracy"}, {"target": "second"}),
)
