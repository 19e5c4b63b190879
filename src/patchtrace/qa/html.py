"""Self-contained HTML view of sentence attributions for extractive QA.

One card per example: the question, the generated answer (and, when steered, the answer before
steering and whether the gate opened), and the context with each sentence shaded by its attribution
score (the top sentence outlined, the gold source marked when known), plus a small table of
per-sentence scores. The heads used are listed at the top. Every prompt-derived string goes through
:func:`html.escape`, so a context containing ``<script>`` is shown as text, never run. No external
assets and no script: the page carries the same Content-Security-Policy as the Scores report
(:func:`patchtrace.report.html.content_security_policy`), which allows only its own stylesheet by
hash; shading is a class per tenth (``a0`` … ``a10``), not an inline style.

Example:
    An item whose context holds a script tag: the page shows it as text.

    >>> import tempfile
    >>> from patchtrace import AttnAttribConfig, load_model, qa_attribute
    >>> from patchtrace.qa.items import QAItem
    >>> m = load_model()
    >>> item = QAItem(("The capital of France is Lyon.", "<script>alert(1)</script> is not a city."),
    ...               "What is the capital of France?", "The capital of France is", " Lyon", 0)
    >>> res = qa_attribute(m, item, AttnAttribConfig(heads=((23, 2),)))
    >>> page = render_html([(item, res)])
    >>> "<script>alert" in page, "&lt;script&gt;alert(1)" in page
    (False, True)
    >>> write_html([(item, res)], Path(tempfile.mkdtemp()) / "attr.html").name
    'attr.html'
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchtrace.qa.attnattrib import Attribution
from patchtrace.qa.items import QAItem

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#222}
.card{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}
.s{padding:1px 2px;border-radius:3px}
.top{outline:2px solid #c0392b}
.gold{border-bottom:3px solid #2e86c1}
table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ddd;padding:2px 6px}
.meta{color:#666;font-size:90%}
.steer{background:#eef6ee;border-left:3px solid #2e7d32;padding:2px 6px}
""" + "".join(f".a{k}{{background:rgba(241,196,15,{k / 10:.1f})}}" for k in range(11)) + "\n"


def steering_text(res: Attribution) -> str | None:
    """``steered: ' Madrid' → ' Lyon'`` / ``not steered (gate closed): ' Lyon'``; None when not a steering run."""
    if "steered" not in res.extras:
        return None
    before = res.extras.get("unsteered_text")
    if res.extras["steered"]:
        return f"steered: {before!r} → {res.answer_text!r}"
    return f"not steered (gate closed): {res.answer_text!r}"


def heads_text(heads: Any) -> str:
    """``23.2, 29.1`` for a sequence of ``(layer, head)`` pairs (anything else as text)."""
    try:
        return ", ".join(f"{a}.{b}" for a, b in heads)
    except (TypeError, ValueError):
        return str(heads)


def _card(item: QAItem, res: Attribution) -> str:
    e = html.escape
    ss = res.sentence_scores.float()
    lo, hi = float(ss.min()), float(ss.max())
    span = (hi - lo) or 1.0
    parts = []
    rows = []
    for i, sent in enumerate(item.sentences):
        a = (float(ss[i]) - lo) / span
        cls = "s" + (" top" if i == res.top_sentence else "") + (" gold" if i == item.gold else "")
        cls += f" a{round(a * 10)}"
        parts.append(f'<span class="{cls}" title="score {float(ss[i]):.4g}">{e(sent)}</span>')
        rows.append(
            f"<tr><td>{i}</td><td>{float(ss[i]):.4g}</td><td>{res.ranking.index(i) + 1}</td>"
            f"<td>{'gold' if i == item.gold else ''}</td><td>{e(sent)}</td></tr>"
        )
    ok = "correct" if res.top_sentence == item.gold else "wrong"
    st = steering_text(res)
    return (
        '<div class="card">'
        f"<div><b>Q:</b> {e(item.question)}</div>"
        f"<div><b>Answer:</b> {e(item.prefix)}<b>{e(res.answer_text)}</b> "
        f'<span class="meta">(context answer {e(item.answer)!s}; kind {e(item.kind)}; top-1 {ok})</span></div>'
        + (f'<div class="steer">{e(st)}</div>' if st else "")
        +         f"<p>{' '.join(parts)}</p>"
        "<table><tr><th>#</th><th>score</th><th>rank</th><th></th><th>sentence</th></tr>"
        + "".join(rows)
        + f'</table><div class="meta">method {e(res.method)}, {res.seconds * 1000:.1f} ms</div></div>'
    )


def render_html(pairs: Sequence[tuple[QAItem, Attribution]], title: str = "patchtrace attribution", info: dict[str, Any] | None = None) -> str:
    """The HTML page for ``(item, attribution)`` pairs (all text escaped).

    ``info`` is shown as a list at the top; a ``heads`` entry (``(layer, head)`` pairs) as ``23.2, 29.1``.
    """
    from patchtrace.report.html import content_security_policy

    head = f"<h1>{html.escape(title)}</h1>"
    if info:
        head += "<ul class='meta'>" + "".join(
            f"<li>{html.escape(str(k))}: {html.escape(heads_text(v) if 'heads' in str(k) else str(v))}</li>"
            for k, v in info.items()) + "</ul>"
    steered = [r.extras["steered"] for _, r in pairs if "steered" in r.extras]
    if steered:
        head += f"<p class='meta'>steering: the gate opened on {sum(steered)} of {len(steered)} items</p>"
    legend = "<p class='meta'>shading = attribution score; red outline = attributed (top-1) sentence; blue underline = gold source.</p>"
    body = "".join(_card(it, r) for it, r in pairs)
    csp = content_security_policy([], [_CSS])
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{head}{legend}{body}</body></html>")


def write_html(pairs: Sequence[tuple[QAItem, Attribution]], path: str | Path, **kw: Any) -> Path:
    """Write :func:`render_html` to ``path``."""
    p = Path(path)
    p.write_text(render_html(pairs, **kw), encoding="utf-8")
    return p
