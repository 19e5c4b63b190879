"""``patchtrace circuit``: score every edge, choose a circuit, measure and draw it.

Example::

    patchtrace circuit --task ioi --method eap-ig --edges 200 --out runs/c
    patchtrace circuit --task ioi --method exact --edges 200 --n 4 --curve 50,100,200,500,1000 --out runs/c-exact
    patchtrace circuit --task ioi --method acdc --edges 300 --threshold 0.02 --out runs/c-acdc

Methods: ``exact`` (every edge patched exactly: one patched run per edge, on the fast path),
``eap``, ``eap-ig`` (inputs, ``--steps``), ``eap-ig-act`` (activations), ``acdc`` (exact iterative
pruning with ``--threshold``; ``--edges`` is then the pool of top EAP-IG edges it starts from,
0 = the whole graph). ``--out`` receives ``circuit/`` (the :class:`~patchtrace.circuits.circuit.Circuit`),
``scores/`` (the edge grid as Scores, for ``patchtrace compare``/``show``), ``circuit.png`` (the graph)
and, with ``--curve``, ``faithfulness.png``. Edge grids are compared edge by edge with
``patchtrace compare --sites edges``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from patchtrace.cli import common


def _budgets(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise common.CLIError(f"--curve {text!r}: give edge counts, e.g. '50,100,200'") from None
    if any(b < 1 for b in out):
        raise common.CLIError(f"--curve {text!r}: edge counts must be at least 1")
    return out


def register(app: typer.Typer) -> None:
    """Add ``circuit`` to the app."""

    @app.command("circuit")
    def circuit_cmd(
        model: str = typer.Option("smollm2-135m", help="bundled name, local directory or Hugging Face id"),
        task: str = typer.Option("ioi", help="built-in task name or a .jsonl/.csv file"),
        n: int = typer.Option(8, help="number of examples (built-in tasks)"),
        seed: int = typer.Option(0, help="task seed"),
        method: str = typer.Option("eap-ig", help="exact, eap, eap-ig, eap-ig-act or acdc"),
        edges: int = typer.Option(200, help="edge budget (acdc: the EAP-IG pool it starts from, 0 = all)"),
        select: str = typer.Option("topn", help="topn or greedy (with dead-node pruning)"),
        steps: int = typer.Option(5, help="EAP-IG steps"),
        threshold: float = typer.Option(0.01, help="ACDC threshold (fraction of the clean - corrupt gap)"),
        metric: str = typer.Option("logit_diff", help="logit_diff, prob, logprob or kl"),
        curve: str | None = typer.Option(None, help="faithfulness curve budgets, e.g. '50,100,200,500,1000'"),
        out: Path | None = typer.Option(None, help="results folder (default runs/circuit-<task>-<method>)"),  # noqa: B008
        top: int = typer.Option(10, help="edges in the printed table"),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
        dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="let transformers run the repo's code"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        """Edge circuit of a task: exact path patching, EAP, EAP-IG or ACDC, with faithfulness."""
        from rich.table import Table

        from patchtrace.circuits.api import CircuitConfig, find_circuit
        from patchtrace.circuits.edges import as_scores
        from patchtrace.circuits.faithfulness import Curve, plot_curves

        # checked before anything is loaded
        common.check_finite(threshold, "--threshold")
        if threshold < 0:
            raise common.CLIError(f"--threshold {threshold}: must be 0 or more (a fraction of the clean - corrupt gap)")
        common.parse_top(top)
        cfg = CircuitConfig(method=method, edges=edges, select=select, steps=steps, threshold=threshold,  # type: ignore[arg-type]
                            metric=metric, curve=_budgets(curve))
        root = out or Path("runs") / f"circuit-{Path(task).stem}-{method}"
        common.check_out(root)
        t0 = time.perf_counter()
        m = common.load(model, device, dtype, trust_remote_code)
        tok = common.build_task(task, n, seed, m).tokenize(m.tokenizer)
        con = common.console()
        common.print_scored(tok, m.tokenizer, con)
        with common.progress(f"circuit ({method})", quiet=quiet) as bar:
            c = find_circuit(m, tok, cfg, on_progress=bar.update)
        c.save(root / "circuit")
        if c.scores is not None:
            as_scores(c.graph, c.scores, method=method, direction="noise",
                      value_name="effect" if method == "exact" else "attribution", metric=metric,
                      baselines=c.provenance.get("baselines"), provenance=c.provenance).save(root / "scores")
        c.draw(root / "circuit.png")
        if c.curves:
            cu = [Curve(x["label"], x["budgets"], x["n_edges"], x["values"]) for x in c.curves]
            plot_curves(cu, root / "faithfulness.png", title=f"{tok.task.name}: faithfulness of {method} circuits")
        _print(con, c, top, Table)
        con.print(f"saved {root} (circuit/, scores/, circuit.png) · {time.perf_counter() - t0:.1f} s", markup=False)


def _print(con: Any, c: Any, top: int, Table: Any) -> None:
    g = c.graph
    con.print(f"graph: {g.n_senders} senders, {g.n_receivers} receivers, {g.n_edges} edges; "
              f"circuit: {c.n_edges} edges ({c.method})", markup=False)
    for k, v in c.faithfulness.items():
        con.print(f"faithfulness ({k}): {v:.3f}", markup=False)
    if c.scores is None or not c.n_edges:
        return
    t = Table(title=f"top {top} circuit edges by |score|")
    t.add_column("edge")
    t.add_column("score", justify="right")
    rows = sorted(c.edge_list(), key=lambda e: -abs(float(c.scores[e])))[:top]
    for s, r in rows:
        t.add_row(g.edge_name(s, r), f"{float(c.scores[s, r]):+.4f}")
    con.print(t)


def compare_edges(model: Any, tok: Any, methods: list[str], steps: int, top_k: int, out: Path, con: Any) -> None:
    """``patchtrace compare --sites edges``: exact edge effects against EAP variants, edge by edge."""
    from rich.table import Table

    from patchtrace.circuits.api import score_prepared
    from patchtrace.circuits.eap import VARIANTS
    from patchtrace.circuits.edges import agreement, as_scores
    from patchtrace.circuits.exact import prepare

    bad = [x for x in methods if x not in VARIANTS]
    if bad:
        raise common.CLIError(f"--methods for edges: unknown {bad}; choose from {', '.join(VARIANTS)}")
    p = prepare(model, tok)
    res: dict[str, Any] = {}
    times: dict[str, float] = {}
    for name in ["exact", *methods]:
        t0 = time.perf_counter()
        v = score_prepared(p, name, steps=steps)
        times[name] = time.perf_counter() - t0
        res[name] = as_scores(p.graph, v, method=name, direction="noise",
                              value_name="effect" if name == "exact" else "attribution", baselines=p.baselines)
        res[name].save(out / name)
    t = Table(title=f"edge agreement with exact path patching ({p.graph.n_edges} edges, n={p.n})")
    for col in ("method", "Pearson", "Spearman", f"top-{top_k}", "seconds"):
        t.add_column(col, justify="left" if col == "method" else "right")
    t.add_row("exact", "1", "1", "1", f"{times['exact']:.2f}")
    for name in methods:
        a = agreement(res["exact"], res[name], top_k)
        t.add_row(name, f"{a['pearson']:.3f}", f"{a['spearman']:.3f}", f"{a['top_k_overlap']:.2f}", f"{times[name]:.2f}")
    con.print(t)
    con.print(f"saved {out} (edge Scores per method)", markup=False)
