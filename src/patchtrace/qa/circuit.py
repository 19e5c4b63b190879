"""Context-use and memory-use circuits of extractive QA by activation patching (Basu et al. 2025).

The task (:func:`patchtrace.qa.patching.qa_patching_task`) pairs a *context run* (a
counterfactual context; the model copies "Lyon") with a *memory run* (the same prompt, the answer
sentence swapped for a same-length distractor; the model says "Paris"). With the metric
``logit_diff = logit(context answer) − logit(memory answer)`` at the last position:

* **context use** of a component = denoising effect: run the memory prompt, restore the
  component's activation from the context run; how much does the context answer come back?
* **memory use** = the same question the other way round: run the context prompt, restore the
  component from the memory run, measured on ``logit(memory) − logit(context)``. That is minus the
  noising effect of the context task, so one extra sweep gives it.

:func:`run` returns the context-use :class:`~patchtrace.results.Scores` (``value_name="effect"``)
with the memory-use effects in ``extras['memory_effect']`` (same shape) and both directions'
per-example baselines; it follows the methods' interface ``run(model, task, sites, config)`` and
builds its own provenance (the sweeps' own results are never edited).
:func:`extract` runs the standard pair of grids (heads and MLPs at the last position).

Cost: the engine batches equal-length examples and resumes each last-position patch at its layer,
so build the task with ``qa_patching_task(..., n_sentences=(4, 4), equal_length=True)`` to get one
or two length groups; on SmolLM2 (CPU, shared box) 7 examples × (270 heads + 30 MLPs) × both
directions took ~20 s (``benchmarks/qa.py``); 8 examples of 8 different lengths took 546 s the
same day (one batch per example, under heavier load, so the ratio is only indicative).

Example:
    Both directions over the heads of layer 23, on the counterfactual-context task:

    >>> from patchtrace import load_model
    >>> from patchtrace.qa.patching import qa_patching_task
    >>> m = load_model()
    >>> task = qa_patching_task(2, 0, m, n_sentences=(4, 4))
    >>> heads = run(m, task, SiteSpec("head", per_unit=True, layers=(23,)))
    >>> tuple(heads.values.shape), tuple(heads.extras["memory_effect"].shape)
    ((1, 9), (1, 9))
    >>> site, effect = heads.top_k(1)[0]
    >>> str(site), effect > 0                                    # the strongest context-use head here
    ('head[23].h2@-1', True)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from patchtrace.engine.job import Executor
from patchtrace.methods.activation_patching import PatchingConfig
from patchtrace.methods.activation_patching import run as patch_run
from patchtrace.methods.registry import register_method
from patchtrace.methods.validate import check_bool, check_metric
from patchtrace.models.load import Model
from patchtrace.progress import Progress, offset
from patchtrace.results import Scores, make_provenance
from patchtrace.sites import SiteSpec
from patchtrace.tasks.base import Example, Task


@dataclass(frozen=True, kw_only=True)
class QACircuitConfig:
    """Settings of the QA circuit sweep (keyword-only; checked when built).

    Attributes:
        metric: patching metric (``logit_diff`` of context vs memory answer by default).
        fast: use the engine's fast path (exact; see the engine's tests).
        memory: also compute the memory-use effects (one more sweep).

    Raises:
        ConfigError: an unknown metric, or a flag that is not a bool.
    """

    metric: str = "logit_diff"
    fast: bool = True
    memory: bool = True

    def __post_init__(self) -> None:
        check_metric(self)
        check_bool(self, "fast")
        check_bool(self, "memory")


def run(
    model: Model, task: Task, sites: SiteSpec, config: QACircuitConfig | None = None,
    *, on_progress: Progress | None = None, executor: Executor | None = None,
) -> Scores:
    """Context-use effects of every cell of ``sites`` (memory-use in ``extras['memory_effect']``).

    Args:
        model: the model.
        task: a context-variant QA patching task (clean = context run, answer = context answer).
        sites: the grid (e.g. ``SiteSpec("head", per_unit=True)`` or ``SiteSpec("mlp_out")``).
        config: :class:`QACircuitConfig`.
        on_progress: ``on_progress(done, total)`` in patches of both sweeps (:mod:`patchtrace.progress`).
        executor: where the sweeps' blocks run (default: this process; see :mod:`patchtrace.engine.executors`).

    Returns:
        A new :class:`Scores` with its own provenance (``method == 'qa_circuit'``, this config); the
        provenance of the activation-patching sweeps it ran is nested under ``sweeps``, unchanged.
    """
    cfg = config or QACircuitConfig()
    sweeps_n = 2 if cfg.memory else 1
    seen = [0]  # patches per sweep, learnt from the first sweep's total

    def first(done: int, total: int) -> None:
        seen[0] = total
        if on_progress is not None:
            on_progress(done, sweeps_n * total)

    ctx = patch_run(model, task, sites, PatchingConfig(direction="denoise", metric=cfg.metric, fast=cfg.fast),
                    on_progress=first, executor=executor)
    extras = dict(ctx.extras)
    sweeps = {"context_use": ctx.provenance}
    if cfg.memory:
        noi = patch_run(model, task, sites, PatchingConfig(direction="noise", metric=cfg.metric, fast=cfg.fast),
                        on_progress=offset(on_progress, seen[0], 2 * seen[0]), executor=executor)
        extras["memory_effect"] = -noi.values
        extras["memory_per_example"] = -noi.per_example if noi.per_example is not None else -noi.values[None]
        sweeps["memory_use"] = noi.provenance
    prov = make_provenance(model, task, "qa_circuit", cfg)
    prov.update({
        "sites": ctx.provenance.get("sites"),
        "direction": "denoise",
        "sanity_max_abs": ctx.provenance.get("sanity_max_abs"),
        "meaning": "values: context-use (denoise memory run with context activations); extras.memory_effect: memory-use",
        "sweeps": sweeps,
    })
    return replace(ctx, extras=extras, provenance=prov)


@dataclass
class QACircuit:
    """The heads and MLP scores of the context/memory circuits."""

    heads: Scores
    mlps: Scores

    def save(self, path: str) -> None:
        """Save as two Scores folders ``path/heads`` and ``path/mlps``."""
        self.heads.save(f"{path}/heads")
        self.mlps.save(f"{path}/mlps")

    @staticmethod
    def load(path: str) -> QACircuit:
        return QACircuit(Scores.load(f"{path}/heads"), Scores.load(f"{path}/mlps"))


def extract(model: Model, task: Task, config: QACircuitConfig | None = None) -> QACircuit:
    """Per-head and per-layer-MLP context/memory effects at the last position."""
    heads = run(model, task, SiteSpec("head", per_unit=True, positions="last"), config)
    mlps = run(model, task, SiteSpec("mlp_out", positions="last"), config)
    return QACircuit(heads, mlps)


def _tiny_inputs(model: Model) -> tuple[Task, SiteSpec]:
    """Two conflict items of one prompt length (plain format, single-token answers), unfiltered by the
    model (a tiny random model knows no capitals), and the heads of two layers at the last position."""
    from patchtrace.qa.generators import make_qa_items
    from patchtrace.qa.patching import same_length_distractor
    from patchtrace.qa.prompts import render

    tok = model.tokenizer
    by_len: dict[int, list[Example]] = {}
    for it in make_qa_items("conflict", 12, 0, tok, n_sentences=(3, 3)):
        alt = same_length_distractor(it, tok, "plain")
        if alt is None or it.memory is None:
            continue
        if any(len(tok(a, add_special_tokens=False).input_ids) != 1 for a in (it.answer, it.memory)):
            continue
        ctx, mem = render(it, tok, "plain").text, render(alt, tok, "plain").text
        by_len.setdefault(len(tok(ctx).input_ids), []).append(Example(ctx, mem, it.answer, it.memory))
    exs = max(by_len.values(), key=len)[:2]
    return Task("extractive_qa_context", exs), SiteSpec("head", per_unit=True, positions="last", layers=(0, 2))


register_method(
    "qa_circuit", QACircuitConfig, run, result=Scores, sweep=True,
    description="extractive QA: context-use (denoise) and memory-use (noise) effects of each site",
    tiny_config=QACircuitConfig, tiny_inputs=_tiny_inputs, plain_baselines=("clean", "corrupt"),
    invalid_configs=({"metric": "accuracy"}, {"fast": "yes"}, {"memory": 0}),
)
