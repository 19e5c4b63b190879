"""``patchtrace attribute``: ATTNATTRIB sentence attribution for extractive QA (Basu et al. 2025).

Example::

    patchtrace attribute --kind conflict --n 8 --heads 21.4 --html runs/attr.html
    patchtrace attribute --data my_qa.jsonl --circuit runs/qa/circuit/heads --out runs/attr
    patchtrace attribute --kind conflict --heads 23.2 --steer 4 --steer-heads 23.2,29.1,23.1 --gate not_in_context

Heads come from ``--heads`` (``layer.head`` pairs) or from a saved circuit (``--circuit``, a head
Scores folder from :mod:`patchtrace.qa.circuit`), in which case the documented selection
rule (:func:`patchtrace.qa.attnattrib.select_heads`) picks them on generated probe prompts.
With ``--steer``, answers are steered toward the attributed sentence when the gate opens
(:mod:`patchtrace.qa.steering`: by default only when the plain answer is not copied from the
context). Writes ``attributions.jsonl`` (and the HTML view with ``--html``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from patchtrace.cli import common

if TYPE_CHECKING:
    from patchtrace.qa.attnattrib import Attribution
    from patchtrace.qa.items import QAItem


def parse_heads(text: str) -> tuple[tuple[int, int], ...]:
    """``"21.4,25.1"`` → ``((21, 4), (25, 1))``.

    Raises:
        CLIError: a malformed pair.
    """
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        a, dot, b = part.partition(".")
        if not dot or not a.isdigit() or not b.isdigit():
            raise common.CLIError(f"--heads: {part!r} is not 'layer.head' (e.g. '21.4')")
        out.append((int(a), int(b)))
    if not out:
        raise common.CLIError("--heads: no heads given")
    return tuple(out)


def check_heads_exist(pairs: tuple[tuple[int, int], ...] | None, model: Any, option: str) -> None:
    """Every ``layer.head`` pair names a head of ``model``.

    Raises:
        CLIError: a layer or head past the model's (names the pair and the model's sizes).
    """
    L, H = model.dims.n_layers, model.dims.n_heads
    for a, b in pairs or ():
        if a >= L or b >= H:
            raise common.CLIError(f"{option}: head {a}.{b} does not exist (the model has {L} layers of {H} heads)")


def register(app: typer.Typer) -> None:
    """Add ``attribute`` to the app."""

    @app.command("attribute")
    def attribute_cmd(
        model: str = typer.Option("smollm2-135m", help="bundled name, local directory or Hugging Face id"),
        data: str | None = typer.Option(None, help="QA .jsonl (fields: sentences, question, answer, gold; optional prefix, kind, memory)"),
        kind: str = typer.Option("conflict", help="generated items when no --data: agree, conflict or nomemory"),
        n: int = typer.Option(8, help="number of generated items"),
        seed: int = typer.Option(0, help="generator seed"),
        heads: str | None = typer.Option(None, help="attribution heads as layer.head pairs, e.g. '21.4,25.1'"),
        circuit: str | None = typer.Option(None, help="head Scores folder of a QA circuit; heads chosen by the documented rule"),
        n_heads: int = typer.Option(2, help="heads to keep (averaged) when choosing from --circuit"),
        k_candidates: int = typer.Option(12, help="top context-effect heads the --circuit rule ranks by attention entropy"),
        agg: str = typer.Option("max", help="sentence aggregate: max, sum or mean"),
        max_new_tokens: int = typer.Option(1, help="answer tokens to generate"),
        fmt: str = typer.Option("chat", help="prompt format: chat or plain"),
        steer: float = typer.Option(0.0, help="steering strength (attention-logit bias toward the attributed sentence; 0 = off)"),
        steer_heads: str | None = typer.Option(None, help="steering heads (layer.head pairs; default: the attribution heads)"),
        gate: str = typer.Option("not_in_context", help="steer when: always, not_in_context (plain answer not copied from the context), not_in_sentence"),
        min_margin: float = typer.Option(0.0, help="steer only if the attribution's relative margin (s1 - s2) / s1 is at least this"),
        out: str = typer.Option("runs/attribute", help="output folder (attributions.jsonl)"),
        html: str | None = typer.Option(None, help="also write the HTML view here"),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
        dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="let transformers run the model repo's code"),
    ) -> None:
        """Attribute generated answers to context sentences from a few heads' attention (one forward)."""
        from patchtrace.qa.attnattrib import AttnAttribConfig, attribute, select_heads
        from patchtrace.qa.generators import make_qa_items
        from patchtrace.qa.io import load_qa_jsonl
        from patchtrace.qa.items import KINDS
        from patchtrace.qa.steering import GATES, SteeringConfig
        from patchtrace.qa.steering import steer as steer_fn
        from patchtrace.results import Scores

        if fmt not in ("chat", "plain"):
            raise common.CLIError(f"--fmt {fmt!r}: use 'chat' or 'plain'")
        if agg not in ("max", "sum", "mean"):
            raise common.CLIError(f"--agg {agg!r}: use 'max', 'sum' or 'mean'")
        if gate not in GATES:
            raise common.CLIError(f"--gate {gate!r}: use one of {', '.join(GATES)}")
        if (heads is None) == (circuit is None):
            raise common.CLIError("give exactly one of --heads or --circuit")
        if data is None and kind not in KINDS:
            raise common.CLIError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
        for value, option in ((n, "--n"), (n_heads, "--n-heads"), (k_candidates, "--k-candidates"),
                              (max_new_tokens, "--max-new-tokens")):
            common.check_count(value, option)
        common.check_finite(steer, "--steer")
        common.check_finite(min_margin, "--min-margin")
        given = parse_heads(heads) if heads is not None else None
        sh_given = parse_heads(steer_heads) if steer_heads else None
        if data is not None and not Path(data).is_file():
            raise common.CLIError(f"--data {data}: no such file")
        circuit_scores = Scores.load(circuit) if circuit is not None else None  # a damaged folder fails here
        common.check_out(out)
        if html:
            common.check_out(html, "--html", folder=False)
        m = common.load(model, device, dtype, trust_remote_code)
        for pairs, option in ((given, "--heads"), (sh_given, "--steer-heads")):
            check_heads_exist(pairs, m, option)
        items = load_qa_jsonl(data) if data else make_qa_items(kind, n, seed, m.tokenizer)
        # GenerationError / TaskError are reported by the app (common.LIBRARY_ERRORS)
        if given is not None:
            chosen = given
            info: dict[str, object] = {"heads from": "--heads"}
        else:
            probe = make_qa_items("conflict", 8, seed + 1000, m.tokenizer)
            chosen, info = select_heads(m, circuit_scores, probe, k_candidates=k_candidates, n_heads=n_heads, fmt=fmt)  # type: ignore[arg-type]
        sh = sh_given or chosen
        results = []
        for it in items:
            if steer:
                scfg = SteeringConfig(chosen, sh, steer, agg, max_new_tokens, fmt, gate, min_margin)  # type: ignore[arg-type]
                r = steer_fn(m, it, scfg)
            else:
                r = attribute(m, it, AttnAttribConfig(chosen, agg, max_new_tokens, max_new_tokens, 2, fmt))  # type: ignore[arg-type]
            results.append(r)
        _write_and_report(items, results, chosen, info, m.tokenizer, Path(out), html)


