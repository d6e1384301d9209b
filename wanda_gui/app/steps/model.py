"""Step 1 · Model: where it comes from (built-in, a folder, the hub), device and dtype, and the model's card."""

from __future__ import annotations

import functools
import html

import gradio as gr

from ...core.devices import list_devices
from ...core.memory import format_bytes
from ..common import (AFTER_RUN, BUTTONS, COMPARE_VIEW, RUN_VIEW, WORK, Page, buttons, cleared, on_a_thread, served, session, updates,
                      user_errors)
from ...core.runs import MEMORY_MODES
from ..policy import VisitorSource, ServePolicy
from ..workspace import Workspace

SOURCES = ["Built-in (SmolLM2-135M-Instruct)", "Local folder", "Hugging Face hub"]


def model_card(info) -> str:
    rows = [("Architecture", f"{info.architecture} ({info.model_type})"), ("Parameters", f"{info.parameters / 1e6:,.1f} M"),
            ("Decoder blocks", info.blocks), ("Linears to prune", f"{info.linears} ({info.linear_parameters / 1e6:,.1f} M weights)"),
            ("Device / dtype", f"{info.device} / {info.dtype}"), ("Memory", format_bytes(info.memory_bytes)),
            ("Context", info.context_length or "?"), ("Chat template", "yes" if info.has_chat_template else "no")]
    lines = [f"| {k} | {v} |" for k, v in rows]
    return f"#### {html.escape(info.name)}\n\n" + "\n".join([lines[0], "|---|---|", *lines[1:]])


def device_choices() -> list[tuple[str, str]]:
    return [(f"{d.label} · {format_bytes(d.free_bytes)} free of {format_bytes(d.total_bytes)}", d.id) for d in list_devices()]


def source_of(policy: ServePolicy, kind: str, folder: str, hub_id: str) -> VisitorSource:
    return policy.model_source({SOURCES[0]: "builtin", SOURCES[1]: "folder"}.get(kind, "hub"), folder or "",
                               hub_id or "")


LOAD_OUTPUTS = ("load_status", "card", *BUTTONS, *RUN_VIEW, *AFTER_RUN, *COMPARE_VIEW, "compare_status")


def load_failed(ws: Workspace, message: str):
    return updates(LOAD_OUTPUTS, load_status=f"✗ {message}", **buttons(ws))


@user_errors(load_failed)
def load(source_kind, folder, hub_id, revision, token, trust, device, dtype, memory="auto", budget="",
         request: gr.Request = None):
    """Load on a worker thread so that progress messages stream into the status line."""
    ws = session(request)
    policy = served(request).policy
    source, hub_only = source_of(policy, source_kind, folder, hub_id)
    trust = policy.remote_code(bool(trust))
    ws.check_idle()
    yield updates(LOAD_OUTPUTS, load_status="… Loading…", card="", compare_status="", **buttons(ws, running=True),
                  **cleared(RUN_VIEW, AFTER_RUN, COMPARE_VIEW))
    work = functools.partial(ws.load, source, device, None if dtype == "auto" else dtype, revision, token, trust,
                             memory=memory, budget=budget, hub_only=hub_only)
    for message in on_a_thread(lambda report: work(progress=lambda m, f: report(m + (f" {f:.0%}" if f else "")))):
        if isinstance(message, str):
            yield updates(LOAD_OUTPUTS, load_status=f"… {policy.shown(message)}")
    loaded = message.result
    info = loaded.info
    shared = ws.pool.holders(loaded) - 1
    note = f" Shared read-only with {shared} other session(s)." if shared > 0 else ""
    if ws.offloaded:
        lazy = loaded.lazy
        note += (f" Kept on disk, read block by block: {format_bytes(lazy.resident_bytes())} outside the blocks is held "
                 f"(shared by the dense and the pruned model), and one block of {format_bytes(lazy.block_bytes())} at "
                 "a time. Chat reads every block from disk for each token, so it is slow.")
    elif memory == "auto":
        note += " Held whole in memory: it fits, with its pruned copy."
    yield updates(LOAD_OUTPUTS, load_status=f"✓ Loaded {info.name} on {info.device} in {ws.timings['load']:.1f} s.{note}",
                  card=model_card(info), **buttons(ws))


def layout(page: Page) -> None:
    policy = page.policy
    folders = not policy.exposed or policy.models_dir is not None
    with gr.Column(scale=1, elem_classes="step"):
        gr.Markdown("### 1 · Model")
        page.add("source_kind", gr.Radio(SOURCES if folders else [SOURCES[0], SOURCES[2]], value=SOURCES[0],
                                         label="Source", elem_id="source"))
        page.add("folder", gr.Textbox(label="Local folder" if not policy.exposed else
                                      f"Model folder (under {policy.models_dir.name}/)" if policy.models_dir else
                                      "Local folder",
                                      placeholder="/path/to/model (config.json + weights + tokenizer)"
                                      if not policy.exposed else "a folder name", visible=False, elem_id="folder"))
        with page.add("hub_row", gr.Row(visible=False)):
            page.add("hub_id", gr.Textbox(label="Hub id", placeholder="org/name", elem_id="hub-id", scale=3))
            page.add("revision", gr.Textbox(label="Revision", placeholder="main", scale=1))
        with page.add("hub_row2", gr.Row(visible=False)):
            page.add("token", gr.Textbox(label="Token (gated/private models)", type="password", scale=3))
            page.add("trust", gr.Checkbox(label="Trust remote code (runs the model's own Python)", value=False,
                                          scale=1, visible=policy.allow_remote_code))
        with gr.Row():
            choices = device_choices()
            page.add("device", gr.Dropdown(choices, value=choices[0][1], label="Device", elem_id="device", scale=3))
            page.add("dtype", gr.Dropdown(["auto", "fp32", "bf16", "fp16"], value="auto", label="dtype", scale=1,
                                          info="auto: fp32 on CPU, bf16 on GPU"))
        with gr.Row():
            page.add("memory", gr.Dropdown([(label, key) for key, label in MEMORY_MODES.items()], value="auto",
                                           label="Memory", elem_id="memory", scale=3,
                                           info="On disk: models bigger than memory; each block is read as it is needed"))
            page.add("budget", gr.Textbox("", label="Memory budget", placeholder="e.g. 3GiB (empty: what is free)",
                                          elem_id="budget", scale=1))
        page.add("load_btn", gr.Button("Load model", variant="primary", elem_id="load"))
        page.add("load_status", gr.Markdown("Pick a model and press Load.", elem_id="load-status"))
        page.add("card", gr.Markdown(elem_id="model-card"))


def show_source(kind):
    return (gr.update(visible=kind == SOURCES[1]), gr.update(visible=kind == SOURCES[2]),
            gr.update(visible=kind == SOURCES[2]))


def wire(page: Page) -> None:
    page["source_kind"].change(show_source, page["source_kind"], page.out(("folder", "hub_row", "hub_row2")),
                               queue=False, api_visibility="private")
    page.events["load"] = page.queued(page["load_btn"].click, "load_status", "load the model", load,
                                      page.out(LOAD_OUTPUTS), api_name="load", **WORK)
