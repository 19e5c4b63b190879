"""``patchtrace patch``: exact activation patching of a grid of sites, saved as Scores.

Example::

    patchtrace patch --model smollm2-135m --task ioi --n 16 --sites head --positions last --out runs/ioi-heads
    patchtrace patch --sites head,resid_pre --positions all --out runs/ioi   # runs/ioi/head, runs/ioi/resid_pre
    patchtrace patch --sites neuron --layers 20-29 --dry-run                 # print the plan, compute nothing

Results are checkpointed block by block into ``--out``: the same command run again after an
interruption resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from patchtrace.cli import common


def _default_out(task: str, kinds: list[str]) -> Path:
    return Path("runs") / f"{Path(task).stem}-{'+'.join(kinds)}"


def dry_run_plan(model: Any, tok: Any, specs: list[Any], metric: str, fast: bool, max_memory: int | None) -> list[str]:
    """One line per site kind and example group: cells, axes and :meth:`SweepPlan.describe`. Computes nothing."""
    from patchtrace.engine.sweep import Patch, plan_sweep, resolve
    from patchtrace.methods.activation_patching import build_grid
    from patchtrace.metrics import Metric

    cols = Metric(metric).columns(tok.answer, tok.wrong)
    lines = []
    for spec in specs:
        grid = build_grid(model, spec, tok)
        lines.append(f"{spec.kind}: {len(grid)} cells, axes {grid.axes} shape {grid.shape}")
        for idx in tok.groups():
            T = tok.lengths[idx[0]]
            patches = [Patch((resolve(s, model, T),)) for s in grid.sites()]
            plan = plan_sweep(
                model, patches, len(idx), T, fast=fast, max_memory=max_memory,
                ncols=None if cols is None else len(cols),
            )
            lines.append(f"  {len(idx)} examples of {T} tokens: {plan.describe()}")
    return lines


def register(app: typer.Typer) -> None:
    """Add ``patch`` to the app."""

    @app.command("patch")
    def patch(
        model: Annotated[str, typer.Option(help="bundled name, local directory or Hugging Face id")] = "smollm2-135m",
        task: Annotated[str, typer.Option(help="built-in task name (see `patchtrace tasks`) or a .jsonl/.csv file")] = "ioi",
        n: Annotated[int | None, typer.Option(help="examples of a built-in task (default 16); a task file: its first N (default all)")] = None,
        seed: Annotated[int, typer.Option(help="task seed")] = 0,
        sites: Annotated[str, typer.Option(help="comma list of site kinds: head, resid_pre, attn_out, mlp_out, neuron, k, v, ... ('head:layer' = whole layers)")] = "head",
        positions: Annotated[str, typer.Option(help="'last', 'all', 'none' (whole sequence at once) or a comma list like '0,5,-1'")] = "last",
        layers: Annotated[str | None, typer.Option(help="layers to sweep, e.g. '0-3,7' (default: all)")] = None,
        direction: Annotated[str, typer.Option(help="'denoise' (clean into corrupt) or 'noise' (corrupt into clean)")] = "denoise",
        metric: Annotated[str, typer.Option(help="logit_diff, prob, logprob or kl")] = "logit_diff",
        out: Annotated[Path | None, typer.Option(help="results folder (default runs/<task>-<sites>); a rerun resumes")] = None,
        device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
        dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "float32",
        max_memory: Annotated[str | None, typer.Option(help="working-memory budget, e.g. '4GB' (default: 16 MiB on CPU, half the free GPU memory on CUDA)")] = None,
        fast: Annotated[bool, typer.Option("--fast/--no-fast", help="fast exact path, or one full forward per patch")] = True,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="print the sweep plan and exit without computing")] = False,
        top: Annotated[int, typer.Option(help="rows in the printed top-k table")] = 10,
        by: Annotated[str, typer.Option(help="rank the table by 'importance' (recovery when denoising, damage when noising), 'value', 'abs' or 'neg'")] = "importance",
        trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="let transformers run the model repo's code")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the results of a different run in --out")] = False,
        allow_degenerate: Annotated[bool, typer.Option("--allow-degenerate", help="run examples whose answer equals their wrong token or whose prompts are identical (with a warning)")] = False,
        executor: common.ExecutorOption = "local",
        ray_address: common.RayAddressOption = None,
    ) -> None:
        """Exact activation patching: the effect of restoring each site, saved as Scores."""
        from patchtrace.methods.activation_patching import PatchingConfig
        from patchtrace.methods.activation_patching import run as activation_patching

        con = common.console()
        # parse everything before loading anything, so a typo fails in milliseconds
        common.parse_by(by)
        common.parse_top(top)
        pos = common.parse_positions(positions)
        specs = common.parse_sites(sites, pos, common.parse_layers(layers))
        budget = common.parse_memory(max_memory)
        # PatchingConfig checks direction and metric itself (ConfigError names the bad value)
        cfg = PatchingConfig(direction=cast(Any, direction), metric=metric, fast=fast, max_memory=budget)
        common.check_task(task, 1 if n is None else n)
        if not dry_run:
            common.check_out(out or _default_out(task, [s.kind for s in specs]))
        t0 = time.perf_counter()
        ex = common.executor(executor, ray_address) if not dry_run else None  # an unreachable cluster fails here
        m = common.load(model, device, dtype, trust_remote_code)
        tsk = common.build_task(task, n, seed, m)
        tok = tsk.tokenize(m.tokenizer, allow_degenerate=allow_degenerate)
        root = out or _default_out(task, [s.kind for s in specs])
        folders = [root] if len(specs) == 1 else [root / s.kind for s in specs]
        if not dry_run:
            common.prepare_out(root, folders, overwrite)
        con.print(f"model {m.name} ({m.dims.n_layers} layers, {m.dims.n_heads} heads) · task {tsk.name} ({len(tok)} examples)",
                  markup=False)
        common.print_scored(tok, m.tokenizer, con)
        if dry_run:
            for line in dry_run_plan(m, tok, specs, metric, fast, budget):
                con.print(line, markup=False)
            con.print("dry run: nothing computed", markup=False)
            return
        results = []
        for spec, folder in zip(specs, folders, strict=True):
            with common.progress(f"patching {spec.kind}", quiet=quiet) as bar:
                scores = activation_patching(
                    m, tok, spec, cfg, out_dir=folder, on_progress=bar.update, overwrite=overwrite, executor=ex
                )
            results.append((spec, folder, scores))
        common.print_baselines(results[0][2], con)
        for spec, folder, scores in results:
            con.print(common.scores_table(scores, top, title=f"top {top}: {spec.kind} ({scores.value_name})", by=by))
            con.print(f"saved {folder}", markup=False)
        con.print(f"done in {time.perf_counter() - t0:.1f} s · next: patchtrace show {root} · patchtrace report {root}",
                  markup=False)