def _write_and_report(
    items: Sequence[QAItem], results: Sequence[Attribution], chosen: tuple[tuple[int, int], ...],
    info: dict[str, object], tokenizer: Any, od: Path, html: str | None,
) -> None:
    """Write ``attributions.jsonl`` (and the HTML view), print the accuracy over context answers."""
    from patchtrace.qa.attnattrib import accuracy_by_source
    from patchtrace.qa.html import heads_text, steering_text, write_html

    con = common.console()
    acc = accuracy_by_source(items, results, tokenizer)
    od.mkdir(parents=True, exist_ok=True)
    if (od / "attributions.jsonl").exists():
        common.warn(f"replacing {od / 'attributions.jsonl'} (an earlier run's attributions)")
    with (od / "attributions.jsonl").open("w") as f:
        for it, r, src in zip(items, results, acc["sources"], strict=True):
            f.write(json.dumps({
                "question": it.question, "answer": r.answer_text, "context_answer": it.answer, "gold": it.gold,
                "top_sentence": r.top_sentence, "ranking": r.ranking, "sentence_scores": r.sentence_scores.tolist(),
                "heads": [list(h) for h in chosen], "seconds": r.seconds, "kind": it.kind,
                "steered": bool(r.extras.get("steered", False)), "answer_source": src,
                **({"answer_before": r.extras.get("unsteered_text")} if "steered" in r.extras else {}),
            }) + "\n")
    con.print(
        f"heads {heads_text(chosen)}; top-1 sentence = gold on {acc['hits']}/{acc['n_context']} "
        f"items answered from the context (not counted: {len(acc['memory'])} answered from memory, "
        f"{len(acc['other'])} other)", markup=False,
    )
    steered = [bool(r.extras["steered"]) for r in results if "steered" in r.extras]
    if steered:
        con.print(f"steering: the gate opened on {sum(steered)} of {len(steered)} items "
                  f"(steered items: {[i for i, r in enumerate(results) if r.extras.get('steered')]})", markup=False)
    for i, (it, r, src) in enumerate(list(zip(items, results, acc["sources"], strict=True))[:10]):
        st = steering_text(r)
        con.print(f"  {i} [{src}] {it.subject or it.question}: answer {r.answer_text!r} ← sentence {r.top_sentence} "
                  f"(gold {it.gold})" + (f"; {st}" if st else ""), markup=False)
    for label in ("memory", "other"):
        if acc[label]:
            con.print(f"  answered from {label}, excluded from the accuracy: items {acc[label]}", markup=False)
    con.print(f"saved {od / 'attributions.jsonl'}")
    if html:
        write_html(list(zip(items, results, strict=True)), html, info={**info, "heads": heads_text(chosen)})
        con.print(f"saved {html}")
