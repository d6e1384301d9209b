"""Regenerate the README's screenshots: the built-in model through every step, in headless chromium.

Usage: .venv/bin/python docs/make_screenshots.py [NAME ...]   (needs Debian's chromium)
NAMEs (default: all): 1-model 2-prune 3-live 3-maps 3-why 4-results 5-chat 6-export app 7-compare. Only the steps the
named screenshots need are run: `make_screenshots.py 3-why 7-compare` loads, prunes and compares (about 12 minutes on
2 cores, most of it Compare's 12 runs, SparseGPT's the slowest); the rest of the set takes a few minutes more.
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from test_app_browser import CHROMIUM, Watched  # noqa: E402
from test_app_browser_compare import tick  # noqa: E402
from wanda_gui.app.main import launch  # noqa: E402

OUT = Path(__file__).resolve().parent / "screenshots"
NAMES = ("1-model", "2-prune", "3-live", "3-maps", "3-why", "4-results", "5-chat", "6-export", "app", "7-compare")
AFTER_PRUNING = set(NAMES) - {"1-model", "7-compare"}


def main(wanted: set[str]) -> None:
    unknown = wanted - set(NAMES)
    if unknown:
        sys.exit(f"Unknown screenshot(s) {sorted(unknown)}: choose from {' '.join(NAMES)}.")
    demo = launch(port=7890, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
            w = Watched(browser, "http://127.0.0.1:7890/")
            page, steps = w.page, w.page.locator(".step")

            def shot(name: str, part) -> None:
                if name in wanted:
                    part.screenshot(path=str(OUT / f"{name}.png"))
                    print(OUT / f"{name}.png")

            page.locator("#load").click()
            w.wait_text("load-status", "Loaded")
            w.fill("nsamples", 32)
            w.fill("seqlen", 256)
            w.wait_text("estimate", "Estimate on cpu")
            if wanted & AFTER_PRUNING:
                page.locator("#start").click()
                if "3-live" in wanted:
                    w.wait_text("prune-status", "block 12/")
                    shot("3-live", steps.nth(2))
                w.wait_text("prune-status", "Pruned", timeout=300_000)
                page.locator("#layer-pick input").click()
                page.get_by_role("option", name="model.layers.3.mlp.down_proj", exact=True).click()
                page.wait_for_timeout(1500)
                shot("3-maps", page.locator("#map-plot"))
                if "3-why" in wanted:  # attention inputs come out of a norm: where outlier features show
                    page.locator("#layer-pick input").click()
                    page.get_by_role("option", name="model.layers.3.self_attn.q_proj", exact=True).click()
                    page.wait_for_timeout(1500)
                    shot("3-why", page.locator("#why-plot"))
            shot("1-model", steps.nth(0))
            shot("2-prune", steps.nth(1))
            if wanted & {"4-results", "5-chat", "6-export", "app"}:
                w.fill("nwindows", 4)
                page.locator("#eval").click()
                w.wait_text("perplexity", "Pruned / dense", timeout=300_000)
                shot("4-results", steps.nth(3))
            if wanted & {"5-chat", "6-export", "app"}:
                w.fill("prompt", "What is the capital of France? Answer in one sentence.")
                page.locator("#send").click()
                w.wait_text("dense-stats", "done", timeout=300_000)
                w.wait_text("pruned-stats", "done", timeout=300_000)
                shot("5-chat", steps.nth(4))
            if wanted & {"6-export", "app"}:
                w.fill("export-dir", Path(tempfile.mkdtemp()) / "smollm2-wanda-50")
                page.locator("#export").click()
                w.wait_text("export-status", "Exported")
                shot("6-export", steps.nth(5))
            if "app" in wanted:
                page.screenshot(path=str(OUT / "app.png"), full_page=True)
            if "7-compare" in wanted:  # last: Compare lets go of the session's pruned model
                tick(w, "compare-methods", {"Wanda", "Magnitude", "SparseGPT"})
                tick(w, "compare-sparsities", {"30%", "50%", "70%"})
                tick(w, "compare-patterns", {"unstructured", "2:4"})
                w.fill("compare-windows", 4)
                page.locator("#compare").click()
                w.wait_text("compare-status", "✓ Compared", timeout=1_800_000)
                shot("7-compare", steps.nth(6))
            assert not w.outside and not w.errors, (w.outside, w.errors)
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main(set(sys.argv[1:]) or set(NAMES))
