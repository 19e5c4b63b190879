"""``run``: learn a mask, binarize it, evaluate it exactly — DBM's one entry point.

The steps, each in its own module: desiderata from whatever was given (:mod:`.data`), split into
training and held-out tuples and tokenized (validated before any compute); the components
(:mod:`.components`); one run cache for the whole call (:mod:`.cache`); the relaxed mask trained on
the training tuples (:mod:`.train`); optionally the exact-patching ranking; then the exact evaluation
of the kept set, the unpatched run and the top-k ranking set at equal k (:mod:`.evaluate`), all
gathered into a :class:`~patchtrace.methods.dbm.result.Mask`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from patchtrace.desiderata import Desideratum, TokenizedDesideratum, split_desiderata, tokenize_desiderata
from patchtrace.methods.dbm.cache import RunStore
from patchtrace.methods.dbm.components import components, parse_specs, prepare
from patchtrace.methods.dbm.config import DBMConfig, DBMError
from patchtrace.methods.dbm.data import DesiderataSource, as_desiderata
from patchtrace.methods.dbm.evaluate import evaluate_site_sets, exact_patching_ranking
from patchtrace.methods.dbm.result import HISTORY_KEYS, Mask
from patchtrace.methods.dbm.train import TrainedMask, train_mask
from patchtrace.methods.registry import register_method
from patchtrace.models.load import Model
from patchtrace.progress import Progress
from patchtrace.results import make_provenance
from patchtrace.sites import Site, SiteSpec


def run(
    model: Model,
    task: DesiderataSource,
    sites: str | SiteSpec | Sequence[SiteSpec | str] = "head,mlp_out",
    config: DBMConfig | None = None,
    *,
    heldout: Sequence[Desideratum] | None = None,
    on_step: Callable[[int, float, int], None] | None = None,
    on_progress: Progress | None = None,
    on_ranking_progress: Progress | None = None,
    out_dir: str | Path | None = None,
) -> Mask:
    """Learn a mask, binarize it and evaluate it exactly on held-out tuples.

    Args:
        model: a loaded model.
        task: desiderata, or a task (:func:`~patchtrace.methods.dbm.data.as_desiderata`).
        sites: site kinds, e.g. ``"head,mlp_out"`` or SiteSpecs (positions default to the last token).
        config: :class:`~patchtrace.methods.dbm.config.DBMConfig`.
        heldout: held-out desiderata; default: split ``task`` by ``config.train_fraction``.
        on_step: DBM's own telemetry, ``on_step(step, loss, n_above_threshold)`` after each step.
        on_progress: ``on_progress(done, config.steps)`` in training steps (:mod:`patchtrace.progress`).
        on_ranking_progress: ``on_progress(done, total)`` of the exact-patching baseline's sweep, which
            runs after training (``config.baseline``) and can take as long as training itself.
        out_dir: checkpoint the exact-patching ranking's sweep blocks in ``<out_dir>/ranking`` (a rerun
            resumes it); the caller saves the returned Mask.

    Returns:
        :class:`~patchtrace.methods.dbm.result.Mask`: the relaxed and binary mask over the
        components, the kept sites, the held-out evaluation (mask, unpatched, top-k exact patching at
        equal k), the training history, config and provenance.

    Raises:
        DBMError, DesiderataError: bad sites, settings or data (before any compute).

    Example:
        Sites as a string of kinds (here every layer's MLP output at the last position), training
        progress through ``on_progress``, and no exact-patching baseline:

        >>> from patchtrace import load_model, make_task
        >>> m = load_model()
        >>> seen = []
        >>> mask = run(m, make_task("ioi", n=4), "mlp_out", DBMConfig(steps=5, baseline=False),
        ...            on_progress=lambda done, total: seen.append((done, total)))
        >>> len(mask.sites), seen[-1]                    # 30 components; 5 of 5 steps done
        (30, (5, 5))
        >>> set(mask.binary.tolist()) <= {0.0, 1.0}, len(mask.kept) == int(mask.binary.sum())
        (True, True)
    """
    if not model.family.causal:
        raise DBMError(f"DBM does not support {model.family.name} (an encoder): its desiderata are read at the last "
                       "position and its masked forwards resume after the cached prefix (suffix only), neither of "
                       "which holds with bidirectional attention; on encoders use activation patching, causal "
                       "tracing, AtP, IG or RelP")
    cfg = config or DBMConfig()
    ds = as_desiderata(task)
    specs = parse_specs(sites)
    comps = components(model, specs)
    train, test = split_desiderata(ds, cfg.train_fraction, cfg.seed) if heldout is None else (ds, list(heldout))
    train_t = tokenize_desiderata(train, model.tokenizer)
    test_t = tokenize_desiderata(test, model.tokenizer)
    runs = RunStore({c.point for c in comps})  # one cache: training, ranking and evaluation share every run
    steps = _steps_callback(on_step, on_progress, cfg.steps)
    trained = train_mask(model, train_t, comps, cfg, on_step=steps, prepared=prepare(model, train_t, comps, runs))
    ranking = (
        exact_patching_ranking(model, train_t, specs, max_memory=cfg.max_memory, runs=runs,
                               out_dir=None if out_dir is None else Path(out_dir) / "ranking",
                               on_progress=on_ranking_progress)
        if cfg.baseline else []
    )
    evaluation = _evaluate(model, train_t, test_t, trained, ranking, cfg, runs)
    kept = set(trained.kept)
    prov = make_provenance(model, None, "dbm", cfg)
    prov["task"] = {"desiderata": [d.describe() for d in ds]}
    prov["sites"] = [str(s) for s in specs]
    scores = dict(ranking)
    return Mask(
        sites=tuple(comps),
        mask=trained.mask,
        binary=torch.tensor([1.0 if s in kept else 0.0 for s in comps]),
        kept=tuple(trained.kept),
        evaluation=evaluation,
        history={k: torch.tensor([h[k] for h in trained.history], dtype=torch.float32) for k in HISTORY_KEYS},
        config=asdict(cfg),
        provenance=prov,
        specs=tuple(str(s) for s in specs),
        baseline_score=torch.tensor([scores.get(s, 0.0) for s in comps]) if ranking else None,
    )


def _steps_callback(
    on_step: Callable[[int, float, int], None] | None, on_progress: Progress | None, total: int
) -> Callable[[int, float, int], None] | None:
    """One ``on_step`` for training that feeds both DBM's telemetry and the shared progress protocol."""
    if on_step is None and on_progress is None:
        return None

    def fn(step: int, loss: float, n_above: int) -> None:
        if on_step is not None:
            on_step(step, loss, n_above)
        if on_progress is not None:
            on_progress(step + 1, total)

    return fn


def _evaluate(
    model: Model,
    train_t: Sequence[TokenizedDesideratum],
    test_t: Sequence[TokenizedDesideratum],
    trained: TrainedMask,
    ranking: list[tuple[Site, float]],
    cfg: DBMConfig,
    runs: RunStore,
) -> dict[str, Any]:
    """Held-out accuracies of the kept set, the unpatched run and (with a ranking) the top-k set."""
    k = len(trained.kept)
    site_sets: list[list[Site]] = [trained.kept, []] + ([[s for s, _ in ranking[:k]]] if ranking else [])
    acc = evaluate_site_sets(model, test_t, site_sets, max_memory=cfg.max_memory, runs=runs)
    train_acc = evaluate_site_sets(model, train_t, [trained.kept], max_memory=cfg.max_memory, runs=runs)
    names = [td.name for td in test_t]
    ev: dict[str, Any] = {
        "desiderata": names,
        "n_components": len(trained.sites),
        "n_kept": k,
        "accuracy": float(acc[0].mean()),
        "accuracy_per_desideratum": dict(zip(names, acc[0].tolist(), strict=True)),
        "train_accuracy": float(train_acc[0].mean()),
        "unpatched_accuracy": float(acc[1].mean()),
        "unpatched_per_desideratum": dict(zip(names, acc[1].tolist(), strict=True)),
        "n_train": {td.name: len(td) for td in train_t},
        "n_heldout": {td.name: len(td) for td in test_t},
    }
    if ranking:
        ev["topk_accuracy"] = float(acc[2].mean())
        ev["topk_per_desideratum"] = dict(zip(names, acc[2].tolist(), strict=True))
        ev["topk_sites"] = [str(s) for s in site_sets[2]]
    return ev


def _tiny_inputs(model: Model) -> tuple[Any, SiteSpec]:
    """Four IOI examples read as one value desideratum (half held out), and the heads of two layers."""
    from patchtrace.tasks import make_task

    return make_task("ioi", n=4, seed=0), SiteSpec("head", per_unit=True, positions="last", layers=(1, 2))


register_method(
    "dbm", DBMConfig, run, result=Mask, sweep=False,
    description="desiderata-based masking: learn a sparse mask of components, evaluate the kept set exactly",
    tiny_config=lambda: DBMConfig(lam=0.05, steps=3, lr=0.1), tiny_inputs=_tiny_inputs,
    invalid_configs=({"lam": -1.0}, {"steps": -1}, {"lr": 0.0}, {"parametrization": "magic"},
                     {"threshold": 1.5}, {"train_fraction": 0.0}),
)
