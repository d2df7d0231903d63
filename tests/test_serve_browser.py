"""The web page in a real browser (Debian's Chromium, driven by Playwright): open a slide,
see tiles load, zoom, ask a question, watch the answer stream, click a citation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.serve_helpers import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CMU = "CMU-1-Small-Region.svs"
#: Without these, Chromium keeps reaching for Google's services from a machine with no route.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not CHROMIUM.exists():
    message = "Chromium is not installed (apt install chromium); .ci/run installs it"
    if os.environ.get("CI"):
        raise RuntimeError(message)
    pytest.skip(message, allow_module_level=True)


@pytest.fixture
def server(cmu_slide_root: Path, feature_cache: Path, tmp_path: Path):
    process = ServerProcess(cmu_slide_root, tmp_path / "data", feature_cache)
    yield process
    process.stop()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("HISTOPILOT_TEST_ARTIFACTS", tmp_path / "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_view_zoom_chat_and_follow_a_citation(server: ServerProcess, artifacts: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        # The page's policy forbids eval, which Playwright's waiting helpers use.
        context = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page_errors: list[str] = []
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        try:
            page.goto(f"{server.url}/#slide={CMU}")
            page.wait_for_function("window.histopilot?.viewer.tilesLoaded >= 4", timeout=30_000)
            view = lambda: page.evaluate("({...window.histopilot.viewer.view})")  # noqa: E731
            whole = view()

            loaded = page.evaluate("window.histopilot.viewer.tilesLoaded")
            page.click("#zoom-in")
            zoomed = view()
            assert zoomed["scale"] == pytest.approx(whole["scale"] * 1.5)
            # The next finer level's tiles arrive.
            page.wait_for_function(f"window.histopilot.viewer.tilesLoaded > {loaded}")

            page.fill("#chat-input", "What do you see on this slide?")
            page.click("#send")
            answer = page.locator("#messages li.assistant")
            page.wait_for_function(
                "document.querySelector('#messages li.assistant .steps')?.textContent.length > 0",
                timeout=60_000,
            )  # the analysis's progress shows while it runs
            page.wait_for_selector("#messages li.assistant[data-done=true]", timeout=120_000)
            assert "Offline mode" in answer.inner_text()

            citation = answer.locator("button.cite").first
            region = citation.inner_text()
            citation.click()
            page.wait_for_timeout(800)  # the fly-to animation
            moved = view()
            box = page.evaluate(
                f"window.histopilot.viewer.overlays.regions.find(r => r.region_id === '{region}')"
            )
            assert moved["x"] == pytest.approx(box["x"] + box["width"] / 2, abs=1)
            assert moved["y"] == pytest.approx(box["y"] + box["height"] / 2, abs=1)
            canvas = page.evaluate(
                "[window.histopilot.viewer.width, window.histopilot.viewer.height]"
            )
            filled = max(
                box["width"] * moved["scale"] / canvas[0],
                box["height"] * moved["scale"] / canvas[1],
            )
            assert filled == pytest.approx(0.7, abs=0.02)  # the region fills most of the view
            assert page.evaluate("window.histopilot.viewer.highlighted") == region
        finally:
            page.screenshot(path=str(artifacts / "viewer-chat.png"))
            browser.close()
    assert not page_errors
