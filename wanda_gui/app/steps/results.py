"""Step 4 · Results: what the run achieved per layer type, what pruning bought (parameters, the export's size, speed),
and perplexity and zero-shot accuracy of the dense and pruned models."""

from __future__ import annotations

import time

import gradio as gr

from ...core.copies import shared_bytes, tensor_bytes
from ...core.export import bought, zero_shot_note, zero_shot_table
from ...core.memory import format_bytes
from ...core.zeroshot import WANDA_TASKS, TaskSpec, ZeroShot, task_names
from ..common import (BUTTONS, STATUS_INTERVAL, WORK, Page, buttons, check_count, on_a_thread, served, session,
                      updates, user_errors)
from ..workspace import Workspace
from ...core.methods import OPTIONS

ON_DISK_NOTE = ("Parameters and speed are counted and measured on a model held in memory; this one is read block by "
                "block from disk. Zeros stored densely do not shrink the files or make a dense runtime faster.")
MEASURE_SPEED = "Measure speed: dense vs pruned"


def bought_markdown(ws: Workspace) -> str:
    """What pruning bought: parameters stored and non-zero, the export's size, and speed once measured."""
    if ws.counts is None:
        exported = f" The export's safetensors files take {format_bytes(ws.exported)}." if ws.exported else ""
        return f"#### What pruning bought\n\n{ON_DISK_NOTE}{exported}"
    lines = ["#### What pruning bought", "", *bought(ws.counts, ws.speed or None, ws.exported)]
    if not ws.speed:
        lines.append(f"Press **{MEASURE_SPEED}** to time both models' prefill and generation on the same device, "
                     "in one call.")
    return "\n".join(lines)


def span(values: list[int]) -> str:
    """'4' or '2-4': the kept widths of all blocks."""
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"


def results_markdown(ws: Workspace) -> str:
    s = ws.summary
    kinds = sorted(s.by_type)
    table = ("| layer type | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds) + "\n| sparsity | " +
             " | ".join(f"{s.by_type[k]:.2%}" for k in kinds) + " |")
    shared = ""
    if ws.offloaded:
        shared = (" Both models stay on disk (the model was loaded block by block): the pruned weights were written "
                  f"block by block as they were pruned, and only what lies outside the blocks "
                  f"({format_bytes(ws.loaded.lazy.resident_bytes())}) is held, once for both.")
    elif ws.dense_kept and ws.pruned is not None:
        own = tensor_bytes(ws.pruned) - shared_bytes(ws.pruned, ws.dense_model)
        shared = (f" The pruned copy adds {format_bytes(own)}: it shares the embeddings, norms and every untouched "
                  "tensor with the dense model.")
    dense = "kept for side-by-side chat" if ws.dense_kept else \
        "**not kept** (no memory for a copy: the model was pruned in place; reload it to chat with the dense model)"
    variant = " (α-variant)" if s.settings.get("wanda_variant") else ""
    variant += "".join(f" + {OPTIONS[key].label}" for key in s.settings.get("options", ()))
    if s.structure:
        blocks = s.structure["blocks"]
        heads = sorted({b["kept_heads"] for b in blocks})
        channels = sorted({b["kept_channels"] for b in blocks})
        return (f"**{s.method}{variant} · structured ({s.structure['widths']} widths)** · removed "
                f"**{s.achieved_sparsity:.2%}** of the block linears' weights in {s.seconds:.1f} s: "
                f"**{s.parameters_before:,} → {s.parameters_after:,} parameters**; blocks keep {span(heads)} of "
                f"{blocks[0]['total_heads']} heads and {span(channels)} of {blocks[0]['total_channels']} MLP channels. "
                f"Dense model: {dense}.\n\n{table}\n\nThe linears are really smaller: the pruned model is smaller and "
                f"faster on every runtime (the chat's tokens/s shows it). Export: {s.structure['export']}.\n\n"
                f"{bought_markdown(ws)}")
    return (f"**{s.method}{variant} · {s.pattern}** · target {s.target_sparsity:.1%} · achieved **{s.achieved_sparsity:.2%}** "
            f"over {s.pruned_parameters:,} weights in {s.seconds:.1f} s. Dense model: {dense}.{shared}\n\n{table}\n\n"
            f"{bought_markdown(ws)}")


def perplexity_markdown(ppl: dict) -> str:
    lines = ["| model | perplexity | windows |", "|---|---|---|"]
    for key in ("dense", "pruned"):
        if key in ppl:
            p = ppl[key]
            lines.append(f"| {key} | **{p.perplexity:.3f}** | {p.nwindows} x {p.seqlen} tokens, stride {p.stride} |")
    if "dense" in ppl:
        lines.append(f"\nPruned / dense: **{ppl['pruned'].perplexity / ppl['dense'].perplexity:.2f}x**. "
                     "Evaluation text: State of the Union speeches 2000-2026 (never used for calibration).")
    return "\n".join(lines)


EVAL_OUTPUTS = ("ppl_md", *BUTTONS)


def evaluate_failed(ws: Workspace, message: str):
    return updates(EVAL_OUTPUTS, ppl_md=f"✗ {message}", **buttons(ws))


