"""The page: layout and event wiring. Every callback hands the work to the Workspace/core and formats the result."""

from __future__ import annotations

import functools
import html
import inspect
import queue
import tempfile
import threading
import time
import traceback
from pathlib import Path

import gradio as gr

from ..core.devices import format_bytes, list_devices, read_telemetry
from ..core.errors import UserError
from . import plots
from .workspace import Workspace

ASSETS = Path(__file__).resolve().parents[2] / "assets"
SOURCES = ["Built-in (SmolLM2-135M-Instruct)", "Local folder", "Hugging Face hub"]
PATTERNS = ["unstructured", "2:4", "4:8", "custom N:M"]
CALIBRATION = ["Built-in corpus (State of the Union, 1900-1999)", "Text files", "Hub dataset"]
EXAMPLES = ["What is the capital of France?", "Write a haiku about autumn leaves.",
            "Explain in two sentences why the sky is blue.", "List three uses of a paperclip."]
DRAW_INTERVAL = 0.25  # seconds between live heatmap updates
HONEST_NOTE = ("Zeros stored densely do not shrink the files or make a dense runtime faster. 2:4 can be accelerated on "
               "NVIDIA Ampere or newer GPUs with semi-structured sparse kernels (modest, shape-dependent gains); on a "
               "CPU, sparse matmul at 50% is slower than dense. What pruning shows here is how much of the model "
               "can be removed and what that costs in quality.")


def as_page_error(e: Exception) -> gr.Error:
    """UserError (and anything unexpected) as a readable message for the page, never a traceback."""
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, UserError):
        return gr.Error(str(e), title="Cannot do that", print_exception=False)
    traceback.print_exc()
    return gr.Error(f"Unexpected {type(e).__name__}: {e}. The app is still usable.", title="Something went wrong",
                    print_exception=False)


