"""Pictures of diffusion results: an image grid per condition, a bar chart of scores, an HTML page.

Every prompt string is HTML-escaped. The PNGs are written next to the page and referenced by
relative path, so the folder can be moved or attached as a whole.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchtrace.report.figure import save_figure


def image_grid_png(images: Any, row_labels: Sequence[str], path: str | Path, col_labels: Sequence[str] = (),
                   max_cols: int = 12, cell: float = 0.7) -> Path:  # fmt: skip
    """``images`` ``(rows, cols, 3, H, W)`` in [0, 1] as one PNG grid (one row per condition)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = images.shape[0], min(images.shape[1], max_cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.2, rows * cell + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7)
            if r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=6)
    return save_figure(fig, path, dpi=80, pad=0.2)


def bars_png(labels: Sequence[str], values: Sequence[float], path: str | Path, title: str, ylabel: str) -> Path:
    """A bar chart (one bar per window/layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * len(labels) + 1), 2.4))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    return save_figure(fig, path, dpi=90)


def html_page(path: str | Path, title: str, sections: Sequence[tuple[str, str, Sequence[str]]]) -> Path:
    """A page of sections ``(heading, text, [png file names])``; every text is escaped.

    Like the main report, it carries a strict Content-Security-Policy: no script at all, images only
    from its own folder, and its one stylesheet allowed by its SHA-256 hash (no ``'unsafe-inline'``).
    """
    import base64
    import hashlib

    e = html.escape
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}pre{white-space:pre-wrap}"
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src 'self'; style-src 'sha256-{digest}'"
    parts = [f"<!doctype html><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' content=\"{csp}\">",
             f"<title>{e(title)}</title><style>{style}</style>", f"<h1>{e(title)}</h1>"]
    for head, text, pngs in sections:
        parts.append(f"<h2>{e(head)}</h2><pre>{e(text)}</pre>")
        parts += [f"<img src='{e(p)}' alt='{e(p)}'>" for p in pngs]
    out = Path(path)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def locogen_report(result: Any, folder: str | Path, attribute: str = "attribute") -> Path:
    """``scores.png``, ``grid.png`` and ``report.html`` for a :class:`~patchtrace.diffusion.locogen.LocoGenResult`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = result.scores
    bars_png(s.labels["window"], s.values.tolist(), folder / "scores.png",
             f"LocoGen: drop of the {attribute} score per window", "score drop")  # fmt: skip
    P, S = result.images.shape[1], result.images.shape[2]
    imgs = result.images.flatten(1, 2)
    cols = [f"p{p} s{result.seeds[s_]}" for p in range(P) for s_ in range(S)]
    grid_rows = [f"{lab} {float(result.condition_scores[i].mean()):.2f}" for i, lab in enumerate(result.condition_labels)]
    image_grid_png(imgs, grid_rows, folder / "grid.png", cols)
    best = result.best_window()
    lines = [f"best window: layers {list(best)} = " + ", ".join(result.layer_names[j] for j in best),
             f"unintervened score {s.baselines['clean']:.3f}; all layers altered {s.baselines['corrupt']:.3f}",
             *(f"prompt {i}: {p!r} -> altered {a!r}" for i, (p, a) in enumerate(zip(result.prompts, result.alt_prompts))),
             "", *(f"{lab}: drop {v:+.3f}" for lab, v in zip(s.labels["window"], s.values.tolist()))]  # fmt: skip
    return html_page(folder / "report.html", f"LocoGen localization of {attribute}",
                     [("Windows", "\n".join(lines), ["scores.png", "grid.png"])])  # fmt: skip
