"""Reading and writing extractive-QA items as JSONL (one :class:`~patchtrace.qa.items.QAItem` per line).

Fields: ``sentences`` (list of strings), ``question``, ``answer`` (the next-token text, e.g.
``" Lyon"``), ``gold`` (index of the source sentence); optional ``prefix`` (answer lead-in),
``kind``, ``memory`` (closed-book answer), ``subject``; other fields go to ``meta``. Errors name the
file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from patchtrace.jsonl import iter_jsonl
from patchtrace.qa.items import QAItem
from patchtrace.tasks.base import TaskError


def load_qa_jsonl(path: str | Path) -> list[QAItem]:
    """Read QA items from JSONL, one object per line.

    Fields: ``sentences`` (list of strings), ``question``, ``answer`` (the next-token text, e.g.
    ``" Lyon"``), ``gold`` (index of the source sentence); optional ``prefix`` (answer lead-in),
    ``kind``, ``memory`` (closed-book answer), ``subject``; other fields go to ``meta``.

    Raises:
        TaskError: missing file, bad JSON, or a bad record (names the line).
    """
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"QA file {p} does not exist")
    out = []
    for where, rec in iter_jsonl(p, TaskError):
        out.append(QAItem.from_json(rec, where))
    if not out:
        raise TaskError(f"QA file {p} has no records")
    return out


def save_qa_jsonl(items: Sequence[QAItem], path: str | Path) -> Path:
    """Write items as JSONL (readable by :func:`load_qa_jsonl`)."""
    p = Path(path)
    p.write_text("".join(json.dumps(it.to_json()) + "\n" for it in items))
    return p
