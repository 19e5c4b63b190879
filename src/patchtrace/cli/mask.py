"""``patchtrace mask``: desiderata-based masking (DBM) — learn a sparse set of components.

Example::

    patchtrace mask --task variable_binding --sites head,mlp_out --lam 0.1 --out runs/m
    patchtrace mask --desiderata my_desiderata.jsonl --sites head --lam 0.05 --steps 100

The mask is trained on part of each desideratum's tuples and evaluated exactly on the rest
(``--train-fraction``). The results folder holds the :class:`~patchtrace.methods.dbm.Mask`
(``mask.json`` + ``mask.safetensors``: components, relaxed and binary mask, kept sites, evaluation,
training history), one Scores view per site kind (so ``patchtrace show`` / ``report`` display it) and
the desiderata used (``desiderata.jsonl``); reload with :meth:`patchtrace.methods.dbm.Mask.load`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from patchtrace.cli import common

if TYPE_CHECKING:
    from rich.console import Console

    from patchtrace.methods.dbm import Mask


def register(app: typer.Typer) -> None:
    """Add ``mask`` to the app."""

    @app.command("mask")
    def mask(
        model: str = typer.Option("smollm2-135m", help="bundled name, local directory or Hugging Face id"),
        task: str = typer.Option("variable_binding", help="built-in task (variable_binding gives two desiderata; others one value desideratum) or .jsonl/.csv task"),
        desiderata: str | None = typer.Option(None, help="desiderata JSONL file (overrides --task)"),
        n: int | None = typer.Option(None, help="tuples per desideratum of a built-in task (default 64); a task file: its first N (default all)"),
        seed: int = typer.Option(0, help="task and split seed"),
        sites: str = typer.Option("head,mlp_out", help="component kinds, e.g. head,mlp_out or neuron"),
        positions: str = typer.Option("last", help="'last', 'none' (all positions as one component) or a list like '-3,-2,-1'"),
        layers: str | None = typer.Option(None, help="layers to mask, e.g. '10-29' (default all)"),
        lam: float = typer.Option(0.1, help="sparsity strength λ"),
        steps: int = typer.Option(100, help="Adam steps"),
        lr: float = typer.Option(1e-2, help="learning rate"),
        parametrization: str = typer.Option("clamp", help="clamp (the paper's), sigmoid or hard_concrete"),
        train_fraction: float = typer.Option(0.5, help="share of tuples used for training; the rest is held out"),
        baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="compare with top-k exact activation patching"),
        out: str | None = typer.Option(None, help="results folder (default runs/mask-<task>)"),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
        dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto"),
        max_memory: str | None = typer.Option(None, help="working-memory budget of the evaluation, e.g. '4GB' (default: 16 MiB on CPU, half the free GPU memory on CUDA)"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="let transformers run the model repo's code"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        """Learn a binary mask of components that satisfies the desiderata; evaluate it on held-out tuples."""
        from patchtrace.desiderata import DesiderataError, load_desiderata, save_desiderata
        from patchtrace.methods import dbm

        con = common.console()
        try:
            cfg = dbm.DBMConfig(
                lam=lam, steps=steps, lr=lr, parametrization=parametrization,  # type: ignore[arg-type]
                train_fraction=train_fraction, seed=seed, baseline=baseline,
                max_memory=common.parse_memory(max_memory),
            )
            pos = common.parse_positions(positions)
            specs = common.parse_sites(sites, pos, common.parse_layers(layers))
            if desiderata is None:
                common.check_task(task, 1 if n is None else n)
            elif not Path(desiderata).is_file():
                raise common.CLIError(f"--desiderata {desiderata}: no such file")
            folder = common.check_out(out or Path("runs") / f"mask-{Path(desiderata or task).stem}")
            t0 = time.perf_counter()
            if desiderata is not None:
                ds = load_desiderata(desiderata)
                m = common.load(model, device, dtype, trust_remote_code)
            else:
                m = common.load(model, device, dtype, trust_remote_code)
                tsk = common.build_task(task, n, seed, m, default_n=64)
                tsk.tokenize(m.tokenizer)  # refuses degenerate examples (answer = wrong, clean = corrupt), naming them
                ds = dbm.as_desiderata(tsk)
                if tsk.params.get("n_solved") is not None:
                    con.print(f"task {tsk.name}: the model solves {tsk.params['n_solved']} of "
                              f"{tsk.params['n_generated']} generated items", markup=False)
            con.print(f"model {m.name} · desiderata " + ", ".join(f"{d.name} ({len(d)})" for d in ds)
                      + f" · sites {sites} · λ={lam}", markup=False)
            with (common.progress("training mask", quiet=quiet) as bar,  # plain lines when not a terminal
                  common.progress("exact-patching baseline", quiet=quiet) as rbar):

                def ranking(done: int, total: int) -> None:
                    bar.close()  # training is over: one live bar at a time
                    rbar.update(done, total)

                result = dbm.run(
                    m, ds, specs, cfg,
                    on_step=lambda i, loss, k: bar.update(i + 1, steps, f"loss {loss:.4f} · {k} above threshold"),
                    on_ranking_progress=ranking,
                    out_dir=folder,  # the exact-patching ranking checkpoints there and resumes
                )
        except (DesiderataError, dbm.DBMError) as e:
            common.fail(str(e))
        result.save(folder)
        save_desiderata(ds, folder / "desiderata.jsonl")
        _print_result(con, result, baseline)
        con.print(f"saved {folder} · done in {time.perf_counter() - t0:.1f} s", markup=False)


def _print_result(con: Console, result: Mask, baseline: bool) -> None:
    """The held-out accuracy table (mask, unpatched, top-k exact patching) and the kept sites."""
    from rich.table import Table

    ev = result.evaluation
    table = Table(title=f"held-out desiderata accuracy ({ev['n_kept']} of {ev['n_components']} components kept)",
                  title_justify="left")
    table.add_column("desideratum")
    table.add_column("mask", justify="right")
    table.add_column("unpatched", justify="right")
    if baseline:
        table.add_column(f"top-{ev['n_kept']} exact patching", justify="right")
    for d in ev["desiderata"]:
        row = [d, f"{ev['accuracy_per_desideratum'][d]:.2f}", f"{ev['unpatched_per_desideratum'][d]:.2f}"]
        if baseline:
            row.append(f"{ev['topk_per_desideratum'][d]:.2f}")
        table.add_row(*row)
    row = ["mean", f"{ev['accuracy']:.2f}", f"{ev['unpatched_accuracy']:.2f}"]
    if baseline:
        row.append(f"{ev['topk_accuracy']:.2f}")
    table.add_row(*row, style="bold")
    con.print(table)
    con.print("kept: " + (", ".join(str(s) for s in result.kept) if result.kept else "(none)"), markup=False)
