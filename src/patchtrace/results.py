"""Scores: the one result type every method returns.

A :class:`Scores` is a tensor with named axes (``layer``, ``head``, ``kv_head``, ``neuron``, ``pos``),
the site kind it scores, the metric and its clean/corrupt baselines, optional per-example values and
extra tensors, and provenance (library version, model and weights hash, task and its hash, method
and config, seeds). It never holds the model.

Saved as a directory with two files: ``scores.safetensors`` (all tensors) and ``scores.json``
(everything else). Nothing is pickled, so a results folder from a stranger is safe to open. The JSON
carries SHA-256 checksums of itself and of the tensor file (``checksums``), so a truncated, damaged
or edited file is named on load instead of being read as wrong numbers (:func:`read_meta`,
:func:`read_tensors`; the other saved result types use the same helpers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceError
from patchtrace.grid import Grid, GridError
from patchtrace.sites import Site

FORMAT_VERSION = 1


class ResultsError(PatchtraceError, ValueError):
    """A results folder that is missing, malformed or from an incompatible version."""


#: The key of the checksums in a result's JSON: ``{"json": ..., "<tensor file>": ...}`` (SHA-256 hex).
CHECKSUMS = "checksums"


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of a result's JSON content without its checksums (canonical: sorted keys)."""
    import hashlib

    body = {k: v for k, v in meta.items() if k != CHECKSUMS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def write_meta(folder: Path, json_name: str, meta: dict[str, Any], tensor_files: tuple[str, ...] = (), **dump: Any) -> Path:
    """Write ``meta`` as ``folder/json_name`` with checksums of itself and of ``tensor_files`` (already written).

    The JSON digest is taken over the JSON as it will read back (values ``json`` cannot write are
    stored as strings), so :func:`read_meta` recomputes the same digest.
    """
    plain = json.loads(json.dumps(meta, default=str))
    sums = {"json": _meta_digest(plain)} | {f: file_sha256(folder / f) for f in tensor_files}
    out = folder / json_name
    out.write_text(json.dumps({**plain, CHECKSUMS: sums}, **dump))
    return out


def read_meta(folder: Path, json_name: str, version: int | None = None) -> dict[str, Any]:
    """Read ``folder/json_name``: valid JSON, the expected ``format_version``, its own checksum.

    Raises:
        ResultsError: the file is not valid JSON, not an object, from another format version or
            damaged (content that does not match its checksum); the message names the file.
    """
    path = folder / json_name
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: damaged, not valid JSON ({e}); rerun the command that wrote it") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"{path}: damaged, a JSON object was expected; rerun the command that wrote it")
    if version is not None and meta.get("format_version") != version:
        raise ResultsError(f"{folder}: format version {meta.get('format_version')} is not {version}")
    sums = meta.get(CHECKSUMS)
    if isinstance(sums, dict) and "json" in sums and sums["json"] != _meta_digest(meta):
        raise ResultsError(
            f"{path}: damaged or edited (its content does not match its recorded checksum); "
            "restore it or rerun the command that wrote it"
        )
    return meta


def read_tensors(folder: Path, tensor_file: str, meta: dict[str, Any]) -> dict[str, Tensor]:
    """Load ``folder/tensor_file`` (safetensors) after checking it against the checksum in ``meta``.

    Raises:
        ResultsError: the file is damaged or truncated (names it).
    """
    from safetensors.torch import load_file

    path = folder / tensor_file
    expected = (meta.get(CHECKSUMS) or {}).get(tensor_file) if isinstance(meta.get(CHECKSUMS), dict) else None
    if expected is not None and file_sha256(path) != expected:
        raise ResultsError(
            f"{path}: damaged or truncated (its SHA-256 does not match the checksum recorded in the JSON); "
            "rerun the command that wrote it"
        )
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        raise ResultsError(f"{path}: damaged or truncated, cannot be read ({e}); rerun the command that wrote it") from None


def library_version() -> str:
    from patchtrace import __version__

    return __version__


@dataclass(frozen=True)
class Scores:
    """Labelled scores over sites.

    Attributes:
        values: the score tensor; one dimension per entry of ``axes``.
        axes: axis names, declared in :data:`patchtrace.grid.AXES`.
        site_kind: the site kind scored (``head``, ``resid_pre`` ...).
        value_name: what ``values`` holds: ``effect`` (patched − baseline metric), ``recovery``
            (normalized), ``attribution`` (an estimate of the effect), ``mask`` ...
        metric: metric name.
        baselines: at least ``clean`` and ``corrupt`` mean metric values when the method has them.
        labels: optional tick labels per axis (token strings for ``pos``).
        per_example: ``[N, *values.shape]`` values per example, when kept.
        extras: other named tensors (patched metric, per-example baselines ...).
        provenance: how it was made (see module docstring).

    Example:
        >>> s = Scores(torch.tensor([[0.1, 0.9]]), ("layer", "head"), "head")
        >>> [(str(site), round(v, 2)) for site, v in s.top_k(1)]
        [('head[0].h1', 0.9)]
    """

    values: Tensor
    axes: tuple[str, ...]
    site_kind: str
    value_name: str = "effect"
    metric: str = "logit_diff"
    baselines: dict[str, float] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)
    per_example: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.dim() != len(self.axes):
            raise ResultsError(f"values have {self.values.dim()} dims but axes are {self.axes}")
        object.__setattr__(self, "axes", tuple(self.axes))
        try:
            self.grid  # noqa: B018  (builds and validates the grid: declared axes, label lengths)
        except GridError as e:
            raise ResultsError(str(e)) from None

    @cached_property
    def grid(self) -> Grid:
        """The grid the values are laid out on (axes, model indices, fixed coordinates)."""
        return Grid.from_labels(self.site_kind, self.axes, tuple(self.values.shape), self.labels)

    def replace(self, **changes: Any) -> Scores:
        """A copy with some fields changed (Scores are frozen: results are values, not bags)."""
        return dataclasses.replace(self, **changes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def axis_value(self, axis: str, i: int) -> int:
        """The model index (layer, head, neuron, position) of entry ``i`` along ``axis``.

        A sweep over a subset (``layers=(10, 20)``) stores its real indices in ``labels['<axis>_index']``;
        the grid offset ``i`` is only a position in that list.
        """
        return self.grid.coords[self.axes.index(axis)][int(i)]

    def site_at(self, index: tuple[int, ...]) -> Site:
        """The site addressed by a multi-index into ``values`` (grid offsets mapped to model indices)."""
        return self.grid.site_at(index)

    def cell_label(self, index: tuple[int, ...]) -> str:
        """A cell's name for tables: the site string, or the axis coordinates for non-site grids.

        A non-site grid may carry a name per coordinate in ``labels["<axis>_name"]`` (edge grids do:
        ``sender_name`` / ``receiver_name``); those names are used, e.g. ``a3.h2 · m5<in>`` rather
        than the bare coordinates ``S7 · R40``.
        """
        named = [self.labels.get(f"{a}_name") for a in self.axes]
        if self.grid.addresses_sites or all(n is None for n in named):
            return self.grid.label(index)
        plain = self.grid.label(index).split(" · ")
        return " · ".join(
            str(n[i]) if n is not None and 0 <= i < len(n) else plain[k]
            for k, (n, i) in enumerate(zip(named, index, strict=True))
        )

    @property
    def direction(self) -> str | None:
        """``denoise`` / ``noise`` as recorded in provenance (top level or in the config), if any."""
        p = self.provenance
        cfg = p.get("config")
        return p.get("direction") or (cfg.get("direction") if isinstance(cfg, dict) else None)

    def importance_sign(self) -> int:
        """+1 if a larger value means a more important site, −1 if a more negative one does.

        Denoising with a higher-is-clean metric: important sites *recover* the metric (large effect).
        Noising: important sites *damage* it (most negative effect). KL is a distance to the clean run,
        so the two flip: denoising *reduces* KL (negative), noising *raises* it (positive). Values that
        are not effects (a mask, a recovery already oriented) rank largest first.
        """
        if self.value_name not in ("effect", "attribution"):
            return 1
        higher_is_clean = self.metric != "kl"
        return 1 if ((self.direction or "denoise") == "denoise") == higher_is_clean else -1

    def ranking(self, by: str = "importance") -> tuple[Tensor, str]:
        """Sort keys over ``values.flatten()`` (larger = ranked first) and a phrase saying what the order is.

        Args:
            by: ``"importance"`` (by direction and metric, see :meth:`importance_sign`), ``"value"``
                (largest first), ``"abs"`` (largest magnitude) or ``"neg"`` (most negative first).

        Raises:
            ResultsError: an unknown ``by``.
        """
        flat = self.values.detach().flatten().float()
        if by == "importance":
            sign = self.importance_sign()
            if self.value_name not in ("effect", "attribution"):
                what = f"by importance: largest {self.value_name} first"
            else:
                direction = self.direction or "denoise"
                what = {
                    (True, 1): "by importance: largest recovery first",
                    (False, -1): "by importance: largest damage first",
                    (True, -1): "by importance: largest KL reduction first",
                    (False, 1): "by importance: largest KL increase first",
                }[(direction == "denoise", sign)]
            key = flat * sign
        elif by == "value":
            key, what = flat, "largest value first"
        elif by == "abs":
            key, what = flat.abs(), "largest magnitude first"
        elif by == "neg":
            key, what = -flat, "most negative first"
        else:
            raise ResultsError(f"rank by {by!r}: use 'importance', 'value', 'abs' or 'neg'")
        return torch.nan_to_num(key, nan=-math.inf), what

    def top_indices(self, k: int = 10, by: str = "importance") -> list[tuple[int, ...]]:
        """Multi-indices into ``values`` of the ``k`` first cells in the order of :meth:`ranking`.

        Raises:
            ResultsError: ``k < 1`` or an unknown ``by``.
        """
        if k < 1:
            raise ResultsError(f"top: the number of rows must be at least 1 (got {k})")
        key, _ = self.ranking(by)
        idx = torch.topk(key, min(k, key.numel())).indices
        return [tuple(int(x) for x in torch.unravel_index(i, self.values.shape)) for i in idx]

    def _repr_html_(self) -> str:
        """In a notebook: a heatmap table and the top sites (:func:`patchtrace.report.inline.scores_html`)."""
        from patchtrace.report.inline import scores_html

        return scores_html(self)

    def top_k(self, k: int = 10, by: str = "importance") -> list[tuple[Site, float]]:
        """The ``k`` most important sites with their values.

        Args:
            k: how many (at least 1).
            by: ``"importance"`` (default: recovery for denoising, damage for noising, see
                :meth:`ranking`), ``"value"``, ``"abs"`` or ``"neg"``.

        Raises:
            ResultsError: ``k < 1`` or an unknown ``by``.
        """
        return [(self.site_at(i), float(self.values[i])) for i in self.top_indices(k, by)]

    def normalized(self) -> Tensor:
        """Values as normalized recovery (needs ``extras['patched']`` and both baselines)."""
        from patchtrace.metrics import normalize

        patched = self.extras.get("patched")
        if patched is None:
            raise ResultsError("normalized() needs the patched metric (extras['patched'])")
        return torch.as_tensor(normalize(patched, self.baselines["clean"], self.baselines["corrupt"]))

    def to_dataframe(self) -> Any:
        """One row per site: the axis indices, the site string, the value (and ``patched`` if kept)."""
        import pandas as pd

        rows = []
        patched = self.extras.get("patched")
        for multi in torch.cartesian_prod(*[torch.arange(n) for n in self.values.shape]).reshape(
            -1, self.values.dim()
        ):
            t = tuple(int(x) for x in multi)
            row: dict[str, Any] = {ax: self.axis_value(ax, i) for ax, i in zip(self.axes, t, strict=True)}
            row["site"] = self.cell_label(t)
            row[self.value_name] = float(self.values[t])
            if patched is not None and patched.shape == self.values.shape:
                row["patched"] = float(patched[t])
            rows.append(row)
        return pd.DataFrame(rows)

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``scores.safetensors`` + ``scores.json`` into directory ``path`` (created)."""
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        tensors = {"values": self.values.detach().cpu().contiguous()}
        if self.per_example is not None:
            tensors["per_example"] = self.per_example.detach().cpu().contiguous()
        for k, v in self.extras.items():
            tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
        save_file(tensors, str(p / "scores.safetensors"))
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "axes": list(self.axes),
            "site_kind": self.site_kind,
            "value_name": self.value_name,
            "metric": self.metric,
            "baselines": self.baselines,
            "labels": self.labels,
            "provenance": self.provenance,
        }
        write_meta(p, "scores.json", meta, ("scores.safetensors",), indent=2)
        return p

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Read a directory written by :meth:`save`.

        Raises:
            ResultsError: missing files, an unknown format version, or a damaged file: invalid JSON,
                a truncated tensor file, a checksum mismatch or a missing field (the message names
                the file).
        """
        p = Path(path)
        if not (p / "scores.json").is_file() or not (p / "scores.safetensors").is_file():
            raise ResultsError(f"{p} is not a patchtrace results folder (needs scores.json and scores.safetensors)")
        meta = read_meta(p, "scores.json", FORMAT_VERSION)
        t = read_tensors(p, "scores.safetensors", meta)
        extras = {k[6:]: v for k, v in t.items() if k.startswith("extra.")}
        try:
            return cls(
                values=t["values"],
                axes=tuple(meta["axes"]),
                site_kind=meta["site_kind"],
                value_name=meta["value_name"],
                metric=meta["metric"],
                baselines=meta["baselines"],
                labels=meta["labels"],
                per_example=t.get("per_example"),
                extras=extras,
                provenance=meta["provenance"],
            )
        except KeyError as e:
            raise ResultsError(f"{p}: damaged, {e} is missing from scores.json or scores.safetensors") from None
        except (TypeError, AttributeError) as e:
            raise ResultsError(f"{p}: damaged, scores.json has a field of the wrong type ({e})") from None


def make_provenance(model: Any, task: Any, method: str, config: Any, seeds: dict[str, int] | None = None) -> dict:
    """Standard provenance block: library/torch versions, model, task, method and config, seeds, time."""
    from dataclasses import asdict, is_dataclass

    cfg = asdict(config) if is_dataclass(config) and not isinstance(config, type) else dict(config or {})
    return {
        "library": "patchtrace",
        "version": library_version(),
        "torch": torch.__version__,
        "model": model.describe() if hasattr(model, "describe") else str(model),
        "task": task.describe() if hasattr(task, "describe") else str(task),
        "method": method,
        "config": cfg,
        "seeds": seeds or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
