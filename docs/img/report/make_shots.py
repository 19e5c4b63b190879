"""Regenerate the report screenshots in this folder (real results on the bundled SmolLM2).

    .venv/bin/python docs/img/report/make_shots.py [--data runs/report-shots] [--tag after]

Four results of the shapes the library produces: a head sweep (layers × heads, exact activation
patching), heads × positions (AtP, every position), a neuron sweep (AtP, 30 × 1536 neurons at the
last position) and an MLP causal trace (window 10). Each is rendered with ``write_report`` and
screenshot in headless Chromium (``/usr/bin/chromium``, playwright) as ``<kind>-<tag>.png`` here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("head", "head_pos", "neuron", "trace")


def compute(root: Path) -> None:
    import torch

    from patchtrace import (
        PatchingConfig,
        SiteSpec,
        TracingConfig,
        activation_patching,
        attribution_patching,
        causal_tracing,
        load_model,
        make_task,
    )

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


ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def shoot(html: Path, png: Path, width: int = 1280, height: int = 900, full_page: bool = True) -> None:
    """Screenshot of ``html`` in headless Chromium (``/usr/bin/chromium``, no network), whole page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(html.resolve().as_uri())
        page.wait_for_timeout(200)
        page.screenshot(path=str(png), full_page=full_page)
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/report-shots")
    ap.add_argument("--tag", default="after")
    ap.add_argument("--viewport", action="store_true", help="only the first screen (the 'before' shots)")
    ap.add_argument("--no-render", action="store_true", help="only screenshot the existing report.html files")
    a = ap.parse_args()
    root = Path(a.data)
    compute(root)
    from patchtrace.report import write_report

    for kind in KINDS:
        folder = root / kind
        if not a.no_render:
            write_report(folder)
        shoot(folder / "report.html", HERE / f"{kind}-{a.tag}.png", full_page=not a.viewport)
        print(HERE / f"{kind}-{a.tag}.png")


if __name__ == "__main__":
    main()