@user_errors(evaluate_failed)
def evaluate(nwindows, request: gr.Request):
    """Measure on a worker thread, streaming windows done / total."""
    ws = session(request)
    nwindows = check_count(nwindows, "Windows")
    ws.require_pruned()
    yield updates(EVAL_OUTPUTS, ppl_md="… Measuring perplexity…", **buttons(ws, running=True))
    for message in on_a_thread(lambda report: ws.evaluate(nwindows, progress=lambda done, total: report((done, total)))):
        if isinstance(message, tuple):
            yield updates(EVAL_OUTPUTS, ppl_md=f"… Measuring perplexity: window {message[0]}/{message[1]}")
    yield updates(EVAL_OUTPUTS, ppl_md=perplexity_markdown(message.result), **buttons(ws))


SPEED_OUTPUTS = ("speed_md", "results", *BUTTONS)


def speed_failed(ws: Workspace, message: str):
    return updates(SPEED_OUTPUTS, speed_md=f"✗ {message}", **buttons(ws))


@user_errors(speed_failed)
def measure_speed(request: gr.Request):
    """Measure both models on a worker thread, counting generations done; the table above then shows the speeds."""
    ws = session(request)
    ws.require_pruned()
    yield updates(SPEED_OUTPUTS, speed_md="… Measuring speed…", **buttons(ws, running=True))
    for message in on_a_thread(lambda report: ws.measure_speed(progress=lambda done, total: report((done, total)))):
        if isinstance(message, tuple):
            done, total = message
            yield updates(SPEED_OUTPUTS, speed_md=f"… Measuring speed: generation {done}/{total} (the dense and the "
                                                  "pruned model in turns, after a warm-up each)")
    yield updates(SPEED_OUTPUTS, speed_md="✓ Speed measured: see the table above.", results=results_markdown(ws),
                  **buttons(ws))


def zero_shot_markdown(measured: dict[str, ZeroShot]) -> str:
    as_data = {name: result.as_dict() for name, result in measured.items()}
    return "\n".join([*zero_shot_table(as_data), "", zero_shot_note(as_data)])


ZERO_SHOT_OUTPUTS = ("zs_md", *BUTTONS)


def zero_shot_failed(ws: Workspace, message: str):
    return updates(ZERO_SHOT_OUTPUTS, zs_md=f"✗ {message}", **buttons(ws))


@user_errors(zero_shot_failed)
def zero_shot(zs_tasks, zs_dir, zs_limit, request: gr.Request):
    """Measure on a worker thread, the status line saying which model and task, and its requests done / total."""
    ws = session(request)
    limit = check_count(zs_limit, "Examples per task", minimum=0)
    spec = TaskSpec(task_names(zs_tasks or ""), served(request).policy.tasks_folder(zs_dir), limit or None)
    ws.require_pruned()
    yield updates(ZERO_SHOT_OUTPUTS, zs_md="… Reading the tasks' datasets…", **buttons(ws, running=True))
    shown = 0.0
    for message in on_a_thread(lambda report: ws.measure_zero_shot(spec, progress=lambda *where: report(where))):
        if isinstance(message, tuple) and time.perf_counter() - shown >= STATUS_INTERVAL:
            shown = time.perf_counter()
            yield updates(ZERO_SHOT_OUTPUTS, zs_md=f"… Zero-shot accuracy of the {message[0]} model: {message[1]}")
    yield updates(ZERO_SHOT_OUTPUTS, zs_md=zero_shot_markdown(message.result), **buttons(ws))


def layout(page: Page) -> None:
    with gr.Column(elem_classes="step"):
        gr.Markdown("### 4 · Results")
        page.add("results", gr.Markdown(elem_id="results"))
        with gr.Row():
            page.add("speed_btn", gr.Button(MEASURE_SPEED, interactive=False, scale=1, elem_id="measure-speed"))
            page.add("speed_md", gr.Markdown(elem_id="speed-status"))
        with gr.Row():
            page.add("nwindows", gr.Number(16, label="Evaluation windows (512 tokens each; P1 uses 64)", precision=0,
                                           minimum=1, elem_id="nwindows"))
            page.add("eval_btn", gr.Button("Measure perplexity: dense vs pruned", interactive=False, elem_id="eval"))
        page.add("ppl_md", gr.Markdown(elem_id="perplexity"))
        with gr.Row():
            page.add("zs_tasks", gr.Textbox(",".join(WANDA_TASKS), label="Zero-shot tasks (comma-separated)", scale=3,
                                            info="lm-evaluation-harness names, the Wanda paper's seven by default; "
                                                 "offline, their datasets must be in the local Hugging Face cache",
                                            elem_id="zs-tasks"))
            page.add("zs_dir", gr.Textbox(label="Your tasks folder (optional)", info="lm-eval task YAMLs", scale=3,
                                          placeholder="/path/to/tasks", visible=not page.policy.exposed,
                                          elem_id="zs-dir"))
            page.add("zs_limit", gr.Number(100, label="Examples per task (0: all)", precision=0, minimum=0, scale=1,
                                           elem_id="zs-limit"))
            page.add("zs_btn", gr.Button("Measure zero-shot accuracy: dense vs pruned", interactive=False, scale=2,
                                         elem_id="zero-shot"))
        page.add("zs_md", gr.Markdown(elem_id="zero-shot-status"))


def wire(page: Page) -> None:
    page.queued(page["eval_btn"].click, "ppl_md", "measure perplexity", evaluate, page.out(EVAL_OUTPUTS),
                api_name="evaluate", **WORK)
    page.queued(page["speed_btn"].click, "speed_md", "measure speed", measure_speed, page.out(SPEED_OUTPUTS),
                api_name="measure_speed", **WORK)
    page.queued(page["zs_btn"].click, "zs_md", "measure zero-shot accuracy", zero_shot, page.out(ZERO_SHOT_OUTPUTS),
                api_name="zero_shot", **WORK)
