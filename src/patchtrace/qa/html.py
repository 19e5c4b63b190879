"""Self-contained HTML view of sentence attributions for extractive QA.

One card per example: the question, the generated answer, and the context with each sentence
shaded by its attribution score (the top sentence outlined, the gold source marked when known),
plus a small table of per-sentence scores. Every prompt-derived string goes through
:func:`html.escape`, so a context containing ``<script>`` is shown as text, never run. No external
assets: the file opens offline.

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
"""


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
        parts.append(f'<span class="{cls}" style="background:rgba(241,196,15,{a:.3f})" title="score {float(ss[i]):.4g}">{e(sent)}</span>')
        rows.append(
            f"<tr><td>{i}</td><td>{float(ss[i]):.4g}</td><td>{res.ranking.index(i) + 1}</td>"
            f"<td>{'gold' if i == item.gold else ''}</td><td>{e(sent)}</td></tr>"
        )
    ok = "correct" if res.top_sentence == item.gold else "wrong"
    return (
        '<div class="card">'
        f"<div><b>Q:</b> {e(item.question)}</div>"
        f"<div><b>Answer:</b> {e(item.prefix)}<b>{e(res.answer_text)}</b> "
        f'<span class="meta">(context answer {e(item.answer)!s}; kind {e(item.kind)}; top-1 {ok})</span></div>'
        f"<p>{' '.join(parts)}</p>"
        "<table><tr><th>#</th><th>score</th><th>rank</th><th></th><th>sentence</th></tr>"
        + "".join(rows)
        + f'</table><div class="meta">method {e(res.method)}, {res.seconds * 1000:.1f} ms</div></div>'
    )


def render_html(pairs: Sequence[tuple[QAItem, Attribution]], title: str = "patchtrace attribution", info: dict[str, Any] | None = None) -> str:
    """The HTML page for ``(item, attribution)`` pairs (all text escaped)."""
    head = f"<h1>{html.escape(title)}</h1>"
    if info:
        head += "<ul class='meta'>" + "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in info.items()) + "</ul>"
    legend = "<p class='meta'>shading = attribution score; red outline = attributed (top-1) sentence; blue underline = gold source.</p>"
    body = "".join(_card(it, r) for it, r in pairs)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{head}{legend}{body}</body></html>"


def write_html(pairs: Sequence[tuple[QAItem, Attribution]], path: str | Path, **kw: Any) -> Path:
    """Write :func:`render_html` to ``path``."""
    p = Path(path)
    p.write_text(render_html(pairs, **kw), encoding="utf-8")
    return p
