"""Pictures and pages for text in images: per-layer localization, editing per ``t_start``, prevention, LoRA.

Each function writes PNGs (image grids, curves) and one HTML page into a folder through
:mod:`.report` (every prompt string escaped; strict Content-Security-Policy). Images are
``(rows, 3, H, W)`` in [0, 1]; a grid has one row per condition and one column per generated image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchtrace.diffusion.report import html_page, image_grid_png
from patchtrace.report.figure import save_figure


def curves_png(labels: Sequence[str], series: dict[str, Sequence[float]], path: str | Path, title: str) -> Path:
    """One line per metric over the layers (or ``t_start`` values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.2, 0.4 * len(labels) + 1.5), 2.4))
    for name, vals in series.items():
        ax.plot(range(len(vals)), list(vals), marker="o", ms=3, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6)
    return save_figure(fig, path, dpi=90)


def _grid(rows: Sequence[Any], labels: Sequence[str], path: Path, max_cols: int = 8) -> Path:
    import torch

    cols = min(max_cols, min(r.shape[0] for r in rows))
    return image_grid_png(torch.stack([r[:cols] for r in rows]), labels, path, max_cols=max_cols)


def textloc_report(r: dict[str, Any], folder: str | Path, cell_labels: Sequence[str], prompts_a: Sequence[str],
                   prompts_b: Sequence[str], fractions: Sequence[float], title: str) -> Path:  # fmt: skip
    """``textloc_curves.png``, ``textloc_grid.png``, ``report.html`` for a (joint) text-localization result."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    curves_png(cell_labels, {"agree B (glyph)": r["agree_b"].tolist(), "preserve A": r["preserve"].tolist(),
                             "SSIM to A": r["ssim"].tolist()}, folder / "textloc_curves.png", title)  # fmt: skip
    _grid([r["images_a"], r["images_b"], *r["images"]], ["A", "B", *cell_labels], folder / "textloc_grid.png")
    lines = [f"{lab}: agree B {float(r['agree_b'][i]):.2f}  preserve {float(r['preserve'][i]):.2f}  "
             f"PSNR {float(r['psnr'][i]):.1f}  SSIM {float(r['ssim'][i]):.2f}  params {100 * fractions[i]:.2f}%"
             for i, lab in enumerate(cell_labels)]  # fmt: skip
    lines += [f"plain A agrees with B {r['agree_b_plain_a']:.2f}; plain B {r['agree_b_plain_b']:.2f}", ""]
    lines += [f"A: {a!r}  B: {b!r}" for a, b in zip(prompts_a, prompts_b)]
    return html_page(folder / "report.html", title,
                     [("Per-layer text localization", "\n".join(lines), ["textloc_curves.png", "textloc_grid.png"])])  # fmt: skip


def text_edit_report(r: dict[str, Any], folder: str | Path, title: str) -> Path:
    """``edit_grid.png`` (rows: A, B, each ``t_start``), ``edit_curves.png``, ``report.html``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = [str(row["t_start"]) if isinstance(row["t_start"], str) else f"t_start {row['t_start']}" for row in r["rows"]]
    _grid(r["images"], labels, folder / "edit_grid.png")
    sweep = r["rows"][2:]
    curves_png([str(x["t_start"]) for x in sweep], {"success (glyph = B)": [x["success"] for x in sweep],
               "preserve A": [x["preserve"] for x in sweep], "SSIM to A": [x["ssim"] for x in sweep]},
               folder / "edit_curves.png", title)  # fmt: skip
    lines = [f"{lab}: success {x['success']:.2f}  preserve {x['preserve']:.2f}  PSNR {x['psnr']:.1f}  SSIM {x['ssim']:.2f}"
             for lab, x in zip(labels, r["rows"])]  # fmt: skip
    lines += ["", f"layers patched: {r['layers']}"] + [f"A: {a!r}  B: {b!r}" for a, b in zip(r["prompts_a"], r["prompts_b"])]
    return html_page(folder / "report.html", title, [("Editing per t_start", "\n".join(lines), ["edit_grid.png", "edit_curves.png"])])


def prevention_report(evals: dict[str, dict[str, Any]], folder: str | Path, title: str) -> Path:
    """``prevent_grid.png`` (forbidden prompts before and after each edit; others after) and ``report.html``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = next(iter(evals.values()))
    rows, labels = [first["images"]["forbidden_before"]], ["forbidden, unedited"]
    for name, e in evals.items():
        rows.append(e["images"]["forbidden_after"])
        labels.append(f"forbidden, {name}")
    rows.append(first["images"]["others_before"])
    labels.append("others, unedited")
    for name, e in evals.items():
        rows.append(e["images"]["others_after"])
        labels.append(f"others, {name}")
    _grid(rows, labels, folder / "prevent_grid.png")
    lines = []
    for name, e in evals.items():
        lines.append(f"{name} (layers {e['layers']}): forbidden drawn {e['forbidden_drawn_before']:.2f} -> "
                     f"{e['forbidden_drawn_after']:.2f}; neutral drawn {e['neutral_drawn_before']:.2f} -> "
                     f"{e['neutral_drawn_after']:.2f}; other prompts' attributes {e['others_all_attrs_before']:.2f} -> "
                     f"{e['others_all_attrs_after']:.2f}, PSNR {e['others_psnr']:.1f}, SSIM {e['others_ssim']:.2f}")  # fmt: skip
    lines += ["", *(f"forbidden: {p!r}" for p in first["prompts"]["forbidden"]),
              *(f"other: {p!r}" for p in first["prompts"]["others"])]  # fmt: skip
    return html_page(folder / "report.html", title, [("Prevention", "\n".join(lines), ["prevent_grid.png"])])


def lora_report(base: dict[str, Any], arms: Sequence[dict[str, Any]], folder: str | Path, title: str) -> Path:
    """``lora_grid.png`` (hard prompts: unchanged model, each arm) and ``report.html`` with the table."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _grid([base["hard_images"], *(a["after"]["hard_images"] for a in arms)],
          ["unchanged", *(f"LoRA {a['arm']}" for a in arms)], folder / "lora_grid.png")  # fmt: skip
    lines = [f"unchanged: hard glyph {base['hard']['glyph']:.2f}, train glyph {base['train']['glyph']:.2f}"]
    for a in arms:
        h, t = a["after"]["hard"], a["after"]["train"]
        lines.append(f"LoRA {a['arm']} ({a['layers']}): hard glyph {h['glyph']:.2f}, train glyph {t['glyph']:.2f}, "
                     f"trainable {a['trainable']} ({100 * a['trainable_fraction']:.2f}%), {a['seconds']} s")  # fmt: skip
    return html_page(folder / "report.html", title, [("LoRA: localized vs all", "\n".join(lines), ["lora_grid.png"])])
