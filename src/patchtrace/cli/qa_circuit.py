"""``patchtrace qa-circuit``: the context-use circuit of extractive QA, saved where ``attribute --circuit`` reads it.

Example::

    patchtrace qa-circuit --n 8 --out runs/qa/circuit/heads
    patchtrace attribute --data my_qa.jsonl --circuit runs/qa/circuit/heads --n-heads 2

Activation patching of counterfactual-context prompts against the same prompt with the answer
sentence swapped out (:func:`patchtrace.qa.circuit.run`): ``values`` are each head's context use,
``extras['memory_effect']`` its memory use (a second, noising sweep). Building the task generates
conflict items and keeps those the model answers from the context, which takes a while on a CPU;
a line says so while it runs, and the two sweeps share one progress bar.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from patchtrace.cli import common


def register(app: typer.Typer) -> None:
    """Add ``qa-circuit`` to the app."""

    @app.command("qa-circuit")
    def qa_circuit_cmd(
        model: Annotated[str, typer.Option(help="bundled name, local directory or Hugging Face id")] = "smollm2-135m",
        n: Annotated[int, typer.Option(help="conflict items in the patching task")] = 8,
        seed: Annotated[int, typer.Option(help="item generator seed")] = 0,
        sites: Annotated[str, typer.Option(help="'head' (per head) or 'mlp_out' (per layer)")] = "head",
        layers: Annotated[str | None, typer.Option(help="layers to sweep, e.g. '20-29' (default: all)")] = None,
        memory: Annotated[bool, typer.Option("--memory/--no-memory", help="also the memory-use sweep (extras.memory_effect)")] = True,
        out: Annotated[Path, typer.Option(help="results folder (what `attribute --circuit` reads)")] = Path("runs/qa/circuit/heads"),
        device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
        dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
        top: Annotated[int, typer.Option(help="rows in the printed top-k table")] = 10,
        trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="let transformers run the model repo's code")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the results of a different run in --out")] = False,
        executor: common.ExecutorOption = "local",
        ray_address: common.RayAddressOption = None,
    ) -> None:
        """Context-use (and memory-use) effects of every head for extractive QA, saved as Scores."""
        from patchtrace.qa.circuit import QACircuitConfig
        from patchtrace.qa.circuit import run as qa_circuit
        from patchtrace.qa.patching import qa_patching_task
        from patchtrace.sites import SiteSpec

        if n < 1:
            raise common.CLIError(f"--n {n}: need at least one item")
        if sites not in ("head", "mlp_out"):
            raise common.CLIError(f"--sites {sites!r}: use 'head' or 'mlp_out'")
        common.parse_top(top)
        lay = common.parse_layers(layers)
        spec = SiteSpec("head", per_unit=True, positions="last", layers=lay) if sites == "head" else \
            SiteSpec("mlp_out", positions="last", layers=lay)
        common.check_out(out)
        common.prepare_out(out, [out], overwrite)
        con, err = common.console(), common.err_console()
        t0 = time.perf_counter()
        ex = common.executor(executor, ray_address)  # an unreachable cluster fails here, before loading
        m = common.load(model, device, dtype, trust_remote_code)
        if lay is not None and max(lay) >= m.dims.n_layers:
            raise common.CLIError(f"--layers {layers!r}: layer {max(lay)} out of range (the model has "
                                  f"{m.dims.n_layers} layers)")
        from patchtrace.progress import step

        with step(f"building the QA patching task ({n} items the model answers from the context)", err):
            task = qa_patching_task(n, seed, m)
        con.print(f"model {m.name} · task {task.name} ({len(task)} examples) · sites {sites}", markup=False)
        with common.progress(f"qa circuit ({sites})", quiet=quiet) as bar:
            scores = qa_circuit(m, task, spec, QACircuitConfig(memory=memory), on_progress=bar.update,
                                executor=ex)
        scores.save(out)
        common.print_baselines(scores, con)
        con.print(common.scores_table(scores, top, title=f"top {top}: context use ({scores.value_name})"))
        con.print(f"saved {out} · done in {time.perf_counter() - t0:.1f} s · "
                  f"next: patchtrace attribute --circuit {out}", markup=False)
