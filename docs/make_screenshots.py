"""Regenerate the README's screenshots: the built-in model through every step, in headless chromium.

Usage: .venv/bin/python docs/make_screenshots.py   (needs Debian's chromium; about a minute on 2 cores)
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from test_app_browser import CHROMIUM, Watched  # noqa: E402
from wanda_gui.app.main import launch  # noqa: E402

OUT = Path(__file__).resolve().parent / "screenshots"


def main() -> None:
    demo = launch(port=7890, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
            w = Watched(browser, "http://127.0.0.1:7890/")
            page, steps = w.page, w.page.locator(".step")
            page.locator("#load").click()
            w.wait_text("load-status", "Loaded")
            w.fill("nsamples", 32)
            w.fill("seqlen", 256)
            w.wait_text("estimate", "Estimate on cpu")
            page.locator("#start").click()
            w.wait_text("prune-status", "block 12/")
            steps.nth(2).screenshot(path=str(OUT / "3-live.png"))
            w.wait_text("prune-status", "Pruned", timeout=300_000)
            page.locator("#layer-pick input").click()
            page.get_by_role("option", name="model.layers.3.mlp.down_proj", exact=True).click()
            page.wait_for_timeout(1500)
            page.locator("#map-plot").screenshot(path=str(OUT / "3-maps.png"))
            steps.nth(0).screenshot(path=str(OUT / "1-model.png"))
            steps.nth(1).screenshot(path=str(OUT / "2-prune.png"))
            w.fill("nwindows", 4)
            page.locator("#eval").click()
            w.wait_text("perplexity", "Pruned / dense", timeout=300_000)
            steps.nth(3).screenshot(path=str(OUT / "4-results.png"))
            w.fill("prompt", "What is the capital of France? Answer in one sentence.")
            page.locator("#send").click()
            w.wait_text("dense-stats", "done", timeout=300_000)
            w.wait_text("pruned-stats", "done", timeout=300_000)
            steps.nth(4).screenshot(path=str(OUT / "5-chat.png"))
            w.fill("export-dir", Path(tempfile.mkdtemp()) / "smollm2-wanda-50")
            page.locator("#export").click()
            w.wait_text("export-status", "Exported")
            steps.nth(5).screenshot(path=str(OUT / "6-export.png"))
            page.screenshot(path=str(OUT / "app.png"), full_page=True)
            assert not w.outside and not w.errors, (w.outside, w.errors)
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
