"""Regenerate the report screenshots in this folder (real results on the bundled SmolLM2).

    .venv/bin/python docs/img/report/make_shots.py [--data runs/report-shots] [--tag after]

Four results of the shapes the library produces: a head sweep (layers × heads, exact activation
patching), heads × positions (AtP, every position), a neuron sweep (AtP, 30 × 1536 neurons at the
last position) and an MLP causal trace (window 10). Each is rendered with ``write_report`` and
screenshot in headless Chromium (``/usr/bin/chromium``) as ``<kind>-<tag>.png`` here.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("head", "head_pos", "neuron", "trace")


def compute(root: Path) -> None:
    import torch

    from patchtrace import (PatchingConfig, SiteSpec, TracingConfig, activation_patching, attribution_patching,
                            causal_tracing, load_model, make_task)

    torch.manual_seed(0)
    model = load_model()
    task = make_task("ioi", n=2, seed=0)
    if not (root / "head" / "scores.json").exists():
        activation_patching(model, task, SiteSpec("head", per_unit=True, positions="last"),
                            PatchingConfig()).save(root / "head")
    if not (root / "head_pos" / "scores.json").exists():
        attribution_patching(model, task, SiteSpec("head", per_unit=True, positions="all")).save(root / "head_pos")
    if not (root / "neuron" / "scores.json").exists():
        attribution_patching(model, task, SiteSpec("neuron", per_unit=True, positions="last")).save(root / "neuron")
    if not (root / "trace" / "scores.json").exists():
        facts = make_task("factual", n=1, model=model)
        causal_tracing(model, facts, SiteSpec("mlp_out", positions="all"),
                       TracingConfig(window=10, samples=2)).save(root / "trace")


def shoot(html: Path, png: Path, width: int = 1280, height: int = 900) -> None:
    """Full-page-ish screenshot of ``html`` with headless Chromium (no network)."""
    subprocess.run(
        ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--window-size={width},{height}", f"--screenshot={png}", html.resolve().as_uri()],
        check=True, capture_output=True, timeout=60,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/report-shots")
    ap.add_argument("--tag", default="after")
    ap.add_argument("--no-render", action="store_true", help="only screenshot the existing report.html files")
    a = ap.parse_args()
    root = Path(a.data)
    compute(root)
    from patchtrace.report import write_report

    for kind in KINDS:
        folder = root / kind
        if not a.no_render:
            write_report(folder)
        shoot(folder / "report.html", HERE / f"{kind}-{a.tag}.png")
        print(HERE / f"{kind}-{a.tag}.png")


if __name__ == "__main__":
    main()
