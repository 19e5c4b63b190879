"""``patchtrace demo``: the whole tour in one command, on the bundled SmolLM2-135M-Instruct.

IOI with 16 examples; exact activation patching (denoising, logit difference) of (1) every attention
head at the last position and (2) the residual stream entering every layer at every position. It
prints the baselines and the top heads, writes PNG heatmaps and an HTML report into ``--out``, and
reports the wall time. On two CPU cores it takes well under a few minutes, because the engine only
recomputes what a patch can change (see :mod:`patchtrace.engine.sweep`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from patchtrace.cli import common


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the app."""

    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
        model: Annotated[str, typer.Option(help="model (the bundled SmolLM2 by default)")] = "smollm2-135m",
        n: Annotated[int, typer.Option(help="IOI examples")] = 16,
        seed: Annotated[int, typer.Option(help="task seed")] = 0,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
        top: Annotated[int, typer.Option(help="rows of the printed tables")] = 10,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    ) -> None:
        """IOI on the bundled SmolLM2: patch all heads and the residual stream, write heatmaps + HTML."""
        from patchtrace.methods.activation_patching import PatchingConfig
        from patchtrace.methods.activation_patching import run as activation_patching
        from patchtrace.report import write_report
        from patchtrace.sites import SiteSpec

        con = common.console()
        common.parse_top(top)
        common.check_task("ioi", n)
        common.check_out(out)
        t0 = time.perf_counter()
        m = common.load(model, device, "float32")
        t_load = time.perf_counter() - t0
        tok = common.build_task("ioi", n, seed, m).tokenize(m.tokenizer)
        con.print(f"model {m.name}: {m.dims.n_layers} layers × {m.dims.n_heads} heads, loaded in {t_load:.1f} s; "
                  f"task ioi, {len(tok)} examples of {tok.lengths[0]} tokens", markup=False)
        ex = tok.task.examples[0]
        con.print(f"  clean:   {ex.clean!r} → {ex.answer!r}\n  corrupt: {ex.corrupt!r} → {ex.wrong!r}", markup=False)
        cfg = PatchingConfig(direction="denoise", metric="logit_diff")
        sweeps = {
            "head": SiteSpec("head", per_unit=True, positions="last"),
            "resid_pre": SiteSpec("resid_pre", positions="all"),
        }
        results = {}
        timings = {}
        for name, spec in sweeps.items():
            t1 = time.perf_counter()
            with common.progress(f"patching {name}", quiet=quiet) as bar:
                results[name] = activation_patching(m, tok, spec, cfg, out_dir=out / name, on_progress=bar.update)
            timings[name] = time.perf_counter() - t1
        heads = results["head"]
        common.print_baselines(heads, con)
        con.print(common.scores_table(heads, top, title=f"top {top} heads (last position) · {timings['head']:.1f} s"))
        con.print(common.scores_table(results["resid_pre"], min(top, 5),
                                      title=f"top resid_pre (layer × position) · {timings['resid_pre']:.1f} s"))
        wall = time.perf_counter() - t0
        note = (f"IOI n={len(tok)} on {m.name}; head sweep {timings['head']:.1f} s, resid_pre sweep "
                f"{timings['resid_pre']:.1f} s, total {wall:.1f} s")
        files = write_report(out, title="patchtrace demo: IOI on SmolLM2-135M-Instruct", note=note)
        for p in files:
            con.print(f"wrote {p}", markup=False)
        con.print(f"total wall time {time.perf_counter() - t0:.1f} s", markup=False)
