"""``patchtrace compare``: the estimators of exact patching against it, on the same sites.

Example::

    patchtrace compare --methods atp,atp_star,ig,relp --task ioi --n 16 \\
        --sites resid_pre@all,attn_out@all,mlp_out@all,head@last --out runs/ioi-compare

The methods are the registered estimators of ``activation_patching`` (``patchtrace methods`` lists
them; by default all). Per site kind it prints Pearson and Spearman correlation with exact patching
and top-k overlap, and per method the wall time (also as a multiple of one clean+corrupt forward
pair). ``--out`` receives every method's Scores (``<method>/<kind>/``), ``report.json`` and
``scatter_<method>.png``. A site item may carry its own positions after ``@`` (``head@last``);
others use ``--positions``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import typer

from patchtrace.cli import common


def parse_site_items(text: str, default_positions: str, layers: str | None) -> list:
    """``resid_pre@all,head@last`` → one SiteSpec per item (``@positions`` optional)."""
    default = common.parse_positions(default_positions)  # checked even when every item has its own
    specs = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, _, pos = item.partition("@")
        specs += common.parse_sites(name, common.parse_positions(pos) if pos else default, common.parse_layers(layers))
    if not specs:
        raise common.CLIError(f"--sites {text!r}: give at least one site kind")
    kinds = [s.kind for s in specs]
    dup = sorted({k for k in kinds if kinds.count(k) > 1})
    if dup:
        raise common.CLIError(f"--sites {text!r}: kind(s) {', '.join(dup)} given twice")
    return specs


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the app."""

    @app.command("compare")
    def compare_cmd(
        methods: str | None = typer.Option(None, help="comma list of estimators (default: all; see `patchtrace methods`)"),
        model: str = typer.Option("smollm2-135m", help="bundled name, local directory or Hugging Face id"),
        task: str = typer.Option("ioi", help="built-in task name or a .jsonl/.csv file"),
        n: int | None = typer.Option(None, help="examples of a built-in task (default 16); a task file: its first N (default all)"),
        seed: int = typer.Option(0, help="task seed"),
        sites: str = typer.Option(
            "resid_pre@all,attn_out@all,mlp_out@all,head@last",
            help="comma list of site kinds, each optionally '@last|all|none|0,3' (else --positions); "
            "'edges': edge grids (exact path patching vs --methods eap,eap-ig,eap-ig-act)",
        ),
        positions: str = typer.Option("last", help="positions for items without '@'"),
        layers: str | None = typer.Option(None, help="layers, e.g. '0-3,7' (default: all)"),
        direction: str = typer.Option("denoise", help="'denoise' or 'noise'"),
        metric: str = typer.Option("logit_diff", help="logit_diff, prob, logprob or kl"),
        ig_steps: int = typer.Option(5, help="integrated-gradients steps (method ig)"),
        top_k: int = typer.Option(10, help="k of the top-k overlap"),
        grad_drop: bool = typer.Option(True, "--grad-drop/--no-grad-drop", help="AtP* (atp_star): GradDrop (magnitudes)"),
        grad_drop_groups: int | None = typer.Option(
            None, help="AtP*: GradDrop over at most N contiguous layer groups (~L/N times cheaper); 0: every layer "
            "(default: AtPStarConfig's)"),
        out: Path | None = typer.Option(None, help="results folder (default runs/<task>-compare)"),  # noqa: B008
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
        dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="let transformers run the repo's code"),
    ) -> None:
        """Compare the estimators (AtP, AtP*, IG, RelP, ...) with exact activation patching."""
        from rich.table import Table

        from patchtrace.methods import compare as cmp

        con = common.console()
        if sites.strip() == "edges":  # edge grids: exact path patching against EAP / EAP-IG, edge by edge
            from patchtrace.cli.circuit import compare_edges

            edge_methods = ["eap", "eap-ig"] if methods is None else [x.strip() for x in methods.split(",") if x.strip()]
            m = common.load(model, device, dtype, trust_remote_code)
            tok = common.build_task(task, n, seed, m).tokenize(m.tokenizer)
            compare_edges(m, tok, edge_methods, ig_steps, top_k, out or Path("runs") / f"{Path(task).stem}-compare-edges", con)
            return
        known = cmp.estimator_names()
        names = known if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
        if not names:
            raise common.CLIError(f"--methods {methods!r}: give at least one estimator: {', '.join(known)}")
        bad = [x for x in names if x not in (*known, cmp.REFERENCE)]
        if bad:
            raise common.CLIError(f"--methods: unknown {bad}; choose from {', '.join(known)}")
        star: dict[str, Any] = {"grad_drop": grad_drop}
        if grad_drop_groups is not None:  # else the config's default
            star["grad_drop_groups"] = grad_drop_groups or None  # 0: per layer
        per_method: dict[str, dict[str, Any]] = {"ig": {"steps": ig_steps}, "atp_star": star}
        options = {k: v for k, v in per_method.items() if k in known}
        # checked here, before anything is loaded (ConfigError names the bad value)
        cfg = cmp.CompareConfig(direction=cast(Any, direction), metric=metric, top_k=top_k, options=options)
        specs = parse_site_items(sites, positions, layers)
        common.check_task(task, 1 if n is None else n)
        root = common.check_out(out or Path("runs") / f"{Path(task).stem}-compare")
        t0 = time.perf_counter()
        m = common.load(model, device, dtype, trust_remote_code)
        tok = common.build_task(task, n, seed, m).tokenize(m.tokenizer)
        with common.progress("compare (method runs)") as bar:  # the reference sweep, then each estimator
            # the default set (None) lets compare leave out what does not carry over to the family (encoders)
            report = cmp.run(m, tok, specs, None if methods is None else names, cfg, out_dir=root,
                             on_progress=bar.update).report
        skipped = report.get("skipped", {})
        for name, why in skipped.items():
            con.print(f"skipped {name} on {m.family.name}: {why}", markup=False)
        others = [x for x in dict.fromkeys(names) if x != cmp.REFERENCE and x not in skipped]
        table = Table(title=f"agreement with exact patching ({tok.task.name}, n={len(tok)})")
        table.add_column("site kind")
        for name in others:
            table.add_column(f"{name}\nPearson / Spearman / top-{top_k}", justify="right")
        for kind, row in report["kinds"].items():
            table.add_row(kind, *[
                f"{row[x]['pearson']:.3f} / {row[x]['spearman']:.3f} / {row[x]['top_k_overlap']:.2f}" for x in others
            ])
        con.print(table)
        times = Table(title=f"time (one clean+corrupt forward pair = {report['forward_pair_s']:.3f} s)")
        times.add_column("method")
        times.add_column("seconds", justify="right")
        times.add_column("× forward pair", justify="right")
        for name, sec in report["time_s"].items():
            times.add_row(name, f"{sec:.2f}", f"{report['time_vs_forward_pair'][name]:.1f}")
        con.print(times)
        con.print(f"saved {root} (Scores per method and kind, report.json, scatter PNGs) · {time.perf_counter() - t0:.1f} s",
                  markup=False)
