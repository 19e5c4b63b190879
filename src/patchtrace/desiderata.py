"""Desiderata: what a set of components must do when patched, as data (Davies et al. 2023).

Desiderata-based masking (Davies et al. 2023) does not ask "how much does this component matter?"
but "is there a small set of components such that patching them from an *alternate* input into the
*original* run makes the model output a *target*?". A **desideratum** is a named set of
``(original, alternate, target)`` tuples; what the target is says what the desideratum tests:

=============  =========================================  ==========================================
kind           target                                     what it asks of the patched components
=============  =========================================  ==========================================
``value``      the alternate's answer                     they carry the value (patching moves it)
``invariance`` the original's answer                      they do *not* carry what the alternate
                                                          changed (patching must not move the output)
``other``      a third value                              anything else you can phrase as a target
=============  =========================================  ==========================================

Each tuple may also name a ``contrast`` token: the answer the run gives when the patch does *not*
work (the original's answer for ``value``, the alternate's for ``invariance``). It is used by metrics
that need two tokens (the top-k exact-patching baseline scores ``logit(target) − logit(contrast)``);
the mask training loss and the accuracy need only the target.

Validation happens before any compute, like :meth:`patchtrace.tasks.Task.tokenize`: original and
alternate of a tuple must tokenize to the same length (patching is position-wise), the target and
contrast must be single tokens, no desideratum may be empty and names must be unique. Failures raise
:class:`DesiderataError` naming the desideratum, the tuple index and the tokens at fault.

JSONL format (one tuple per line; lines of one desideratum need not be contiguous)::

    {"desideratum": "value_dependence", "kind": "value",
     "original": "a = 3\\nb = 7\\nprint(a)  # prints ", "alternate": "a = 5\\nb = 7\\nprint(a)  # prints ",
     "target": "5", "contrast": "3"}

Example:
    >>> d = Desideratum("value", [Triple("a=3;a=", "a=5;a=", "5", contrast="3")], kind="value")
    >>> len(d)
    1
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceError
from patchtrace.jsonl import iter_jsonl
from patchtrace.tokens import display_tokens

DesideratumKind = Literal["value", "invariance", "other"]
KINDS: tuple[str, ...] = ("value", "invariance", "other")


class DesiderataError(PatchtraceError, ValueError):
    """Invalid desiderata; the message names the desideratum, the tuple index and the tokens at fault."""


@dataclass(frozen=True)
class Triple:
    """One ``(original, alternate, target)`` tuple.

    Attributes:
        original: the prompt that is run (the *base* of the patch).
        alternate: the prompt whose activations are patched in (the *source*); same token length.
        target: the single next token the patched run should predict.
        contrast: optional single token the run predicts when the patch fails (see module docstring).
        meta: free-form fields kept with the data.
    """

    original: str
    alternate: str
    target: str
    contrast: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"original": self.original, "alternate": self.alternate, "target": self.target}
        if self.contrast is not None:
            d["contrast"] = self.contrast
        if self.meta:
            d["meta"] = self.meta
        return d


@dataclass
class Desideratum:
    """A named set of tuples that all test one property.

    Attributes:
        name: unique name (``value_dependence``, ``operation_invariance`` ...).
        triples: the tuples.
        kind: ``value``, ``invariance`` or ``other`` (see module docstring); informs reports and the
            baseline's metric, never the mask loss.
        weight: weight of this desideratum's loss in mask training (the paper weights value 5 : 1).
        description: one line for reports.
    """

    name: str
    triples: list[Triple]
    kind: DesideratumKind = "value"
    weight: float = 1.0
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DesiderataError(f"desideratum {self.name!r}: unknown kind {self.kind!r}; use one of {KINDS}")

    def __len__(self) -> int:
        return len(self.triples)

    def subset(self, indices: Sequence[int]) -> Desideratum:
        """The same desideratum restricted to these tuples."""
        return Desideratum(self.name, [self.triples[i] for i in indices], self.kind, self.weight, self.description)

    def hash(self) -> str:
        """SHA-256 (16 hex digits) of the tuples' JSON, for provenance."""
        blob = json.dumps([t.to_json() for t in self.triples], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "n": len(self), "weight": self.weight, "hash": self.hash()}


