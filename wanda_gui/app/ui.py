"""The page: the steps laid out in order, then wired. Each step (wanda_gui/app/steps/) holds its components,
callbacks and wiring; every callback hands the work to the Workspace/core and formats the result."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..core.devices import read_telemetry
from ..core.memory import format_bytes
from .common import Page, close_session
from .policy import ServePolicy
from .pool import ModelPool
from .sessions import Sessions
from .steps import chat, compare, export, live, method, model, results
from .steps.model import device_choices

ASSETS = Path(__file__).resolve().parents[2] / "assets"
STEPS = (model, method, live, results, chat, export, compare)  # in the order the page shows them


def header() -> str:
    logo = (ASSETS / "logo.svg").read_text()
    return (f"<div id='brand'>{logo}<div><h1>wanda_gui</h1><p>Prune an LLM by weights and activations "
            "(<a href='https://arxiv.org/abs/2306.11695' target='_blank'>Sun et al. 2023</a>), watch it happen, "
            "and chat with the pruned and dense models side by side.</p></div></div>")


def telemetry_line() -> str:
    t = read_telemetry()
    parts = [f"CPU {t.cpu_percent:.0f}%", f"RAM {format_bytes(t.ram_used_bytes)} / {format_bytes(t.ram_total_bytes)}",
             f"app {format_bytes(t.process_rss_bytes)}"]
    parts += [f"GPU{g.index} {g.utilization_percent:.0f}% · {format_bytes(g.memory_used_bytes)} / "
              f"{format_bytes(g.memory_total_bytes)}" for g in t.gpus]
    return " · ".join(parts)


def build(policy: ServePolicy | None = None) -> gr.Blocks:
    policy = policy or ServePolicy()
    with gr.Blocks(title="wanda_gui: prune LLMs with Wanda") as demo:
        demo.policy, demo.sessions = policy, Sessions(ModelPool(policy.max_sessions))  # read through served(request)
        page = Page(policy)
        with gr.Row(equal_height=True):
            gr.HTML(header())
        telemetry = gr.Markdown(telemetry_line(), elem_id="telemetry")
        gr.Timer(1.0).tick(telemetry_line, outputs=telemetry, show_progress="hidden", queue=False)
        gr.Markdown(policy.describe(), elem_id="serving")
        with gr.Row():  # model and method side by side
            model.layout(page)
            method.layout(page)
        for step in STEPS[2:]:
            step.layout(page)

        demo.load(lambda: gr.update(choices=device_choices()), None, page["device"], queue=False,
                  api_visibility="private")
        demo.load(method.pattern_changed, page.out(("pattern", "method")), page.out(("method", "widths")),
                  queue=False, api_visibility="private")  # the method choice narrowed to the pattern's methods
        demo.unload(close_session)
        for step in STEPS:
            step.wire(page)
    return demo
