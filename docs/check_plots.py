"""Render the live view's figures in headless chromium at 600 and 1200 px wide, to look for overlaps by eye.

Usage: .venv/bin/python docs/check_plots.py [OUT_DIR]   (default /tmp/wanda_gui-plots; needs Debian's chromium)
Each figure is written as a self-contained HTML page (plotly.js inlined) and screenshotted at both widths. The figures
get the changes Gradio's plot component makes (autosize; a titled figure's top margin raised to at least 100 px).
Then the same figures are shown in Gradio itself, in pairs side by side as the Live step shows them (its own plotly.js
and the plot's label in the corner), and screenshotted at 1280 and 600 px wide (gradio-*.png).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("NO_PROXY", "localhost,127.0.0.1")

import numpy as np
import torch
from playwright.sync_api import sync_playwright

from wanda_gui.app import plots
from wanda_gui.core.engine import pooled

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WIDTHS = (600, 1200)
MIN_WIDTH = 520  # the plots' min_width in the page: narrower than two of these, the row wraps


def layer(rows: int, cols: int, method: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pooled score and kept-fraction maps of a random layer whose inputs have a few outlier features, pruned 50%."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g).abs()
    norms = torch.exp(torch.randn(cols, generator=g) * 0.3)
    norms[torch.randperm(cols, generator=g)[:4]] *= 20
    score = weight * norms if method == "wanda" else weight
    pruned = score <= score.kthvalue(cols // 2, dim=1, keepdim=True).values
    return pooled(score), pooled(~pruned)


def figures() -> dict[str, "plots.go.Figure"]:
    """The figures the page shows: empty, mid-run and finished block charts; maps of pooled and unpooled layers."""
    secs = {i: 0.8 + 0.4 * np.sin(i) for i in range(30)}
    down, mlp_in, small = layer(576, 1536, "wanda"), layer(1536, 576, "magnitude"), layer(128, 64, "wanda")
    return {
        "blocks-empty": plots.block_chart(1, {}, {}, None),
        "blocks-running": plots.block_chart(30, {i: 0.5 for i in range(12)}, secs, 0.5),
        "blocks-done": plots.block_chart(30, {i: 0.5 for i in range(30)}, secs, 0.5),
        "maps-wanda-576x1536": plots.layer_maps("model.layers.11.mlp.down_proj", (576, 1536), 0.5, *down),
        "maps-magnitude-1536x576": plots.layer_maps("model.layers.11.mlp.gate_proj", (1536, 576), 0.5, *mlp_in,
                                                    method="magnitude"),
        "maps-wanda-128x64": plots.layer_maps("model.layers.0.self_attn.q_proj", (128, 64), 0.5, *small),
    }


def as_gradio_shows(fig: "plots.go.Figure") -> "plots.go.Figure":
    """Apply what Gradio's PlotlyPlot does to a figure's layout before drawing it."""
    if fig.layout.title.text:
        fig.update_layout(margin_t=max(100, fig.layout.margin.t or 0))
    return fig.update_layout(autosize=True, margin_autoexpand=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gradio_page(figs: dict) -> "object":
    """A page with the block charts beside the maps as the Live step lays them out, wrapping on narrow pages."""
    import gradio as gr

    with gr.Blocks() as demo:
        for left, right in (("blocks-running", "maps-wanda-576x1536"), ("blocks-done", "maps-magnitude-1536x576"),
                            ("blocks-empty", "maps-wanda-128x64")):
            with gr.Row():
                gr.Plot(figs[left], label="Blocks", min_width=MIN_WIDTH)
                gr.Plot(figs[right], label="Maps", min_width=MIN_WIDTH)
    return demo


def shoot_gradio(browser, out: Path) -> None:
    """Screenshot the figures inside Gradio's own plot component at a desktop and a narrow width."""
    port = free_port()
    demo = gradio_page(figures())
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        for width in (1280, 600):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.wait_for_selector(".main-svg")
            page.wait_for_timeout(2000)
            page.screenshot(path=str(out / f"gradio-{width}.png"), full_page=True)
            page.close()
            print(out / f"gradio-{width}.png")
    finally:
        demo.close()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        shoot_gradio(browser, out)
        for name, fig in figures().items():
            html = out / f"{name}.html"
            as_gradio_shows(fig).write_html(html, include_plotlyjs=True, full_html=True, config={"responsive": True})
            for width in WIDTHS:
                page = browser.new_page(viewport={"width": width, "height": 600})
                page.goto(html.as_uri(), wait_until="load")
                page.wait_for_selector(".main-svg")
                page.locator(".plotly-graph-div").screenshot(path=str(out / f"{name}-{width}.png"))
                page.close()
            print(out / f"{name}-*.png")
        browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/wanda_gui-plots"))
