"""``patchtrace models`` and ``patchtrace tasks``: what can be loaded and what can be asked."""

from __future__ import annotations

import re

import typer
from rich.table import Table
from rich.text import Text

from patchtrace.cli import common


def plain_text(doc: str) -> str:
    """A docstring-style description for a terminal: reST roles and literals (``:func:`x` ``,
    ````x````) shown as their text, whitespace runs folded."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1), doc)
    return " ".join(doc.replace("``", "").split())


def register(app: typer.Typer) -> None:
    """Add ``models`` and ``tasks`` to the app."""

    @app.command("models")
    def models() -> None:
        """Supported model types and the bundled model."""
        from patchtrace.models.adapters import FAMILIES
        from patchtrace.models.load import BUNDLED, DEFAULT_MODEL, ModelLoadError, bundled_gguf, cache_dir

        con = common.console()
        t = Table(title="supported architectures (HF model_type)", title_justify="left")
        t.add_column("family")
        t.add_column("model types")
        claimed: set[str] = set()
        for fam in FAMILIES:  # a model type under the family that loads it (the first that lists it)
            types = [mt for mt in fam.model_types if mt not in claimed]
            claimed.update(types)
            if types:
                t.add_row(fam.name, ", ".join(types))
        con.print(t)
        b = Table(title="bundled models (no download needed)", title_justify="left")
        b.add_column("name")
        b.add_column("weights")
        b.add_column("status")
        for name, (_pkg, fname, hub) in BUNDLED.items():
            try:
                bundled_gguf(name)
                status = "installed" + (" (cached)" if (cache_dir() / name / "model.safetensors").is_file() else "")
            except ModelLoadError as e:
                status = str(e)
            label = name + (" (default)" if name == DEFAULT_MODEL else "")
            b.add_row(label, Text(f"{hub} · {fname}"), Text(status))
        con.print(b)
        con.print("Also: any local transformers directory (safetensors) or Hugging Face id of a supported type.",
                  markup=False)
        con.print("Encoders (bert, roberta) load as masked LMs: `patch`, `trace` and `compare --model DIR` read "
                  "the metric at the one [MASK]/<mask> token each prompt must have.", markup=False)

    @app.command("tasks")
    def tasks() -> None:
        """Registered tasks (built-in generators), with descriptions."""
        from patchtrace.tasks import task_generators

        con = common.console()
        t = Table(title="registered tasks (--task NAME; '-' and '_' are the same)", title_justify="left")
        t.add_column("name")
        t.add_column("description")
        for g in task_generators():
            t.add_row(g.name, Text(plain_text(g.description)))
        con.print(t)
        con.print("Or your own data: --task file.jsonl / file.csv with fields clean, corrupt, answer, wrong.",
                  markup=False)
