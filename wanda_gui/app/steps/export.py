"""Step 6 · Export: the pruned model as safetensors with its tokenizer, README and pruning_report.json."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr

from ..common import WORK, Page, served, session, updates, user_errors
from ..workspace import Workspace
from .results import results_markdown

EXPORT_OUTPUTS = ("export_status", "report_file", "results")  # the results show the export's size
OVERWRITE_CONTROL = "the 'Replace a previous export' box"


def export_failed(ws: Workspace, message: str):
    return updates(EXPORT_OUTPUTS, export_status=f"✗ {message}", report_file=gr.update(value=None, visible=False))


@user_errors(export_failed)
def export(export_dir, overwrite, request: gr.Request):
    ws = session(request)
    policy = served(request).policy
    target = policy.export_target(export_dir or "")
    yield updates(EXPORT_OUTPUTS, export_status=f"… Exporting to `{policy.shown(str(target))}`…")
    out = ws.export(target, bool(overwrite), OVERWRITE_CONTROL, list_contents=not policy.exposed)
    report = Path(tempfile.mkdtemp(prefix="report-", dir=policy.files_dir)) / "pruning_report.json"
    report.write_text(json.dumps(ws.report(), indent=2))
    yield updates(EXPORT_OUTPUTS, export_status=f"✓ Exported to `{policy.shown(str(out))}` (safetensors, tokenizer, "
                                                "README, pruning_report.json).",
                  report_file=gr.update(value=str(report), visible=True), results=results_markdown(ws))


def layout(page: Page) -> None:
    policy = page.policy
    with gr.Column(elem_classes="step"):
        gr.Markdown("### 6 · Export")
        with gr.Row():
            page.add("export_dir", gr.Textbox(label="Export name (under the server's exports folder)" if policy.exposed
                                              else "Target folder",
                                              value="pruned-model" if policy.exposed else
                                              str(Path("exports") / "pruned-model"), scale=4, elem_id="export-dir"))
            page.add("overwrite", gr.Checkbox(label="Replace a previous export (only a folder this app exported)",
                                              value=False, scale=2, elem_id="overwrite"))
            page.add("export_btn", gr.Button("Export", variant="primary", interactive=False, scale=1,
                                             elem_id="export"))
        page.add("export_status", gr.Markdown(elem_id="export-status"))
        page.add("report_file", gr.File(label="pruning_report.json", visible=False, elem_id="report-file"))


def wire(page: Page) -> None:
    page.queued(page["export_btn"].click, "export_status", "export", export, page.out(EXPORT_OUTPUTS),
                api_name="export", **WORK)