@dataclass
class TokenizedDesideratum:
    """A validated, tokenized desideratum.

    Attributes:
        desideratum: the source data.
        original, alternate: token ids per tuple (equal lengths within a tuple).
        target: ``[N]`` target token ids; contrast: ``[N]`` contrast ids, ``-1`` where not given.
        tokens: the original's token strings per tuple (labels).
    """

    desideratum: Desideratum
    original: list[list[int]]
    alternate: list[list[int]]
    target: Tensor
    contrast: Tensor
    tokens: list[list[str]]

    @property
    def name(self) -> str:
        return self.desideratum.name

    def __len__(self) -> int:
        return len(self.original)

    def groups(self) -> list[list[int]]:
        """Tuple indices grouped by sequence length (each group runs as one batch, no padding)."""
        by: dict[int, list[int]] = {}
        for i, ids in enumerate(self.original):
            by.setdefault(len(ids), []).append(i)
        return [by[n] for n in sorted(by)]

    def ids(self, which: Literal["original", "alternate"], indices: Sequence[int]) -> Tensor:
        """``[len(indices), T]`` token ids of equal-length tuples."""
        src = self.original if which == "original" else self.alternate
        return torch.tensor([src[i] for i in indices], dtype=torch.long)

    def subset(self, indices: Sequence[int]) -> TokenizedDesideratum:
        idx = list(indices)
        return TokenizedDesideratum(
            self.desideratum.subset(idx),
            [self.original[i] for i in idx],
            [self.alternate[i] for i in idx],
            self.target[idx],
            self.contrast[idx],
            [self.tokens[i] for i in idx],
        )


def _single_token(tokenizer: Any, text: str, where: str, what: str) -> int:
    if not isinstance(text, str) or text == "":
        raise DesiderataError(f"{where}: {what} is empty; it must be one token")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise DesiderataError(
            f"{where}: {what} {text!r} is {len(ids)} tokens {display_tokens(tokenizer.convert_ids_to_tokens(ids))}; "
            "targets must be single tokens"
        )
    return int(ids[0])


def tokenize_desiderata(desiderata: Sequence[Desideratum], tokenizer: Any) -> list[TokenizedDesideratum]:
    """Tokenize and validate every desideratum before any compute.

    Args:
        desiderata: the desiderata.
        tokenizer: a Hugging Face tokenizer.

    Returns:
        One :class:`TokenizedDesideratum` per desideratum, in order.

    Raises:
        DesiderataError: no desiderata, duplicate names, an empty desideratum, original/alternate of
            different token lengths, or a multi-token target/contrast (names desideratum, tuple, tokens).
    """
    if tokenizer is None:
        raise DesiderataError("this model has no tokenizer; desiderata are text and need one")
    if not desiderata:
        raise DesiderataError("no desiderata given")
    seen: set[str] = set()
    out = []
    for d in desiderata:
        if d.name in seen:
            raise DesiderataError(f"desideratum name {d.name!r} appears twice; names must be unique")
        seen.add(d.name)
        if not d.triples:
            raise DesiderataError(f"desideratum {d.name!r} has no tuples")
        orig: list[list[int]] = []
        alt: list[list[int]] = []
        tgt: list[int] = []
        con: list[int] = []
        for i, t in enumerate(d.triples):
            where = f"desideratum {d.name!r}, tuple {i}"
            o = tokenizer(t.original).input_ids
            a = tokenizer(t.alternate).input_ids
            if len(o) == 0:
                raise DesiderataError(f"{where}: the original prompt is empty")
            if len(o) != len(a):
                raise DesiderataError(
                    f"{where}: original has {len(o)} tokens but alternate has {len(a)}; patching is "
                    f"position-wise and needs equal lengths.\n  original:  {display_tokens(tokenizer.convert_ids_to_tokens(o))}"
                    f"\n  alternate: {display_tokens(tokenizer.convert_ids_to_tokens(a))}"
                )
            orig.append(list(o))
            alt.append(list(a))
            tgt.append(_single_token(tokenizer, t.target, where, "target"))
            con.append(-1 if t.contrast is None else _single_token(tokenizer, t.contrast, where, "contrast"))
        out.append(
            TokenizedDesideratum(
                d, orig, alt, torch.tensor(tgt, dtype=torch.long), torch.tensor(con, dtype=torch.long),
                [tokenizer.convert_ids_to_tokens(o) for o in orig],
            )
        )
    return out


