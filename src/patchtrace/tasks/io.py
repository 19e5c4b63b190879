"""Load user tasks from JSONL or CSV.

Each record needs ``clean``, ``corrupt``, ``answer`` and ``wrong``. In JSONL, ``answer``/``wrong`` may
be a string or a list of strings (a set of acceptable tokens). In CSV they are strings; several
tokens are separated by ``|``. Other fields go into the example's ``meta``. Errors name the file and
the line.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from patchtrace.jsonl import iter_jsonl
from patchtrace.tasks.base import Example, Task, TaskError

REQUIRED = ("clean", "corrupt", "answer", "wrong")


def _example(rec: dict[str, Any], where: str) -> Example:
    missing = [k for k in REQUIRED if k not in rec or rec[k] in (None, "")]
    if missing:
        raise TaskError(f"{where}: missing field(s) {', '.join(missing)} (need {', '.join(REQUIRED)})")

    def ans(v: Any) -> str | tuple[str, ...]:
        if isinstance(v, list):
            return tuple(str(x) for x in v)
        return str(v)

    meta = {k: v for k, v in rec.items() if k not in REQUIRED}
    return Example(str(rec["clean"]), str(rec["corrupt"]), ans(rec["answer"]), ans(rec["wrong"]), meta)


def load_task(path: str | Path, name: str | None = None) -> Task:
    """Read a ``.jsonl`` or ``.csv`` file into a :class:`Task`.

    Raises:
        TaskError: unreadable file, bad JSON, or a record missing a field (names the line).
    """
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"task file {p} does not exist")
    exs: list[Example] = []
    if p.suffix == ".csv":
        try:
            with p.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is skipped
                for i, row in enumerate(csv.DictReader(f), start=2):
                    rec: dict[str, Any] = dict(row)
                    for k in ("answer", "wrong"):
                        if isinstance(rec.get(k), str) and "|" in rec[k]:
                            rec[k] = rec[k].split("|")
                    exs.append(_example(rec, f"{p}:{i}"))
        except (UnicodeDecodeError, csv.Error) as e:
            raise TaskError(f"{p}: not a readable UTF-8 CSV file ({e})") from None
    else:
        for where, rec in iter_jsonl(p, TaskError):
            exs.append(_example(rec, where))
    if not exs:
        raise TaskError(f"task file {p} has no examples")
    return Task(name or p.stem, exs, {"file": str(p)})
