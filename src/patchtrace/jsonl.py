"""One JSONL reader for every data file the library reads (tasks, desiderata, extractive-QA items).

It lives outside :mod:`patchtrace.tasks` so that :mod:`patchtrace.desiderata` can read files without
importing the tasks package (whose registry imports the variable-binding generator, which builds
desiderata): data modules depend on this leaf, never on each other's package initialisation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: Path, error: type[Exception]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", record)`` for each non-empty line of a JSONL file.

    Args:
        path: the file.
        error: the exception type to raise (each data kind has its own: ``TaskError``,
            ``DesiderataError`` ...).

    A UTF-8 byte-order mark at the start (some editors write one) is skipped.

    Raises:
        error: a file that is not UTF-8 text, a line that is not valid JSON or not an object,
            naming the file and line.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 JSONL, one object per line") from None
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise error(f"{path}:{i}: each line must be a JSON object")
        yield f"{path}:{i}", rec