def desiderata_from_task(task: Any, name: str = "value_dependence") -> Desideratum:
    """Read a contrastive :class:`~patchtrace.tasks.Task` as a value desideratum.

    Each example becomes ``(original=clean, alternate=corrupt, target=wrong, contrast=answer)``: the
    patched components should carry the corrupt prompt's answer into the clean run. Only the first
    token of a multi-token answer set is used.
    """
    triples = []
    for ex in task.examples:
        wrong = ex.wrong if isinstance(ex.wrong, str) else ex.wrong[0]
        ans = ex.answer if isinstance(ex.answer, str) else ex.answer[0]
        triples.append(Triple(ex.clean, ex.corrupt, wrong, contrast=ans, meta=dict(ex.meta)))
    return Desideratum(name, triples, kind="value", description=f"from task {task.name}")


def save_desiderata(desiderata: Sequence[Desideratum], path: str | Path) -> Path:
    """Write desiderata as JSONL (one tuple per line; see the module docstring)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for d in desiderata:
        for t in d.triples:
            rec = {"desideratum": d.name, "kind": d.kind, "weight": d.weight, **t.to_json()}
            lines.append(json.dumps(rec))
    p.write_text("\n".join(lines) + "\n")
    return p


def load_desiderata(path: str | Path) -> list[Desideratum]:
    """Read desiderata from JSONL.

    Each line needs ``desideratum``, ``original``, ``alternate`` and ``target``; ``kind`` (default
    ``value``), ``weight`` (default 1), ``contrast`` and ``meta`` are optional.

    Raises:
        DesiderataError: missing file, bad JSON or a missing field (names the file and line), or
            conflicting ``kind``/``weight`` within one desideratum.
    """
    p = Path(path)
    if not p.is_file():
        raise DesiderataError(f"desiderata file {p} does not exist")
    by: dict[str, Desideratum] = {}
    for where, rec in iter_jsonl(p, DesiderataError):
        missing = [k for k in ("desideratum", "original", "alternate", "target") if not isinstance(rec.get(k), str)]
        if missing:
            raise DesiderataError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
        name, kind, weight = rec["desideratum"], rec.get("kind", "value"), float(rec.get("weight", 1.0))
        d = by.get(name)
        if d is None:
            if kind not in KINDS:
                raise DesiderataError(f"{where}: unknown kind {kind!r}; use one of {KINDS}")
            d = by[name] = Desideratum(name, [], kind=kind, weight=weight)
        elif d.kind != kind or d.weight != weight:
            raise DesiderataError(f"{where}: desideratum {name!r} given kind/weight {kind}/{weight}, earlier {d.kind}/{d.weight}")
        contrast = rec.get("contrast")
        d.triples.append(
            Triple(rec["original"], rec["alternate"], rec["target"], None if contrast is None else str(contrast),
                   dict(rec.get("meta") or {}))
        )
    if not by:
        raise DesiderataError(f"desiderata file {p} has no tuples")
    return list(by.values())


def split_desiderata(
    desiderata: Sequence[Desideratum], train_fraction: float = 0.5, seed: int = 0
) -> tuple[list[Desideratum], list[Desideratum]]:
    """Split every desideratum's tuples into train and held-out parts (seeded shuffle).

    Raises:
        DesiderataError: a desideratum too small to give both parts at least one tuple.
    """
    import random

    if not 0.0 < train_fraction < 1.0:
        raise DesiderataError(f"train_fraction must be in (0, 1), got {train_fraction}")
    train, test = [], []
    for d in desiderata:
        idx = list(range(len(d)))
        random.Random(seed).shuffle(idx)
        k = round(len(idx) * train_fraction)
        if k < 1 or k >= len(idx):
            raise DesiderataError(f"desideratum {d.name!r} has {len(d)} tuples: too few to split {train_fraction:.0%}/rest")
        train.append(d.subset(sorted(idx[:k])))
        test.append(d.subset(sorted(idx[k:])))
    return train, test
