"""Two-hop queries: the record, its validation and the JSONL format.

A :class:`TwoHopQuery` is the composed prompt with its target aliases, plus what the analyses need:
the first-hop entity as written in the prompt (``entity``, for ``--position e1`` and the bridge
readout), the bridge entity, the relation name (the fix-rate statistic is split by it) and the two
one-hop prompts that classify the query (does the model know each hop on its own?).

JSONL fields (one object per line)::

    {"prompt": "The capital of the country where Lyon is located is", "target": "Paris",
     "aliases": ["Paris"], "entity": "Lyon", "bridge": "France", "relation": "capital",
     "hop1_prompt": "Lyon is a city in the country of", "hop2_prompt": "The capital of France is",
     "hop1_ok": true, "hop2_ok": true}

``prompt``, ``target`` and ``aliases`` are required; everything else is optional. Every record is
checked when it is read (before any model runs), and an error names the file, line and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchtrace.errors import PatchtraceError
from patchtrace.jsonl import iter_jsonl


class MultihopError(PatchtraceError, ValueError):
    """A two-hop query or an analysis option that cannot be used (the message names the item)."""


_STR_FIELDS = ("entity", "bridge", "relation", "hop1_prompt", "hop2_prompt")
_BOOL_FIELDS = ("hop1_ok", "hop2_ok")
KNOWN_FIELDS = frozenset({"prompt", "target", "aliases", "bridge_aliases", *_STR_FIELDS, *_BOOL_FIELDS})


def usable_aliases(aliases: Iterable[str]) -> tuple[str, ...]:
    """Aliases kept for substring matching: stripped, longer than one character (the paper's code
    drops aliases of length ≤ 1, which match almost any text), without duplicates."""
    out: list[str] = []
    for a in aliases:
        a = a.strip()
        if len(a) > 1 and a.lower() not in (x.lower() for x in out):
            out.append(a)
    return tuple(out)


def matches(text: str, aliases: Sequence[str]) -> bool:
    """Case-insensitive substring match of any alias in ``text`` (aliases already filtered)."""
    low = text.lower()
    return any(a.lower() in low for a in aliases)


@dataclass(frozen=True)
class TwoHopQuery:
    """One two-hop query ``e1 → bridge → target``.

    Attributes:
        prompt: the composed prompt, e.g. "The capital of the country where Lyon is located is".
        target: the answer (its first token is the log-probability metric's token).
        aliases: strings that count as the answer in generated text (≤ 1 character dropped; the
            target itself is always included).
        entity: the first-hop entity exactly as written in ``prompt`` (its last token is ``e1``).
        bridge: the bridge entity (the first hop's answer).
        relation: the second relation's name (``capital``, ``currency`` ...).
        hop1_prompt: a prompt whose answer is the bridge.
        hop2_prompt: a prompt whose answer is the target, asked about the bridge directly.
        bridge_aliases: strings that count as the bridge (default: the bridge).
        hop1_ok / hop2_ok: whether the model answers each hop (None: not classified yet).
        name: where it came from (``file:line`` or ``kb:<n>``), used in error messages.
    """

    prompt: str
    target: str
    aliases: tuple[str, ...]
    entity: str | None = None
    bridge: str | None = None
    relation: str = "unknown"
    hop1_prompt: str | None = None
    hop2_prompt: str | None = None
    bridge_aliases: tuple[str, ...] = ()
    hop1_ok: bool | None = None
    hop2_ok: bool | None = None
    name: str = field(default="query", compare=False)

    def __post_init__(self) -> None:
        where = self.name
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise MultihopError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(self.target, str) or not self.target.strip():
            raise MultihopError(f"{where}: 'target' is empty (every query needs an answer)")
        al = usable_aliases((self.target, *self.aliases))
        object.__setattr__(self, "aliases", al)
        if self.entity is not None and self.entity not in self.prompt:
            raise MultihopError(f"{where}: entity {self.entity!r} does not occur in the prompt {self.prompt!r}")
        if self.bridge is not None:
            object.__setattr__(self, "bridge_aliases", usable_aliases((self.bridge, *self.bridge_aliases)))

    @property
    def both_hops_ok(self) -> bool:
        """The model answers both hops on their own (the subset the back-patching statistic is about)."""
        return bool(self.hop1_ok) and bool(self.hop2_ok)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
        d["aliases"] = list(self.aliases)
        d["bridge_aliases"] = list(self.bridge_aliases)
        return {k: v for k, v in d.items() if v is not None and v != []}


def from_record(rec: dict[str, Any], name: str) -> TwoHopQuery:
    """A query from one JSON object; checks every field's presence and type.

    Raises:
        MultihopError: a missing ``prompt``/``target``/``aliases``, a field of the wrong type, an
            unknown field, or an entity not in the prompt (the message names ``name`` and the field).
    """
    for req in ("prompt", "target", "aliases"):
        if req not in rec:
            raise MultihopError(f"{name}: missing required field {req!r}")
    unknown = sorted(set(rec) - KNOWN_FIELDS)
    if unknown:
        raise MultihopError(f"{name}: unknown field {unknown[0]!r} (known: {', '.join(sorted(KNOWN_FIELDS))})")
    for key in ("aliases", "bridge_aliases"):
        v = rec.get(key, [])
        if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
            raise MultihopError(f"{name}: {key!r} must be a list of strings")
    for key in ("prompt", "target", *_STR_FIELDS):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise MultihopError(f"{name}: {key!r} must be a string")
    for key in _BOOL_FIELDS:
        if key in rec and rec[key] is not None and not isinstance(rec[key], bool):
            raise MultihopError(f"{name}: {key!r} must be true or false")
    kw = dict(rec)
    kw["aliases"] = tuple(rec["aliases"])
    kw["bridge_aliases"] = tuple(rec.get("bridge_aliases", []))
    if kw.get("relation") is None:
        kw["relation"] = "unknown"
    return TwoHopQuery(**kw, name=name)


def load_jsonl(path: str | Path) -> list[TwoHopQuery]:
    """Read two-hop queries from a JSONL file (see the module docstring for the fields).

    Raises:
        MultihopError: a missing file, invalid JSON, or an invalid record (names ``file:line``).
    """
    p = Path(path)
    if not p.is_file():
        raise MultihopError(f"two-hop file {p} does not exist")
    out = [from_record(rec, where) for where, rec in iter_jsonl(p, MultihopError)]
    if not out:
        raise MultihopError(f"{p}: no queries")
    return out


def save_jsonl(queries: Iterable[TwoHopQuery], path: str | Path) -> Path:
    """Write queries as JSONL (readable by :func:`load_jsonl`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(q.to_json()) + "\n" for q in queries))
    return p


def entity_last_token(tokenizer: Any, q: TwoHopQuery) -> int:
    """Position of the last token of ``q.entity`` in ``q.prompt`` (``--position e1``).

    Uses the tokenizer's character offsets: the last token that starts before the entity's end.

    Raises:
        MultihopError: the query has no entity, or the tokenizer gives no offsets.
    """
    if q.entity is None:
        raise MultihopError(f"{q.name}: --position e1 needs the first-hop entity ('entity' field)")
    start = q.prompt.index(q.entity)
    end = start + len(q.entity)
    try:
        enc = tokenizer(q.prompt, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise MultihopError(f"{q.name}: the tokenizer gives no character offsets ({e})") from None
    last = None
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and a < end and b > start:
            last = t
    if last is None:
        raise MultihopError(f"{q.name}: entity {q.entity!r} maps to no token")
    return last


__all__ = [
    "MultihopError",
    "TwoHopQuery",
    "entity_last_token",
    "from_record",
    "load_jsonl",
    "matches",
    "save_jsonl",
    "usable_aliases",
]
