"""``patchtrace finetune``: train only the layers a localization chose (LoRA or the layers themselves).

Example::

    patchtrace trace --task facts.jsonl --kind mlp --window 5 --out runs/trace-facts
    patchtrace finetune --localize runs/trace-facts --k 3 --task facts.jsonl --steps 40 --out runs/ft
    patchtrace finetune --localize 2,3,4 --method layers --targets mlp --task facts.jsonl --out runs/ft-layers

``--localize`` is a results folder (any :class:`~patchtrace.results.Scores` with a ``layer`` axis;
its ``--k`` most important layers are used) or a layer list like ``2,3,4`` / ``10-12``. The model
learns to continue each example's prompt (``clean``) with its ``answer``. ``--method lora`` trains
LoRA adapters on the ``--targets`` modules of those layers (peft) and merges them;
``--method layers`` trains those modules' weights directly. Either way the result is a weight patch
(``<out>/patch``, see ``patchtrace weights info``) and ``<out>/finetune.json`` (layers, losses,
trainable parameters, exact match before/after, time); the loaded model itself is not saved.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from patchtrace.cli import common


def _layers(localize: str, k: int) -> tuple[list[int], str]:
    p = Path(localize)
    if p.is_dir():
        from patchtrace.results import Scores
        from patchtrace.weights.lora import layers_from_scores

        s = Scores.load(p)
        return layers_from_scores(s, k), f"top {k} layers of {p} ({s.site_kind}, {s.value_name})"
    try:
        layers = common.parse_layers(localize)
    except common.CLIError:
        layers = None
    if not layers:
        raise common.CLIError(f"--localize {localize!r}: not a results folder nor layers like '2,3,4' or '10-12'")
    return list(layers), "given"


def register(app: typer.Typer) -> None:
    """Add ``finetune`` to the app."""

    @app.command("finetune")
    def finetune(
        localize: Annotated[str, typer.Option(help="results folder (Scores with a layer axis) or layers like '2,3,4'")],
        task: Annotated[str, typer.Option(help="built-in task or .jsonl/.csv: learn prompt (clean) → answer")] = "factual",
        model: Annotated[str, typer.Option(help="bundled name, local directory or Hugging Face id")] = "smollm2-135m",
        n: Annotated[int | None, typer.Option(help="examples (built-in tasks; a file: its first n)")] = None,
        seed: Annotated[int, typer.Option(help="task and initialisation seed")] = 0,
        k: Annotated[int, typer.Option(help="layers taken from a results folder")] = 3,
        method: Annotated[str, typer.Option(help="lora (adapters, merged) or layers (train the modules themselves)")] = "lora",
        targets: Annotated[str, typer.Option(help="modules in each layer: mlp, attn, kv or names like down_proj")] = "mlp",
        rank: Annotated[int, typer.Option(help="LoRA rank")] = 8,
        alpha: Annotated[float, typer.Option(help="LoRA alpha")] = 16.0,
        steps: Annotated[int, typer.Option(help="optimizer steps")] = 40,
        lr: Annotated[float, typer.Option(help="learning rate (Adam)")] = 2e-3,
        batch: Annotated[int, typer.Option(help="examples per step")] = 16,
        out: Annotated[str | None, typer.Option(help="output folder (default runs/finetune-<task>)")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output folder")] = False,
        device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
        trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="let transformers run the model repo's code")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    ) -> None:
        """Fine-tune only the localized layers; save the update as a weight patch."""
        from patchtrace.weights.lm_tune import answer_batches, exact_match, lm_loss

        con = common.console()
        if method not in ("lora", "layers"):
            raise common.CLIError(f"--method {method!r}: use 'lora' or 'layers'")
        for value, option in ((steps, "--steps"), (batch, "--batch"), (rank, "--rank"), (k, "--k")):
            common.check_count(value, option)
        for fvalue, option in ((alpha, "--alpha"), (lr, "--lr")):
            if common.check_finite(fvalue, option) <= 0:
                raise common.CLIError(f"{option} {fvalue}: must be positive")
        common.check_task(task, n or 1)
        folder = Path(out or Path("runs") / f"finetune-{Path(task).stem}")
        common.check_out(folder)
        if (folder / "patch").exists() and not overwrite:
            raise common.CLIError(f"--out {folder}: holds a patch already; choose another folder or pass --overwrite")
        layers, how = _layers(localize, k)
        t0 = time.perf_counter()
        m = common.load(model, device, "float32", trust_remote_code)
        if max(layers) >= m.dims.n_layers:
            raise common.CLIError(f"--localize: layer {max(layers)} is out of range (the model has {m.dims.n_layers})")
        tsk = common.build_task(task, n, seed, m)
        pairs = [(e.clean, e.answer if isinstance(e.answer, str) else e.answer[0]) for e in tsk.examples]
        batches = answer_batches(m.tokenizer, pairs, batch)
        before = exact_match(m.hf, batches)
        con.print(f"model {m.name} · task {tsk.name} ({len(pairs)} pairs, exact match {100 * before:.0f}%) · "
                  f"{method} on {targets} of layers {layers} ({how})", markup=False)
        with common.progress(f"{method} fine-tune", quiet=quiet) as bar:
            def note(step: int, loss: float) -> None:
                bar.update(step + 1, steps, f"loss {loss:.4f}")

            info = _train(m, method, layers, targets, batches, lm_loss, steps, lr, rank, alpha, seed, note)
        patch = info.pop("patch")
        if method == "layers":  # the model holds the trained weights
            after = exact_match(m.hf, batches)
        else:  # LoRA left the model as it was: evaluate with the merged patch applied for the block
            with patch.applied(m.hf):
                after = exact_match(m.hf, batches)
        folder.mkdir(parents=True, exist_ok=True)
        patch.save(folder / "patch")
        record = {"layers": layers, "localize": localize, "method": method, "targets": targets, "task": task,
                  "pairs": len(pairs), "exact_match_before": before, "exact_match_after": after,
                  "seconds": time.perf_counter() - t0, **info}
        (folder / "finetune.json").write_text(json.dumps(record, indent=1))
        con.print(f"exact match {100 * before:.0f}% → {100 * after:.0f}% · trainable {info['trainable']:,} of "
                  f"{info['total']:,} parameters · patch {patch.nbytes:,} bytes · saved {folder}", markup=False)


def _train(m: Any, method: str, layers: list[int], targets: str, batches: Any, loss: Any, steps: int, lr: float,
           rank: int, alpha: float, seed: int, note: Any) -> dict[str, Any]:
    if method == "lora":
        from patchtrace.weights.lora import train_lora

        run = train_lora(m.hf, layers, batches, loss, steps, lr, targets, rank, alpha, seed, on_loss=note)
        return {"patch": run.patch, "losses": run.losses, "trainable": run.trainable, "total": run.total,
                "adapter_bytes": run.adapter_bytes, "train_seconds": run.seconds}
    from patchtrace.weights.finetune import finetune
    from patchtrace.weights.lora import _targets
    from patchtrace.weights.select import layer_of

    names = _targets(targets)
    wanted = set(layers)

    def pick(n: str) -> bool:
        return layer_of(n) in wanted and any(f".{t}." in n for t in names)

    up = finetune(m.hf, pick, batches, loss, steps, lr, on_loss=note)
    return {"patch": up.patch, "losses": up.losses, "trainable": up.trainable, "total": up.total,
            "train_seconds": up.seconds}
