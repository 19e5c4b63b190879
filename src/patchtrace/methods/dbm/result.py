"""The result of DBM: a :class:`Mask`, typed and saveable, not a grid of effects.

A mask is a set of components with a relaxed value in ``[0, 1]`` each, the binarized set that was
kept, how that set did on held-out tuples, how training went, and how it was made. It is not a
:class:`~patchtrace.results.Scores` (whose values are effects of patching one site on a grid), so it
has its own type; :meth:`Mask.to_scores` gives per-kind ``Scores`` *views* of the mask values for
the heatmaps and tables that already know how to draw a grid.

Saved as a folder (never pickled; the same conventions as :meth:`Scores.save`)::

    mask.safetensors   mask [C], binary [C], history.<loss|task|penalty|n_above> [steps],
                       baseline_score [C] (when the exact-patching baseline ran)
    mask.json          format_version, components and kept sites as site strings, site specs,
                       evaluation, config, provenance, the names of the view folders
    <kind>/            one Scores folder per site kind (scores.json + scores.safetensors): the views,
                       so ``patchtrace show`` and ``patchtrace report`` display a mask folder as is

:meth:`Mask.load` reads it back (and, for folders written before masks had their own type, the
DBM ``Scores`` folder they were: :func:`mask_from_scores`).

Example:
    >>> import torch
    >>> m = Mask((Site("mlp_out", 0, None, -1), Site("mlp_out", 1, None, -1)), torch.tensor([0.9, 0.1]),
    ...          torch.tensor([1.0, 0.0]), (Site("mlp_out", 0, None, -1),), {"accuracy": 1.0}, {}, {}, {})
    >>> [str(s) for s in m.kept], [round(v, 2) for v in m.to_scores()["mlp_out"].values.tolist()]
    (['mlp_out[0]@-1'], [0.9, 0.1])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from patchtrace.methods.dbm.components import kind_grid
from patchtrace.methods.dbm.config import DBMError
from patchtrace.results import ResultsError, Scores, read_meta, read_tensors, write_meta
from patchtrace.sites import Site, parse_site

MASK_FORMAT_VERSION = 1
HISTORY_KEYS = ("loss", "task", "penalty", "n_above")
SEMANTICS = "m=1: component patched from the alternate into the original run; kept = m > threshold"


@dataclass(frozen=True)
class Mask:
    """A learned DBM mask and its exact evaluation.

    Attributes:
        sites: the components, in mask order.
        mask: ``[C]`` relaxed mask in ``[0, 1]`` (1 = patched from the alternate).
        binary: ``[C]`` binarized mask (1.0 = kept).
        kept: the kept components (``binary == 1``), in mask order.
        evaluation: held-out numbers: ``accuracy`` (mask), ``unpatched_accuracy``, per-desideratum
            dicts, ``train_accuracy``, counts, and with the baseline ``topk_accuracy`` /
            ``topk_sites`` (top-k exact activation patching at equal k).
        history: per training step, tensors ``loss``, ``task``, ``penalty``, ``n_above``.
        config: the :class:`~patchtrace.methods.dbm.config.DBMConfig` as a dict.
        provenance: library, model, desiderata, method, config, creation time.
        specs: the site specs the components came from (as strings).
        baseline_score: ``[C]`` exact-patching score of each component (None without the baseline).

    Raises:
        DBMError: mask, binary, sites (and baseline_score) of different lengths.
    """

    sites: tuple[Site, ...]
    mask: Tensor
    binary: Tensor
    kept: tuple[Site, ...]
    evaluation: dict[str, Any]
    history: dict[str, Tensor]
    config: dict[str, Any]
    provenance: dict[str, Any]
    specs: tuple[str, ...] = ()
    baseline_score: Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        n = len(self.sites)
        sizes = [self.mask.numel(), self.binary.numel()] + ([] if self.baseline_score is None else [self.baseline_score.numel()])
        if any(s != n for s in sizes):
            raise DBMError(f"mask of {n} components has tensors of sizes {sizes}")

    def __repr__(self) -> str:
        acc = self.evaluation.get("accuracy")
        shown = ", ".join(str(s) for s in self.kept[:6]) + (", ..." if len(self.kept) > 6 else "")
        return (f"Mask({len(self.kept)} of {len(self.sites)} components kept: [{shown}]"
                + (f", held-out accuracy {acc:.3f}" if isinstance(acc, float) else "") + ")")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The site kinds of the components, in order of first appearance."""
        return tuple(dict.fromkeys(s.kind for s in self.sites))

    def _repr_html_(self) -> str:
        """In a notebook: kept sites, accuracy and per-kind heatmaps (:func:`patchtrace.report.inline.mask_html`)."""
        from patchtrace.report.inline import mask_html

        return mask_html(self)

    def to_scores(self) -> dict[str, Scores]:
        """Per site kind, a :class:`Scores` view of the relaxed mask on its grid.

        Each view has ``value_name="mask"``, ``extras["binary"]`` (and ``extras["baseline_score"]``)
        on the same grid, ``baselines`` holding the held-out desiderata accuracies (``metric`` names
        them: ``desiderata_accuracy``) and the mask's provenance.
        """
        base = {k: float(v) for k, v in (("unpatched", self.evaluation.get("unpatched_accuracy")),
                                         ("mask", self.evaluation.get("accuracy")),
                                         ("top_k", self.evaluation.get("topk_accuracy"))) if v is not None}
        out = {}
        for kind in self.kinds:
            values, axes, labels = kind_grid(kind, self.sites, self.mask)
            extras = {"binary": kind_grid(kind, self.sites, self.binary)[0]}
            if self.baseline_score is not None:
                extras["baseline_score"] = kind_grid(kind, self.sites, self.baseline_score)[0]
            prov = {**self.provenance, "view": f"DBM mask values of the {kind} components", "sites": kind}
            out[kind] = Scores(values, axes, kind, value_name="mask", metric="desiderata_accuracy",
                               baselines=base, labels=labels, extras=extras, provenance=prov)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the mask folder (see the module docstring); returns ``path``."""
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        _clear_views(p)
        tensors = {"mask": self.mask, "binary": self.binary,
                   **{f"history.{k}": v for k, v in self.history.items()}}
        if self.baseline_score is not None:
            tensors["baseline_score"] = self.baseline_score
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(p / "mask.safetensors"))
        views = self.to_scores()
        meta = {
            "format_version": MASK_FORMAT_VERSION, "type": "dbm_mask", "semantics": SEMANTICS,
            "sites": [str(s) for s in self.sites], "kept": [str(s) for s in self.kept], "specs": list(self.specs),
            "evaluation": self.evaluation, "config": self.config, "provenance": self.provenance, "views": list(views),
        }
        write_meta(p, "mask.json", meta, ("mask.safetensors",), indent=2)  # with checksums
        for kind, s in views.items():
            s.save(p / kind)
        return p

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """Read a folder written by :meth:`save` (or a DBM ``Scores`` folder of the earlier format).

        Raises:
            ResultsError: no mask there, an unknown format version, or a damaged file (named).
        """
        p = Path(path)
        if not (p / "mask.json").is_file():
            if (p / "scores.json").is_file():
                return mask_from_scores(Scores.load(p))
            raise ResultsError(f"{p} is not a DBM mask folder (needs mask.json and mask.safetensors)")
        meta = read_meta(p, "mask.json", MASK_FORMAT_VERSION)
        if not (p / "mask.safetensors").is_file():
            raise ResultsError(f"{p}: mask.safetensors is missing")
        t = read_tensors(p, "mask.safetensors", meta)
        return cls(
            tuple(parse_site(s) for s in meta["sites"]), t["mask"], t["binary"],
            tuple(parse_site(s) for s in meta["kept"]), meta["evaluation"],
            {k[8:]: v for k, v in t.items() if k.startswith("history.")}, meta["config"], meta["provenance"],
            tuple(meta.get("specs", ())), t.get("baseline_score"),
        )


def _clear_views(p: Path) -> None:
    """Remove the view folders an earlier mask saved at ``p`` (so ``show`` never mixes in stale kinds)."""
    old = p / "mask.json"
    if not old.is_file():
        return
    try:
        views = json.loads(old.read_text()).get("views", [])
    except (ValueError, AttributeError):  # a damaged mask.json: nothing known to clear
        return
    for kind in views:
        for f in ("scores.json", "scores.safetensors", "heatmap.png"):
            (p / kind / f).unlink(missing_ok=True)


def load_mask(path: str | Path) -> Mask:
    """Load a saved mask (:meth:`Mask.load`)."""
    return Mask.load(path)


def mask_from_scores(scores: Scores) -> Mask:
    """Read a DBM result saved before masks had their own type (a ``Scores`` carrying the mask).

    Raises:
        DBMError: the scores were not made by DBM.
    """
    prov = scores.provenance
    if prov.get("method") != "dbm" or "mask" not in scores.extras:
        raise DBMError("these scores were not produced by DBM (no mask in extras)")
    history = {k: scores.extras[f"history.{k}"] for k in HISTORY_KEYS if f"history.{k}" in scores.extras}
    return Mask(
        tuple(parse_site(s) for s in prov["components"]), scores.extras["mask"], scores.extras["binary"],
        tuple(parse_site(s) for s in prov["kept"]), dict(prov.get("evaluation", {})), history,
        dict(prov.get("config", {})), dict(prov), tuple(prov.get("sites", ())), scores.extras.get("baseline_score"),
    )