def user_errors(on_error=None):
    """Raise errors as gr.Error (a message box in the page); a streaming callback may first yield `on_error(ws,
    message)`, the outputs that put the message in its status line and set its buttons right again."""

    def decorate(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def generator(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:
                    error = as_page_error(e)
                    if on_error is not None:
                        yield on_error(args[0], error.message)
                    raise error from None
            return generator

        @functools.wraps(fn)
        def function(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise as_page_error(e) from None
        return function
    return decorate


def text_of(content) -> str:
    """A chat message's text, whether a string or Gradio's list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(text_of(c) for c in content or [])


def plain_history(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": text_of(m["content"])} for m in history or []]


# -- formatting -------------------------------------------------------------------------------------------------------

def model_card(info) -> str:
    rows = [("Architecture", f"{info.architecture} ({info.model_type})"), ("Parameters", f"{info.parameters / 1e6:,.1f} M"),
            ("Decoder blocks", info.blocks), ("Linears to prune", f"{info.linears} ({info.linear_parameters / 1e6:,.1f} M weights)"),
            ("Device / dtype", f"{info.device} / {info.dtype}"), ("Memory", format_bytes(info.memory_bytes)),
            ("Context", info.context_length or "?"), ("Chat template", "yes" if info.has_chat_template else "no")]
    lines = [f"| {k} | {v} |" for k, v in rows]
    return f"#### {html.escape(info.name)}\n\n" + "\n".join([lines[0], "|---|---|", *lines[1:]])


def telemetry_line() -> str:
    t = read_telemetry()
    parts = [f"CPU {t.cpu_percent:.0f}%", f"RAM {format_bytes(t.ram_used_bytes)} / {format_bytes(t.ram_total_bytes)}",
             f"app {format_bytes(t.process_rss_bytes)}"]
    parts += [f"GPU{g.index} {g.utilization_percent:.0f}% · {format_bytes(g.memory_used_bytes)} / "
              f"{format_bytes(g.memory_total_bytes)}" for g in t.gpus]
    return " · ".join(parts)


def device_choices() -> list[tuple[str, str]]:
    return [(f"{d.label} · {format_bytes(d.free_bytes)} free of {format_bytes(d.total_bytes)}", d.id) for d in list_devices()]


def results_markdown(ws: Workspace) -> str:
    s = ws.summary
    kinds = sorted(s.by_type)
    table = ("| layer type | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds) + "\n| sparsity | " +
             " | ".join(f"{s.by_type[k]:.2%}" for k in kinds) + " |")
    dense = "kept as a separate copy for side-by-side chat" if ws.dense_kept else \
        "**not kept** (no memory for a copy: the model was pruned in place; reload it to chat with the dense model)"
    return (f"**{s.method} · {s.pattern}** · target {s.target_sparsity:.1%} · achieved **{s.achieved_sparsity:.2%}** "
            f"over {s.pruned_parameters:,} weights in {s.seconds:.1f} s (peak memory {format_bytes(s.peak_memory_bytes)}). "
            f"Dense model: {dense}.\n\n{table}\n\n{HONEST_NOTE}")


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


# -- callbacks --------------------------------------------------------------------------------------------------------

def source_of(kind: str, folder: str, hub_id: str) -> str:
    if kind == SOURCES[0]:
        return "builtin"
    if kind == SOURCES[1]:
        if not (folder or "").strip():
            raise UserError("Type the path of a local model folder (it holds config.json, weights and tokenizer).")
        return folder.strip()
    if not (hub_id or "").strip():
        raise UserError("Type a hub id such as HuggingFaceTB/SmolLM2-360M-Instruct.")
    return hub_id.strip()


def load_failed(ws: Workspace, message: str):
    ready = gr.update(interactive=ws.loaded is not None and ws.dense_kept)
    pruned = gr.update(interactive=ws.pruned is not None)
    return f"✗ {message}", gr.update(), ready, pruned, pruned


@user_errors(load_failed)
def load(ws: Workspace, kind, folder, hub_id, revision, token, trust_remote_code, device, dtype):
    """Load on a worker thread so that progress messages stream into the status line."""
    source = source_of(kind, folder, hub_id)
    messages: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work():
        try:
            outcome["loaded"] = ws.load(source, device, None if dtype == "auto" else dtype, revision, token,
                                        trust_remote_code, progress=lambda m, f: messages.put(m + (f" {f:.0%}" if f else "")))
        except Exception as e:  # re-raised on the callback's thread below
            outcome["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield "… Loading…", gr.update(), gr.update(interactive=False), gr.update(interactive=False), gr.update(interactive=False)
    while thread.is_alive() or not messages.empty():
        try:
            yield f"… {messages.get(timeout=0.25)}", gr.update(), gr.update(), gr.update(), gr.update()
        except queue.Empty:
            pass
    if "error" in outcome:
        raise outcome["error"]
    info = outcome["loaded"].info
    yield (f"✓ Loaded {info.name} on {info.device} in {ws.timings['load']:.1f} s.", model_card(info),
           gr.update(interactive=True), gr.update(interactive=False), gr.update(interactive=False))


def globs(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in (text or "").replace(",", " ").split() if g.strip())


def prune_config(method, sparsity, pattern_choice, custom_nm, include, exclude, prune_head, batch_size):
    from ..core.engine import PruneConfig

    return PruneConfig(method=method, sparsity=sparsity, pattern=custom_nm if pattern_choice == "custom N:M" else pattern_choice,
                       include=globs(include), exclude=globs(exclude), prune_head=bool(prune_head),
                       batch_size=check_count(batch_size, "Batch size", 0) or None)


def calibration_source(kind, files, dataset):
    if kind == CALIBRATION[0]:
        return "builtin"
    if kind == CALIBRATION[1]:
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        if not paths:
            raise UserError("Upload one or more .txt files for calibration, or pick the built-in corpus.")
        return paths
    if not (dataset or "").strip():
        raise UserError("Type a hub dataset: wikitext2, c4, or NAME[:CONFIG].")
    return "hf:" + dataset.strip()


def check_count(value, name: str, minimum: int = 1) -> int:
    if value is None or int(value) != value or value < minimum:
        raise UserError(f"{name} must be a whole number of at least {minimum}; got {value!r}.")
    return int(value)


@user_errors()
def estimate_text(ws: Workspace, method, nsamples, seqlen):
    from ..core.estimate import estimate

    if ws.loaded is None:
        return "Load a model to see an estimate."
    e = estimate(ws.loaded.info, method.lower(), check_count(nsamples, "Samples"), check_count(seqlen, "Sequence length", 2),
                 ws.copy_fits())
    return f"Estimate on {ws.loaded.info.device}: {e}."


def prune_failed(ws: Workspace, message: str):
    pruned = gr.update(interactive=ws.pruned is not None)
    return (f"✗ {message}", gr.update(), gr.update(), gr.update(), gr.update(), pruned, pruned, pruned,
            gr.update(interactive=False))


@user_errors(prune_failed)
def prune(ws: Workspace, method, sparsity, pattern_choice, custom_nm, calib_kind, files, dataset, nsamples, seqlen, seed,
          include, exclude, prune_head, batch_size):
    from ..core import events as ev

    ws.require_model()
    config = prune_config(method, sparsity, pattern_choice, custom_nm, include, exclude, prune_head, batch_size)
    source = calibration_source(calib_kind, files, dataset)
    nsamples, seqlen = check_count(nsamples, "Samples"), check_count(seqlen, "Sequence length", 2)
    seed = check_count(seed, "Seed", 0)
    no_change = gr.update()
    locked = gr.update(interactive=False)
    yield ("… Drawing calibration windows…", no_change, no_change, gr.update(choices=[], value=None), "",
           locked, locked, locked, no_change)  # Stop opens with the run itself, once it can take effect
    sparsity_by_block, seconds_by_block = {}, {}
    blocks, target, started, heatmap, last_drawn = 1, None, time.perf_counter(), no_change, 0.0
    for event in ws.prune(config, source, nsamples, seqlen, seed):
        if isinstance(event, ev.RunStarted):
            blocks, target, started = len(event.blocks), event.target_sparsity, time.perf_counter()
            status = f"… {event.method} · {event.pattern} · {event.total_linears} linears in {blocks} blocks"
            yield (status, plots.block_chart(blocks, {}, {}, target), no_change, no_change, "", locked, locked,
                   locked, gr.update(interactive=True))
        elif isinstance(event, ev.LinearPruned):
            if time.perf_counter() - last_drawn < DRAW_INTERVAL and event.done < event.total:
                continue  # drawing every linear would slow a fast run down; the picker shows them all afterwards
            last_drawn = time.perf_counter()
            elapsed = time.perf_counter() - started
            eta = elapsed / event.done * (event.total - event.done)
            status = (f"… block {event.block + 1}/{blocks} · linear {event.done}/{event.total} "
                      f"({event.done / event.total:.0%}) · {elapsed:.0f} s elapsed · ETA {eta:.0f} s")
            heatmap = plots.layer_maps(event.name, event.shape, event.sparsity, event.score_map, event.mask_map)
            yield status, no_change, heatmap, no_change, "", locked, locked, locked, no_change
        elif isinstance(event, ev.BlockFinished):
            sparsity_by_block[event.index] = event.sparsity
            seconds_by_block[event.index] = event.seconds
            yield (no_change, plots.block_chart(blocks, sparsity_by_block, seconds_by_block, target), no_change,
                   no_change, "", locked, locked, locked, no_change)
        elif isinstance(event, ev.RunFinished):
            names = list(ws.maps)
            yield (f"✓ Pruned in {event.summary.seconds:.1f} s: achieved sparsity {event.summary.achieved_sparsity:.2%}.",
                   plots.block_chart(blocks, sparsity_by_block, seconds_by_block, target), heatmap,
                   gr.update(choices=names, value=names[-1]), results_markdown(ws),
                   gr.update(interactive=True), gr.update(interactive=True), gr.update(interactive=True),
                   gr.update(interactive=False))
        elif isinstance(event, ev.RunCancelled):
            yield ("■ Stopped. " + ("The dense weights were restored." if event.restored else
                                    "The dense model was never touched (the pruned copy was discarded)."),
                   no_change, no_change, no_change, "", locked, locked, locked, gr.update(interactive=False))
        elif isinstance(event, ev.RunFailed):
            raise UserError(f"Pruning failed{f' at {event.layer}' if event.layer else ''}: {event.reason}. "
                            "The dense model is intact.")


def stop_pruning(ws: Workspace):
    """Ask the run to stop; its own stream then says what became of the model (no race with that message)."""
    ws.cancel.set()
    return gr.update(interactive=False)


@user_errors()
def show_layer(ws: Workspace, name):
    if not name or name not in ws.maps:
        return plots.empty("Pick a pruned linear")
    m = ws.maps[name]
    return plots.layer_maps(name, m.shape, m.sparsity, m.score_map, m.mask_map)


@user_errors()
def evaluate(ws: Workspace, nwindows):
    ppl = ws.evaluate(check_count(nwindows, "Windows"))
    return perplexity_markdown(ppl)


@user_errors()
def chat(ws: Workspace, prompt, dense_history, pruned_history, max_new_tokens, greedy, temperature, top_p, seed):
    """Send one prompt to both models and stream both replies at once, round-robin on this thread."""
    from ..core.generation import GenerationSettings, StreamingGeneration

    if not (prompt or "").strip():
        raise UserError("Type a prompt first.")
    loaded = ws.require_model()
    pruned = ws.require_pruned()
    settings = GenerationSettings(check_count(max_new_tokens, "Max new tokens"), bool(greedy), float(temperature),
                                  float(top_p), check_count(seed, "Seed", 0))
    ws.stop_chat.clear()
    columns = [(dense_history or [], ws.dense_model), (pruned_history or [], pruned)]
    runs, histories = [], []
    for history, model in columns:
        history = plain_history(history) + [{"role": "user", "content": prompt}]
        runs.append(StreamingGeneration(model, loaded.tokenizer, history, settings, ws.stop_chat) if model is not None else None)
        histories.append(history + [{"role": "assistant", "content": "" if model is not None else
                                     "(The dense model was not kept: no memory for a copy. Reload to chat with it.)"}])
    try:
        while True:
            changed = False
            for run, history in zip(runs, histories):
                if run is not None and run.poll():
                    history[-1]["content"] = run.text + (f"\n\n⚠ {run.error}" if run.error else "")
                    changed = True
            stats = [run.stats() if run is not None else "" for run in runs]
            if changed:
                yield "", histories[0], histories[1], stats[0], stats[1]
            if all(run is None or run.done for run in runs):
                break
            time.sleep(0.03)
        yield "", histories[0], histories[1], *[run.stats() if run is not None else "" for run in runs]
    finally:
        ws.stop_chat.set()  # a Stop, a closed tab or an error ends both generations
        for run in runs:
            if run is not None:
                run.join(timeout=5)


def stop_chat(ws: Workspace):
    ws.stop_chat.set()


@user_errors()
def export(ws: Workspace, folder, overwrite):
    import json

    out = ws.export(folder, bool(overwrite))
    report = Path(tempfile.mkdtemp(prefix="wanda-report-")) / "pruning_report.json"
    report.write_text(json.dumps(ws.report(), indent=2))
    return f"✓ Exported to `{out}` (safetensors, tokenizer, README, pruning_report.json).", gr.update(value=str(report), visible=True)


# -- layout -----------------------------------------------------------------------------------------------------------

def header() -> str:
    logo = (ASSETS / "logo.svg").read_text()
    return (f"<div id='brand'>{logo}<div><h1>wanda_gui</h1><p>Prune an LLM by weights and activations "
            "(<a href='https://arxiv.org/abs/2306.11695' target='_blank'>Sun et al. 2023</a>), watch it happen, "
            "and chat with the pruned and dense models side by side.</p></div></div>")


def build() -> gr.Blocks:
    with gr.Blocks(title="wanda_gui: prune LLMs with Wanda") as demo:
        ws = gr.State(Workspace, delete_callback=lambda w: w.stop())
        with gr.Row(equal_height=True):
            gr.HTML(header())
        telemetry = gr.Markdown(telemetry_line(), elem_id="telemetry")
        gr.Timer(1.0).tick(telemetry_line, outputs=telemetry, show_progress="hidden", queue=False)

        with gr.Row():
            with gr.Column(scale=1, elem_classes="step"):
                gr.Markdown("### 1 · Model")
                source_kind = gr.Radio(SOURCES, value=SOURCES[0], label="Source", elem_id="source")
                folder = gr.Textbox(label="Local folder", placeholder="/path/to/model (config.json + weights + tokenizer)",
                                    visible=False, elem_id="folder")
                with gr.Row(visible=False) as hub_row:
                    hub_id = gr.Textbox(label="Hub id", placeholder="org/name", elem_id="hub-id", scale=3)
                    revision = gr.Textbox(label="Revision", placeholder="main", scale=1)
                with gr.Row(visible=False) as hub_row2:
                    token = gr.Textbox(label="Token (gated/private models)", type="password", scale=3)
                    trust = gr.Checkbox(label="Trust remote code", value=False, scale=1)
                with gr.Row():
                    choices = device_choices()
                    device = gr.Dropdown(choices, value=choices[0][1], label="Device", elem_id="device", scale=3)
                    dtype = gr.Dropdown(["auto", "fp32", "bf16", "fp16"], value="auto", label="dtype", scale=1,
                                        info="auto: fp32 on CPU, bf16 on GPU")
                load_btn = gr.Button("Load model", variant="primary", elem_id="load")
                load_status = gr.Markdown("Pick a model and press Load.", elem_id="load-status")
                card = gr.Markdown(elem_id="model-card")

            with gr.Column(scale=1, elem_classes="step"):
                gr.Markdown("### 2 · Prune")
                with gr.Row():
                    method = gr.Radio(["Wanda", "Magnitude"], value="Wanda", label="Method", elem_id="method")
                    pattern = gr.Radio(PATTERNS, value="unstructured", label="Pattern", elem_id="pattern")
                custom_nm = gr.Textbox(label="Custom N:M", value="1:4", visible=False, elem_id="custom-nm")
                sparsity = gr.Slider(0.0, 0.95, value=0.5, step=0.05, label="Sparsity (unstructured)",
                                     info="Fraction of each output row set to zero. N:M patterns zero 1 - N/M.",
                                     elem_id="sparsity")
                calib_kind = gr.Radio(CALIBRATION, value=CALIBRATION[0], label="Calibration data", elem_id="calib")
                files = gr.File(label="Text files", file_count="multiple", file_types=[".txt"], visible=False,
                                elem_id="calib-files")
                dataset = gr.Textbox(label="Hub dataset", placeholder="wikitext2, c4, or NAME[:CONFIG]", visible=False)
                with gr.Row():
                    nsamples = gr.Number(64, label="Samples", precision=0, minimum=1, elem_id="nsamples")
                    seqlen = gr.Number(512, label="Sequence length", precision=0, minimum=2, elem_id="seqlen")
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        include = gr.Textbox(label="Only linears matching", placeholder="e.g. *.mlp.*  (globs on names)")
                        exclude = gr.Textbox(label="Skip linears matching", placeholder="e.g. *down_proj")
                    with gr.Row():
                        prune_head = gr.Checkbox(label="Also prune the LM head (tied models: the embeddings too)",
                                                 value=False)
                        batch_size = gr.Number(0, label="Batch (windows per forward; 0 = auto)", precision=0, minimum=0)
                estimate = gr.Markdown("Load a model to see an estimate.", elem_id="estimate")
                with gr.Row():
                    start_btn = gr.Button("Start pruning", variant="primary", interactive=False, elem_id="start")
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")

        with gr.Column(elem_classes="step"):
            gr.Markdown("### 3 · Live")
            prune_status = gr.Markdown("Load a model, then start pruning.", elem_id="prune-status")
            with gr.Row():
                block_plot = gr.Plot(plots.block_chart(1, {}, {}, None), label="Blocks", elem_id="block-plot")
                map_plot = gr.Plot(plots.empty("Score and mask maps appear as each linear is pruned"), label="Maps",
                                   elem_id="map-plot")
            layer_pick = gr.Dropdown([], label="Look at any pruned linear", interactive=True, elem_id="layer-pick")

        with gr.Column(elem_classes="step"):
            gr.Markdown("### 4 · Results")
            results = gr.Markdown(elem_id="results")
            with gr.Row():
                nwindows = gr.Number(16, label="Evaluation windows (512 tokens each; P1 uses 64)", precision=0, minimum=1,
                                     elem_id="nwindows")
                eval_btn = gr.Button("Measure perplexity: dense vs pruned", interactive=False, elem_id="eval")
            ppl_md = gr.Markdown(elem_id="perplexity")

        with gr.Column(elem_classes="step"):
            gr.Markdown("### 5 · Chat side by side")
            with gr.Row():
                with gr.Column():
                    dense_chat = gr.Chatbot(label="Dense", height=380, buttons=["copy"], elem_id="dense-chat",
                                            placeholder="The original model answers here.")
                    dense_stats = gr.Markdown(elem_id="dense-stats")
                with gr.Column():
                    pruned_chat = gr.Chatbot(label="Pruned", height=380, buttons=["copy"], elem_id="pruned-chat",
                                             placeholder="The pruned model answers here.")
                    pruned_stats = gr.Markdown(elem_id="pruned-stats")
            with gr.Row():
                prompt = gr.Textbox(show_label=False, placeholder="Ask both models something (after pruning)…",
                                    scale=6, elem_id="prompt")
                send_btn = gr.Button("Send", variant="primary", interactive=False, scale=1, elem_id="send")
                chat_stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
                clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
            gr.Examples(EXAMPLES, inputs=prompt, label="Example prompts")
            with gr.Accordion("Generation settings (shared by both columns)", open=False):
                with gr.Row():
                    max_new = gr.Slider(1, 512, value=128, step=1, label="Max new tokens")
                    greedy = gr.Checkbox(value=True, label="Greedy (deterministic)")
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                    chat_seed = gr.Number(0, label="Seed", precision=0, minimum=0)

        with gr.Column(elem_classes="step"):
            gr.Markdown("### 6 · Export")
            with gr.Row():
                export_dir = gr.Textbox(label="Target folder", value=str(Path.cwd() / "exports" / "pruned-model"),
                                        scale=4, elem_id="export-dir")
                overwrite = gr.Checkbox(label="Overwrite a non-empty folder (its contents are replaced)", value=False,
                                        scale=2, elem_id="overwrite")
                export_btn = gr.Button("Export", variant="primary", interactive=False, scale=1, elem_id="export")
            export_status = gr.Markdown(elem_id="export-status")
            report_file = gr.File(label="pruning_report.json", visible=False, elem_id="report-file")

        # -- wiring
        demo.load(lambda: gr.update(choices=device_choices()), None, device, queue=False, api_visibility="private")
        def show_source(kind):
            return (gr.update(visible=kind == SOURCES[1]), gr.update(visible=kind == SOURCES[2]),
                    gr.update(visible=kind == SOURCES[2]))

        source_kind.change(show_source, source_kind, [folder, hub_row, hub_row2], queue=False, api_visibility="private")
        pattern.change(lambda p: (gr.update(visible=p == "custom N:M"), gr.update(interactive=p == "unstructured")),
                       pattern, [custom_nm, sparsity], queue=False, api_visibility="private")
        calib_kind.change(lambda k: (gr.update(visible=k == CALIBRATION[1]), gr.update(visible=k == CALIBRATION[2])),
                          calib_kind, [files, dataset], queue=False, api_visibility="private")

        device_bound = dict(concurrency_id="device", concurrency_limit=1)
        load_event = load_btn.click(load, [ws, source_kind, folder, hub_id, revision, token, trust, device, dtype],
                                    [load_status, card, start_btn, send_btn, export_btn], api_name="load",
                                    show_progress="hidden", **device_bound)
        estimate_inputs = [ws, method, nsamples, seqlen]
        load_event.then(estimate_text, estimate_inputs, estimate, api_visibility="private")
        for component in (method, nsamples, seqlen):
            component.change(estimate_text, estimate_inputs, estimate, api_visibility="private")

        prune_event = start_btn.click(
            prune, [ws, method, sparsity, pattern, custom_nm, calib_kind, files, dataset, nsamples, seqlen, seed,
                    include, exclude, prune_head, batch_size],
            [prune_status, block_plot, map_plot, layer_pick, results, send_btn, export_btn, eval_btn, stop_btn],
            api_name="prune", show_progress="hidden", **device_bound)
        prune_event.then(lambda: gr.update(interactive=False), None, stop_btn, api_visibility="private")
        stop_btn.click(stop_pruning, ws, stop_btn, api_name="stop", queue=False)
        layer_pick.change(show_layer, [ws, layer_pick], map_plot, api_name="show_layer")
        eval_btn.click(evaluate, [ws, nwindows], ppl_md, api_name="evaluate", show_progress_on=[ppl_md], **device_bound)

        chat_inputs = [ws, prompt, dense_chat, pruned_chat, max_new, greedy, temperature, top_p, chat_seed]
        chat_outputs = [prompt, dense_chat, pruned_chat, dense_stats, pruned_stats]
        send_event = send_btn.click(chat, chat_inputs, chat_outputs, api_name="chat", show_progress="hidden", **device_bound)
        submit_event = prompt.submit(chat, chat_inputs, chat_outputs, api_visibility="private", show_progress="hidden",
                                     **device_bound)
        chat_stop.click(stop_chat, ws, None, cancels=[send_event, submit_event], api_name="stop_chat", queue=False)
        clear_btn.click(lambda: ([], [], "", ""), None, [dense_chat, pruned_chat, dense_stats, pruned_stats],
                        api_name="clear", queue=False)
        export_btn.click(export, [ws, export_dir, overwrite], [export_status, report_file], api_name="export",
                         **device_bound)
    return demo
