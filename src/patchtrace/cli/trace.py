"""``patchtrace trace``: ROME causal tracing (noise the subject, restore one state at a time).

Example::

    patchtrace trace --model smollm2-135m --task factual --kind resid --out runs/trace-resid
    patchtrace trace --task factual --kind mlp --window 10 --samples 10 --out runs/trace-mlp

The position axis is shared by all examples, so the examples must tokenize to one length; when a
task mixes lengths, the command keeps the largest equal-length group and says so.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import typer

from patchtrace.cli import common


def register(app: typer.Typer) -> None:
    """Add ``trace`` to the app."""

    @app.command("trace")
    def trace(
        model: str = typer.Option("smollm2-135m", help="bundled name, local directory or Hugging Face id"),
        task: str = typer.Option("factual", help="task whose examples carry meta['subject'] (built-in 'factual', or a .jsonl file)"),
        n: int | None = typer.Option(None, help="examples of a built-in task (default 16); a task file: its first N (default all)"),
        seed: int = typer.Option(0, help="task seed"),
        kind: str = typer.Option("resid", help="what to restore: 'resid' (residual stream), 'mlp' or 'attn' (a window of sublayer outputs)"),
        window: int = typer.Option(10, help="layers restored together for mlp/attn (1 = one layer)"),
        samples: int = typer.Option(10, help="noisy copies per example"),
        noise_scale: float = typer.Option(3.0, help="noise std in multiples of the subject embeddings' std"),
        noise_seed: int = typer.Option(0, help="seed of the noise"),
        metric: str = typer.Option("prob", help="prob (ROME), logprob, logit_diff or kl"),
        target: str = typer.Option("top1", help="'top1' (the clean run's top token) or 'answer' (the task's answer)"),
        out: str | None = typer.Option(None, help="results folder (default runs/trace-<task>-<kind>)"),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
        dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto"),
        max_memory: str | None = typer.Option(None, help="working-memory budget, e.g. '4GB' (default: 16 MiB on CPU, half the free GPU memory on CUDA)"),
        fast: bool = typer.Option(True, "--fast/--no-fast", help="fast exact path, or full forwards"),
        top: int = typer.Option(10, help="rows in the printed top-k table"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="let transformers run the model repo's code"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
        executor: common.ExecutorOption = "local",
        ray_address: common.RayAddressOption = None,
    ) -> None:
        """ROME causal tracing: indirect effect of restoring each (layer, token) state, saved as Scores."""
        from patchtrace.methods.causal_tracing import TracingConfig
        from patchtrace.methods.causal_tracing import run as causal_trace

        con = common.console()
        common.parse_top(top)
        budget = common.parse_memory(max_memory)
        options: dict[str, Any] = {  # checked by TracingConfig itself, before anything is loaded
            "noise_scale": noise_scale, "samples": samples, "seed": noise_seed, "kind": kind, "window": window,
            "metric": metric, "target": target, "fast": fast, "max_memory": budget,
        }
        cfg = TracingConfig(**options)
        common.check_task(task, 1 if n is None else n)
        folder = common.check_out(out or Path("runs") / f"trace-{Path(task).stem}-{kind}")
        t0 = time.perf_counter()
        ex = common.executor(executor, ray_address)  # an unreachable cluster fails here, before loading
        m = common.load(model, device, dtype, trust_remote_code)
        tsk = common.build_task(task, n, seed, m)
        tok = tsk.tokenize(m.tokenizer)
        if tok.uniform_length() is None:
            length, _ = Counter(tok.lengths).most_common(1)[0]
            keep = [i for i, ln in enumerate(tok.lengths) if ln == length]
            con.print(f"note: examples have token lengths {sorted(set(tok.lengths))}; tracing the {len(keep)} of "
                      f"length {length}", markup=False)
            tok = tsk.subset(keep).tokenize(m.tokenizer)
        con.print(f"model {m.name} ({m.dims.n_layers} layers) · task {tsk.name} ({len(tok)} examples) · "
                  f"restore {kind}" + (f" (window {window})" if kind != "resid" else ""), markup=False)
        with common.progress(f"tracing {kind}", quiet=quiet) as bar:
            scores = causal_trace(m, tok, config=cfg, on_progress=bar.update, executor=ex)  # sites: cfg.kind
        scores.save(folder)
        con.print(f"{metric}: clean {scores.baselines['clean']:.4g} · noisy {scores.baselines['corrupt']:.4g} · "
                  f"noise std {scores.provenance['noise_std']:.4g}", markup=False)
        con.print(common.scores_table(scores, top, title=f"top {top}: restored {scores.site_kind} (indirect effect)"))
        con.print(f"saved {folder} · done in {time.perf_counter() - t0:.1f} s", markup=False)
