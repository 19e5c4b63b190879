"""The HTML report in a real browser: headless Chromium (Debian's ``chromium``, driven by playwright).

Checks what a reader meets: the page renders with no console message of level error/warning (a CSP
violation, a JavaScript exception, a failed request all print one), every canvas is drawn, hovering
a cell shows its site, value and token, clicking the neuron overview drills down, and prompt tokens
carrying ``</script>`` and ``<img onerror>`` payloads are shown as text and never run. A screenshot is
kept as an artifact: ``runs/test-artifacts/report-browser.png`` (the path is printed).

Chromium is a system package (``.ci/run`` installs it). Without it this test FAILS, saying so: a
browser check that silently skips is a browser check that never runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from patchtrace.report import html_report
from patchtrace.results import Scores

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACT = Path(__file__).resolve().parents[2] / "runs" / "test-artifacts" / "report-browser.png"
PAYLOADS = ['</script><script>window.__pwned = 1</script>', '<img src=x onerror="window.__pwned = 2">']


def browser_path() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path is None:
        pytest.fail("headless Chromium is not installed (/usr/bin/chromium): install Debian's `chromium` "
                    "package (`.ci/run` does: apt-get install -y chromium); this test does not skip")
    return path


def sections() -> dict[str, Scores]:
    torch.manual_seed(0)
    tokens = ["When", "ĠMary", PAYLOADS[0], PAYLOADS[1], "Ġto"]
    hp = torch.randn(3, 4, 5)
    hp[2, 1, 4] = 9.0
    heads = Scores(hp, ("layer", "head", "pos"), "head", baselines={"clean": 4.0, "corrupt": -4.0},
                   labels={"pos": tokens}, extras={"patched": hp - 4.0},
                   provenance={"method": "activation_patching", "task": {"name": PAYLOADS[1]}})
    nv = torch.randn(3, 480) * 0.01  # 48 bins of 10 neurons
    nv[1, 123] = -2.0
    neurons = Scores(nv, ("layer", "neuron"), "neuron")
    return {"heads × positions " + PAYLOADS[0]: heads, "neurons": neurons}


def test_report_in_chromium(tmp_path):
    exe = browser_path()
    from playwright.sync_api import sync_playwright

    path = html_report(sections(), tmp_path / "report.html", title="browser " + PAYLOADS[1])
    messages: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            page.on("dialog", lambda d: (messages.append(f"dialog: {d.message}"), d.dismiss()))
            page.goto(path.as_uri())
            page.wait_for_function("document.querySelectorAll('canvas.pt-panel').length === 4")

            # drawn: every canvas has a size and its geometry
            geoms = page.eval_on_selector_all("canvas.pt-panel", "cs => cs.map(c => JSON.parse(c.dataset.geom))")
            assert [(g["R"], g["C"]) for g in geoms] == [(4, 5), (4, 5), (4, 5), (3, 48)]

            def hover(selector: str, index: int, r: int, c: int) -> str:
                loc = page.locator(selector).nth(index)
                loc.scroll_into_view_if_needed()
                box, g = loc.bounding_box(), json.loads(loc.get_attribute("data-geom"))
                page.mouse.move(box["x"] + g["left"] + (c + 0.5) * g["cell"], box["y"] + g["top"] + (r + 0.5) * g["ch"])
                assert page.is_visible("#tip")
                return page.text_content("#tip")

            # facet L2, head 1, position 4 (the 9.0 cell); and the payload position shown as text
            assert hover("canvas.pt-panel", 2, 1, 4).split("\n") == [
                "head[2].h1@4", "effect +9.0000", "recovery +1.125", "token ␣to"]  # patched 5: (5 − (−4)) / 8
            tip = hover("canvas.pt-panel", 0, 0, 2)
            assert tip.startswith("head[0].h0@2\n") and tip.endswith("token " + PAYLOADS[0].replace(" ", "␣"))

            # neuron overview: the bin holding n123 names it; a click drills down into the layer
            tip = hover("canvas.pt-panel", 3, 1, 123 // 10)
            assert "neuron[1].n123 -2.0000" in tip
            page.mouse.click(*_centre(page, 3, 0, 0))
            assert page.text_content(".pt-drill-title").startswith("drill-down: L0")
            page.mouse.click(*_centre(page, 3, 1, 4))
            rows = page.eval_on_selector_all("tbody.pt-drill-top tr", "rs => rs.map(r => r.innerText)")
            assert rows[0].split("\t")[1:3] == ["neuron[1].n123", "-2.0000"]
            dtip = hover("canvas.pt-drill", 0, 123 // 10, 123 % 10)
            assert dtip.split("\n")[:2] == ["neuron[1].n123", "effect -2.0000"]

            # the payloads never ran, and are on the page as text
            assert page.evaluate("window.__pwned") is None
            assert page.locator("img").count() == 0
            assert PAYLOADS[0].replace(" ", "␣") in page.inner_text("p.prompt")
            ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACT), full_page=True)

            # the QA attribution page: same policy, no inline style attribute to be refused
            qa = tmp_path / "qa.html"
            qa.write_text(qa_page(), encoding="utf-8")
            page.goto(qa.as_uri())
            assert page.locator("div.card").count() == 1 and page.evaluate("window.__pwned") is None
            shaded = page.eval_on_selector("span.a10", "e => getComputedStyle(e).backgroundColor")
            assert shaded == "rgb(241, 196, 15)"  # the class stylesheet applied (allowed by its hash)
        finally:
            browser.close()
    print(f"screenshot: {ARTIFACT}")
    assert ARTIFACT.stat().st_size > 10_000
    assert messages == [], messages


def qa_page() -> str:
    from patchtrace.qa.attnattrib import Attribution
    from patchtrace.qa.html import render_html
    from patchtrace.qa.items import QAItem

    item = QAItem(("The capital of France is Lyon.", PAYLOADS[1] + " is not a city."), "Capital?",
                  "The capital of France is", " Lyon", 0)
    res = Attribution([1], " Lyon", torch.zeros(4), torch.tensor([0.9, 0.1]), [0, 1], (0, 2), 0.01, "steered",
                      None, extras={"steered": True, "unsteered_text": " Paris"})  # type: ignore[arg-type]
    return render_html([(item, res)], info={"heads": ((23, 2),)})


def _centre(page, index: int, r: int, c: int) -> tuple[float, float]:
    loc = page.locator("canvas.pt-panel").nth(index)
    loc.scroll_into_view_if_needed()
    box, g = loc.bounding_box(), json.loads(loc.get_attribute("data-geom"))
    return box["x"] + g["left"] + (c + 0.5) * g["cell"], box["y"] + g["top"] + (r + 0.5) * g["ch"]
