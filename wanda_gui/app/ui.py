"""The page: layout and event wiring. Every callback hands the work to the Workspace/core and formats the result."""

from __future__ import annotations

import dataclasses
import functools
import html
import inspect
import queue
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Iterator

import gradio as gr

from ..core.devices import format_bytes, list_devices, read_telemetry
from ..core.errors import UserError
from . import plots
from .policy import ServePolicy
from .sessions import ModelPool, Sessions
from .workspace import Workspace

ASSETS = Path(__file__).resolve().parents[2] / "assets"
METHOD_NAMES = {"Wanda": "wanda", "Magnitude": "magnitude", "SparseGPT": "sparsegpt", "RIA": "ria"}
OPTION_NAMES = {"OWL": "owl", "DSnoT": "dsnot", "Block reconstruction": "reconstruct"}  # PruneConfig's fields
OPTIONS_NOTE = ("**OWL** (Yin et al. 2024): blocks whose scores hold more outliers keep more weights, the mean staying "
                "at the target (unstructured only). **DSnoT** (Zhang et al. 2024): swaps pruned and kept weights of "
                "each row while that lowers its expected reconstruction error. **Block reconstruction** (the regional "
                "optimisation of Wanda++, Yang et al. 2025): a few epochs of Adam fit each pruned block's kept weights "
                "to the dense block's outputs; several times slower on a CPU.")
SOURCES = ["Built-in (SmolLM2-135M-Instruct)", "Local folder", "Hugging Face hub"]
PATTERNS = ["unstructured", "2:4", "4:8", "custom N:M"]
CALIBRATION = ["Built-in corpus (State of the Union, 1900-1999)", "Text files", "Hub dataset"]
EXAMPLES = ["What is the capital of France?", "Write a haiku about autumn leaves.",
            "Explain in two sentences why the sky is blue.", "List three uses of a paperclip."]
WHY_EMPTY = "Why it works: input-feature norms and Wanda vs magnitude, as each linear is pruned"
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
    """Raise errors as gr.Error (a message box in the page); a callback may first yield (or return) `on_error(ws,
    message)`, the outputs that put the message in its status line and set its buttons right again. The session's
    Workspace is found from the gr.Request every callback takes last."""

    def decorate(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def generator(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:
                    error = as_page_error(e)
                    if on_error is not None:
                        yield on_error(session(args[-1]), error.message)
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


def served(request: gr.Request) -> gr.Blocks:
    """The app a request came to, holding its serving policy and its sessions (tests run several apps per process)."""
    return request.request.app.get_blocks()


def session(request: gr.Request) -> Workspace:
    return served(request).sessions.get(request.session_hash)


def close_session(request: gr.Request) -> None:
    """The tab closed (or an API client disconnected): free its models now, not in an hour."""
    served(request).sessions.close(request.session_hash)


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
    shared = ""
    if ws.dense_kept and ws.pruned is not None:
        from ..core.copies import shared_bytes, tensor_bytes

        own = tensor_bytes(ws.pruned) - shared_bytes(ws.pruned, ws.dense_model)
        shared = (f" The pruned copy adds {format_bytes(own)}: it shares the embeddings, norms and every untouched "
                  "tensor with the dense model.")
    dense = "kept for side-by-side chat" if ws.dense_kept else \
        "**not kept** (no memory for a copy: the model was pruned in place; reload it to chat with the dense model)"
    variant = " (α-variant)" if s.settings.get("wanda_variant") else ""
    variant += "".join(f" + {label}" for label, field in OPTION_NAMES.items() if s.settings.get(field))
    return (f"**{s.method}{variant} · {s.pattern}** · target {s.target_sparsity:.1%} · achieved **{s.achieved_sparsity:.2%}** "
            f"over {s.pruned_parameters:,} weights in {s.seconds:.1f} s. Dense model: {dense}.{shared}\n\n{table}\n\n"
            f"{HONEST_NOTE}")


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
# Each callback names its outputs; build() maps the names to components, so a callback returns only what it changes.

BUTTONS = ("load_btn", "start_btn", "send_btn", "export_btn", "eval_btn", "stop_btn")
AFTER_RUN = ("ppl_md", "dense_chat", "pruned_chat", "dense_stats", "pruned_stats", "chat_status", "export_status",
             "report_file")  # what a run produces after pruning: cleared when a new model or run starts
RUN_VIEW = ("block_plot", "map_plot", "layer_pick", "results", "why_plot")


def updates(names: tuple[str, ...], **values) -> tuple:
    """Positional outputs for `names`, `gr.update()` (no change) where no value is given."""
    return tuple(values.get(name, gr.update()) for name in names)


def buttons(ws: Workspace, running: bool = False, can_stop: bool = False) -> dict:
    """Which buttons a user may press now: nothing that would disturb a run while it runs."""
    pruned = not running and ws.pruned is not None
    return dict(load_btn=gr.update(interactive=not running),
                start_btn=gr.update(interactive=not running and ws.loaded is not None and ws.dense_kept),
                send_btn=gr.update(interactive=pruned), export_btn=gr.update(interactive=pruned),
                eval_btn=gr.update(interactive=pruned), stop_btn=gr.update(interactive=running and can_stop))


def cleared(*groups: tuple[str, ...]) -> dict:
    """Empty values for everything a previous model or run left on the page."""
    empty = dict(block_plot=plots.block_chart(1, {}, {}, None),
                 map_plot=plots.empty("Score and mask maps appear as each linear is pruned"),
                 why_plot=plots.empty(WHY_EMPTY),
                 layer_pick=gr.update(choices=[], value=None), results="", ppl_md="", dense_chat=[], pruned_chat=[],
                 dense_stats="", pruned_stats="", chat_status="", export_status="",
                 report_file=gr.update(value=None, visible=False))
    return {name: empty[name] for group in groups for name in group}


def source_of(policy: ServePolicy, kind: str, folder: str, hub_id: str) -> str:
    return policy.model_source({SOURCES[0]: "builtin", SOURCES[1]: "folder"}.get(kind, "hub"), folder or "",
                               hub_id or "")


@dataclasses.dataclass
class Finished:
    result: object


def on_a_thread(work) -> Iterator:
    """Run work(report) on a worker thread; yield whatever it reports as it goes, then Finished(its result). Its
    error is raised here, on the callback's thread, so that the page shows it."""
    messages: queue.Queue = queue.Queue()
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = work(messages.put)
        except Exception as e:  # re-raised below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive() or not messages.empty():
        try:
            yield messages.get(timeout=0.25)
        except queue.Empty:
            pass
    if "error" in outcome:
        raise outcome["error"]
    yield Finished(outcome["result"])


LOAD_OUTPUTS = ("load_status", "card", *BUTTONS, *RUN_VIEW, *AFTER_RUN)


def load_failed(ws: Workspace, message: str):
    return updates(LOAD_OUTPUTS, load_status=f"✗ {message}", **buttons(ws))


@user_errors(load_failed)
def load(kind, folder, hub_id, revision, token, trust_remote_code, device, dtype, request: gr.Request):
    """Load on a worker thread so that progress messages stream into the status line."""
    ws = session(request)
    policy = served(request).policy
    source = source_of(policy, kind, folder, hub_id)
    trust = policy.remote_code(bool(trust_remote_code))
    ws.check_idle()
    yield updates(LOAD_OUTPUTS, load_status="… Loading…", card="", **buttons(ws, running=True),
                  **cleared(RUN_VIEW, AFTER_RUN))
    work = functools.partial(ws.load, source, device, None if dtype == "auto" else dtype, revision, token, trust)
    for message in on_a_thread(lambda report: work(progress=lambda m, f: report(m + (f" {f:.0%}" if f else "")))):
        if isinstance(message, str):
            yield updates(LOAD_OUTPUTS, load_status=f"… {message}")
    loaded = message.result
    info = loaded.info
    shared = ws.pool.holders(loaded) - 1
    note = f" Shared read-only with {shared} other session(s)." if shared > 0 else ""
    yield updates(LOAD_OUTPUTS, load_status=f"✓ Loaded {info.name} on {info.device} in {ws.timings['load']:.1f} s.{note}",
                  card=model_card(info), **buttons(ws))


def globs(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in (text or "").replace(",", " ").split() if g.strip())


def prune_config(method, sparsity, pattern_choice, custom_nm, include, exclude, prune_head, batch_size, wanda_variant,
                 options=()):
    from ..core.engine import PruneConfig

    unknown = [o for o in options or () if o not in OPTION_NAMES]
    if unknown:
        raise UserError(f"Unknown option {unknown[0]!r}: choose from {', '.join(OPTION_NAMES)}.")
    return PruneConfig(method=method, sparsity=sparsity, pattern=custom_nm if pattern_choice == "custom N:M" else pattern_choice,
                       include=globs(include), exclude=globs(exclude), prune_head=bool(prune_head),
                       batch_size=check_count(batch_size, "Batch size", 0) or None, wanda_variant=bool(wanda_variant),
                       explain=True, **{OPTION_NAMES[o]: True for o in options or ()})


def method_description(name: str) -> str:
    """One line under the method choice: what it does, and its paper."""
    from ..core.methods import get_method

    return get_method(name).description


def calibration_source(policy: ServePolicy, kind, files, dataset):
    if kind == CALIBRATION[0]:
        return "builtin"
    if kind == CALIBRATION[1]:
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        if not paths:
            raise UserError("Upload one or more .txt files for calibration, or pick the built-in corpus.")
        return paths
    if not (dataset or "").strip():
        raise UserError("Type a hub dataset: wikitext2, c4, or NAME[:CONFIG].")
    return "hf:" + policy.calibration_dataset(dataset)


def check_count(value, name: str, minimum: int = 1) -> int:
    if value is None or int(value) != value or value < minimum:
        raise UserError(f"{name} must be a whole number of at least {minimum}; got {value!r}.")
    return int(value)


@user_errors()
def estimate_text(method, nsamples, seqlen, request: gr.Request):
    from ..core.estimate import estimate

    ws = session(request)
    if ws.loaded is None:
        return "Load a model to see an estimate."
    e = estimate(ws.loaded.info, method.lower(), check_count(nsamples, "Samples"), check_count(seqlen, "Sequence length", 2),
                 True)
    return f"Estimate on {ws.loaded.info.device}: {e} ({e.breakdown()})."


def sparsity_label(pattern_choice: str, custom_nm: str):
    """The slider applies to unstructured pruning only; N:M fixes the sparsity at 1 - N/M."""
    from ..core.masks import Pattern

    if pattern_choice == "unstructured":
        return gr.update(interactive=True, label="Sparsity (unstructured)")
    try:
        pattern = Pattern.parse(custom_nm if pattern_choice == "custom N:M" else pattern_choice)
        fixed = f"{pattern.sparsity(0):.0%}, set by {pattern}"
    except UserError:
        fixed = "set by the N:M pattern"
    return gr.update(interactive=False, label=f"Sparsity ({fixed})")


PRUNE_OUTPUTS = ("prune_status", *RUN_VIEW, *BUTTONS, *AFTER_RUN)


def prune_failed(ws: Workspace, message: str):
    return updates(PRUNE_OUTPUTS, prune_status=f"✗ {message}", **buttons(ws))


@user_errors(prune_failed)
def prune(method, sparsity, pattern_choice, custom_nm, calib_kind, files, dataset, nsamples, seqlen, seed,
          include, exclude, prune_head, batch_size, wanda_variant, options, request: gr.Request):
    from ..core import events as ev

    ws = session(request)
    ws.require_model()
    config = prune_config(method, sparsity, pattern_choice, custom_nm, include, exclude, prune_head, batch_size,
                          wanda_variant, options)
    source = calibration_source(served(request).policy, calib_kind, files, dataset)
    nsamples, seqlen = check_count(nsamples, "Samples"), check_count(seqlen, "Sequence length", 2)
    seed = check_count(seed, "Seed", 0)
    out = functools.partial(updates, PRUNE_OUTPUTS)
    # The previous run's results go at once; Stop opens with the run itself, once it can take effect.
    yield out(prune_status="… Drawing calibration windows…", **buttons(ws, running=True),
              **cleared(RUN_VIEW, AFTER_RUN))
    sparsity_by_block, seconds_by_block, targets, differing = {}, {}, None, {}
    blocks, target, started, heatmap, why, last_drawn = 1, None, time.perf_counter(), gr.update(), gr.update(), 0.0

    def block_plot():
        fig = plots.block_chart(blocks, sparsity_by_block, seconds_by_block, target)
        return plots.targets_trace(fig, targets[:blocks]) if targets else fig

    for event in ws.prune(config, source, nsamples, seqlen, seed):
        if isinstance(event, ev.RunStarted):
            blocks, target, started = len(event.blocks), event.target_sparsity, time.perf_counter()
            yield out(prune_status=f"… {event.method} · {event.pattern} · {event.total_linears} linears in {blocks} blocks",
                      block_plot=block_plot(), **buttons(ws, running=True, can_stop=True))
        elif isinstance(event, ev.Progress):
            yield out(prune_status=f"… {event.what}: block {event.done}/{event.total} · "
                                   f"{time.perf_counter() - started:.0f} s elapsed")
        elif isinstance(event, ev.TargetsChosen):
            targets = event.sparsities
            yield out(prune_status=f"… {event.note}", block_plot=block_plot())
        elif isinstance(event, ev.LinearPruned):
            if event.explanation is not None:
                differing[event.name] = event.explanation.differing
            if time.perf_counter() - last_drawn < DRAW_INTERVAL and event.done < event.total:
                continue  # drawing every linear would slow a fast run down; the picker shows them all afterwards
            last_drawn = time.perf_counter()
            elapsed = time.perf_counter() - started
            finished = len(seconds_by_block)  # blocks cost alike (two passes each); linears do not (1 s to 7 s)
            eta = (f"ETA {elapsed / finished * (blocks - finished):.0f} s" if finished else
                   "ETA after the first block")
            heatmap = plots.layer_maps(event.name, event.shape, event.sparsity, event.score_map, event.mask_map,
                                       method=config.method)
            if event.explanation is not None:
                why = plots.why_chart(event.name, event.explanation, differing)
            yield out(prune_status=f"… block {event.block + 1}/{blocks} · linear {event.done}/{event.total} "
                                   f"({event.done / event.total:.0%}) · {elapsed:.0f} s elapsed · {eta}",
                      map_plot=heatmap, why_plot=why)
        elif isinstance(event, ev.BlockFinished):
            sparsity_by_block[event.index] = event.sparsity
            seconds_by_block[event.index] = event.seconds
            yield out(block_plot=block_plot())
        elif isinstance(event, ev.RunFinished):
            names = list(ws.maps)
            yield out(prune_status=f"✓ Pruned in {event.summary.seconds:.1f} s: achieved sparsity "
                                   f"{event.summary.achieved_sparsity:.2%}.",
                      block_plot=block_plot(), map_plot=heatmap, why_plot=why,
                      layer_pick=gr.update(choices=names, value=names[-1]), results=results_markdown(ws), **buttons(ws))
        elif isinstance(event, ev.RunCancelled):
            yield out(prune_status="■ Stopped. " + ("The dense weights were restored." if event.restored else
                                                    "The dense model was never touched (the pruned copy was discarded)."),
                      **buttons(ws))
        elif isinstance(event, ev.RunFailed):
            raise UserError(f"Pruning failed{f' at {event.layer}' if event.layer else ''}: {event.reason}. "
                            "The dense model is intact.")


def stop_pruning(request: gr.Request):
    """Ask the run to stop; its own stream then says what became of the model (no race with that message)."""
    session(request).cancel.set()
    return gr.update(interactive=False)


@user_errors()
def show_layer(name, request: gr.Request):
    ws = session(request)
    if not name or name not in ws.maps:
        return plots.empty("Pick a pruned linear"), plots.empty(WHY_EMPTY)
    m = ws.maps[name]
    differing = {n: v.explanation.differing for n, v in ws.maps.items() if v.explanation is not None}
    return (plots.layer_maps(name, m.shape, m.sparsity, m.score_map, m.mask_map, method=ws.summary.method),
            plots.why_chart(name, m.explanation, differing) if m.explanation is not None else
            plots.empty("No explanation for this linear (its method reads no activations)"))


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


CHAT_OUTPUTS = ("prompt", "dense_chat", "pruned_chat", "dense_stats", "pruned_stats", "chat_status")


@user_errors()
def chat(prompt, dense_history, pruned_history, max_new_tokens, greedy, temperature, top_p, seed, request: gr.Request):
    """Send one prompt to both models and stream both replies at once, round-robin on this thread."""
    from ..core.generation import GenerationSettings, StreamingGeneration

    ws = session(request)
    out = functools.partial(updates, CHAT_OUTPUTS)
    if not (prompt or "").strip():
        yield out(chat_status="Type a prompt first.")
        return
    loaded = ws.require_model()
    if ws.activity == "pruning":
        raise UserError("This session is pruning; chat once the run has finished.")
    pruned = ws.require_pruned()
    settings = GenerationSettings(check_count(max_new_tokens, "Max new tokens"), bool(greedy), float(temperature),
                                  float(top_p), check_count(seed, "Seed", 0))
    ws.stop_chat.clear()
    columns = [("dense", dense_history or [], ws.dense_model), ("pruned", pruned_history or [], pruned)]
    runs, histories = [], []
    for _, history, model in columns:
        history = plain_history(history) + [{"role": "user", "content": prompt}]
        runs.append(StreamingGeneration(model, loaded.tokenizer, history, settings, ws.stop_chat) if model is not None else None)
        histories.append(history + [{"role": "assistant", "content": "" if model is not None else
                                     "(The dense model was not kept: no memory for a copy. Reload to chat with it.)"}])
    yield out(prompt="", dense_chat=histories[0], pruned_chat=histories[1], chat_status="… Generating…")
    try:
        while True:
            changed = False
            for run, history in zip(runs, histories):
                if run is not None and run.poll():
                    history[-1]["content"] = run.text + (f"\n\n⚠ {run.error}" if run.error else "")
                    changed = True
            if changed:
                yield out(dense_chat=histories[0], pruned_chat=histories[1],
                          dense_stats=runs[0].stats() if runs[0] else "", pruned_stats=runs[1].stats())
            if all(run is None or run.done for run in runs):
                break
            time.sleep(0.03)
        for (column, _, _), run in zip(columns, runs):
            if run is not None and run.tokens_per_second is not None:
                ws.record_generation(column, run.tokens_per_second)
        yield out(dense_chat=histories[0], pruned_chat=histories[1], dense_stats=runs[0].stats() if runs[0] else "",
                  pruned_stats=runs[1].stats(), chat_status="■ Stopped." if ws.stop_chat.is_set() else "")
    finally:
        ws.stop_chat.set()  # a Stop, a closed tab or an error ends both generations
        for run in runs:
            if run is not None:
                run.join(timeout=5)


def stop_chat(request: gr.Request):
    session(request).stop_chat.set()
    return "■ Stopped."


EXPORT_OUTPUTS = ("export_status", "report_file")
OVERWRITE_CONTROL = "the 'Replace a previous export' box"


def export_failed(ws: Workspace, message: str):
    return updates(EXPORT_OUTPUTS, export_status=f"✗ {message}", report_file=gr.update(value=None, visible=False))


@user_errors(export_failed)
def export(folder, overwrite, request: gr.Request):
    import json

    ws = session(request)
    policy = served(request).policy
    target = policy.export_target(folder or "")
    yield updates(EXPORT_OUTPUTS, export_status=f"… Exporting to `{target}`…")
    out = ws.export(target, bool(overwrite), OVERWRITE_CONTROL)
    report = Path(tempfile.mkdtemp(prefix="report-", dir=policy.files_dir)) / "pruning_report.json"
    report.write_text(json.dumps(ws.report(), indent=2))
    yield updates(EXPORT_OUTPUTS, export_status=f"✓ Exported to `{out}` (safetensors, tokenizer, README, pruning_report.json).",
                  report_file=gr.update(value=str(report), visible=True))


# -- layout -----------------------------------------------------------------------------------------------------------

def header() -> str:
    logo = (ASSETS / "logo.svg").read_text()
    return (f"<div id='brand'>{logo}<div><h1>wanda_gui</h1><p>Prune an LLM by weights and activations "
            "(<a href='https://arxiv.org/abs/2306.11695' target='_blank'>Sun et al. 2023</a>), watch it happen, "
            "and chat with the pruned and dense models side by side.</p></div></div>")


def build(policy: ServePolicy | None = None) -> gr.Blocks:
    policy = policy or ServePolicy()
    folders = not policy.exposed or policy.models_dir is not None
    with gr.Blocks(title="wanda_gui: prune LLMs with Wanda") as demo:
        demo.policy, demo.sessions = policy, Sessions(ModelPool(policy.max_sessions))  # read through served(request)
        c: dict[str, gr.components.Component] = {}  # components by the names the callbacks use
        with gr.Row(equal_height=True):
            gr.HTML(header())
        telemetry = gr.Markdown(telemetry_line(), elem_id="telemetry")
        gr.Timer(1.0).tick(telemetry_line, outputs=telemetry, show_progress="hidden", queue=False)
        gr.Markdown(policy.describe(), elem_id="serving")

        with gr.Row():
            with gr.Column(scale=1, elem_classes="step"):
                gr.Markdown("### 1 · Model")
                source_kind = gr.Radio(SOURCES if folders else [SOURCES[0], SOURCES[2]], value=SOURCES[0], label="Source",
                                       elem_id="source")
                folder = gr.Textbox(label="Local folder" if not policy.exposed else f"Model folder (under {policy.models_dir.name}/)"
                                    if policy.models_dir else "Local folder",
                                    placeholder="/path/to/model (config.json + weights + tokenizer)" if not policy.exposed
                                    else "a folder name", visible=False, elem_id="folder")
                with gr.Row(visible=False) as hub_row:
                    hub_id = gr.Textbox(label="Hub id", placeholder="org/name", elem_id="hub-id", scale=3)
                    revision = gr.Textbox(label="Revision", placeholder="main", scale=1)
                with gr.Row(visible=False) as hub_row2:
                    token = gr.Textbox(label="Token (gated/private models)", type="password", scale=3)
                    trust = gr.Checkbox(label="Trust remote code (runs the model's own Python)", value=False, scale=1,
                                        visible=policy.allow_remote_code)
                with gr.Row():
                    choices = device_choices()
                    device = gr.Dropdown(choices, value=choices[0][1], label="Device", elem_id="device", scale=3)
                    dtype = gr.Dropdown(["auto", "fp32", "bf16", "fp16"], value="auto", label="dtype", scale=1,
                                        info="auto: fp32 on CPU, bf16 on GPU")
                c["load_btn"] = gr.Button("Load model", variant="primary", elem_id="load")
                c["load_status"] = gr.Markdown("Pick a model and press Load.", elem_id="load-status")
                c["card"] = gr.Markdown(elem_id="model-card")

            with gr.Column(scale=1, elem_classes="step"):
                gr.Markdown("### 2 · Prune")
                with gr.Row():
                    method = gr.Radio(list(METHOD_NAMES), value="Wanda", label="Method", elem_id="method")
                    pattern = gr.Radio(PATTERNS, value="unstructured", label="Pattern", elem_id="pattern")
                method_note = gr.Markdown(method_description("Wanda"), elem_id="method-note")
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
                    wanda_variant = gr.Checkbox(label="Wanda α-variant (the reference's per-layer α search; rows then "
                                                "differ in sparsity; slightly worse than plain Wanda on the built-in "
                                                "model: 51.6 vs 50.6 perplexity on P1)", value=False,
                                                elem_id="wanda-variant")
                options = gr.CheckboxGroup(list(OPTION_NAMES), value=[], label="Options (on top of the method)",
                                           elem_id="options")
                gr.Markdown(OPTIONS_NOTE, elem_id="options-note")
                estimate = gr.Markdown("Load a model to see an estimate.", elem_id="estimate")
                with gr.Row():
                    c["start_btn"] = gr.Button("Start pruning", variant="primary", interactive=False, elem_id="start")
                    c["stop_btn"] = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")

        with gr.Column(elem_classes="step"):
            gr.Markdown("### 3 · Live")
            c["prune_status"] = gr.Markdown("Load a model, then start pruning.", elem_id="prune-status")
            with gr.Row():
                c["block_plot"] = gr.Plot(plots.block_chart(1, {}, {}, None), label="Blocks", elem_id="block-plot",
                                        min_width=520)
                c["map_plot"] = gr.Plot(plots.empty("Score and mask maps appear as each linear is pruned"), label="Maps",
                                        elem_id="map-plot", min_width=520)
            c["layer_pick"] = gr.Dropdown([], label="Look at any pruned linear", interactive=True, elem_id="layer-pick")
            c["why_plot"] = gr.Plot(plots.empty(WHY_EMPTY), label="Why it works", elem_id="why-plot")

        with gr.Column(elem_classes="step"):
            gr.Markdown("### 4 · Results")
            c["results"] = gr.Markdown(elem_id="results")
            with gr.Row():
                nwindows = gr.Number(16, label="Evaluation windows (512 tokens each; P1 uses 64)", precision=0, minimum=1,
                                     elem_id="nwindows")
                c["eval_btn"] = gr.Button("Measure perplexity: dense vs pruned", interactive=False, elem_id="eval")
            c["ppl_md"] = gr.Markdown(elem_id="perplexity")

        with gr.Column(elem_classes="step"):
            gr.Markdown("### 5 · Chat side by side")
            with gr.Row():
                with gr.Column():
                    c["dense_chat"] = gr.Chatbot(label="Dense", height=380, buttons=["copy"], elem_id="dense-chat",
                                                 placeholder="The original model answers here.")
                    c["dense_stats"] = gr.Markdown(elem_id="dense-stats")
                with gr.Column():
                    c["pruned_chat"] = gr.Chatbot(label="Pruned", height=380, buttons=["copy"], elem_id="pruned-chat",
                                                  placeholder="The pruned model answers here.")
                    c["pruned_stats"] = gr.Markdown(elem_id="pruned-stats")
            with gr.Row():
                c["prompt"] = gr.Textbox(show_label=False, placeholder="Ask both models something (after pruning)…",
                                         scale=6, elem_id="prompt")
                c["send_btn"] = gr.Button("Send", variant="primary", interactive=False, scale=1, elem_id="send")
                chat_stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
                clear_btn = gr.Button("Clear", scale=1, elem_id="clear")
            c["chat_status"] = gr.Markdown(elem_id="chat-status")
            gr.Examples(EXAMPLES, inputs=c["prompt"], label="Example prompts")
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
                export_dir = gr.Textbox(label="Export name (under the server's exports folder)" if policy.exposed
                                        else "Target folder",
                                        value="pruned-model" if policy.exposed else str(Path("exports") / "pruned-model"),
                                        scale=4, elem_id="export-dir")
                overwrite = gr.Checkbox(label="Replace a previous export (only a folder this app exported)", value=False,
                                        scale=2, elem_id="overwrite")
                c["export_btn"] = gr.Button("Export", variant="primary", interactive=False, scale=1, elem_id="export")
            c["export_status"] = gr.Markdown(elem_id="export-status")
            c["report_file"] = gr.File(label="pruning_report.json", visible=False, elem_id="report-file")

        def out(names):
            return [c[name] for name in names]

        # -- wiring. Heavy work (load, prune, evaluate, export) takes turns in one queue; chat has its own, so it never
        # waits behind another session's prune. Queue position and wait show on each step's status line.
        demo.load(lambda: gr.update(choices=device_choices()), None, device, queue=False, api_visibility="private")
        demo.unload(close_session)

        def show_source(kind):
            return (gr.update(visible=kind == SOURCES[1]), gr.update(visible=kind == SOURCES[2]),
                    gr.update(visible=kind == SOURCES[2]))

        source_kind.change(show_source, source_kind, [folder, hub_row, hub_row2], queue=False, api_visibility="private")
        pattern.change(lambda p: gr.update(visible=p == "custom N:M"), pattern, custom_nm, queue=False,
                       api_visibility="private")
        for component in (pattern, custom_nm):
            component.change(sparsity_label, [pattern, custom_nm], sparsity, queue=False, api_visibility="private")
        method.change(method_description, method, method_note, queue=False, api_visibility="private")
        calib_kind.change(lambda k: (gr.update(visible=k == CALIBRATION[1]), gr.update(visible=k == CALIBRATION[2])),
                          calib_kind, [files, dataset], queue=False, api_visibility="private")

        work = dict(concurrency_id="work", concurrency_limit=1)
        chatting = dict(concurrency_id="chat", concurrency_limit=2)

        def queued(trigger, status: str, what: str, fn, inputs, outputs, **kwargs):
            """trigger -> at once, a status line saying the click was taken -> fn in its queue, whose place and wait
            Gradio shows on that same status line."""
            note = f"… Waiting for the server to {what}; other sessions' work goes first (your place in the queue shows here)."
            return trigger(lambda: note, None, c[status], queue=False, api_visibility="private").then(
                fn, inputs, outputs, show_progress_on=[c[status]], **kwargs)

        load_event = queued(c["load_btn"].click, "load_status", "load the model", load,
                            [source_kind, folder, hub_id, revision, token, trust, device, dtype], out(LOAD_OUTPUTS),
                            api_name="load", **work)
        estimate_inputs = [method, nsamples, seqlen]
        load_event.then(estimate_text, estimate_inputs, estimate, api_visibility="private")
        for component in (method, nsamples, seqlen):
            component.change(estimate_text, estimate_inputs, estimate, api_visibility="private")

        queued(c["start_btn"].click, "prune_status", "start pruning", prune,
               [method, sparsity, pattern, custom_nm, calib_kind, files, dataset, nsamples, seqlen, seed, include, exclude,
                prune_head, batch_size, wanda_variant, options], out(PRUNE_OUTPUTS), api_name="prune", **work)
        c["stop_btn"].click(stop_pruning, None, c["stop_btn"], api_name="stop", queue=False)
        c["layer_pick"].change(show_layer, c["layer_pick"], [c["map_plot"], c["why_plot"]], api_name="show_layer")
        queued(c["eval_btn"].click, "ppl_md", "measure perplexity", evaluate, nwindows, out(EVAL_OUTPUTS),
               api_name="evaluate", **work)

        chat_inputs = [c["prompt"], c["dense_chat"], c["pruned_chat"], max_new, greedy, temperature, top_p, chat_seed]
        send_event = queued(c["send_btn"].click, "chat_status", "answer", chat, chat_inputs, out(CHAT_OUTPUTS),
                            api_name="chat", **chatting)
        submit_event = queued(c["prompt"].submit, "chat_status", "answer", chat, chat_inputs, out(CHAT_OUTPUTS),
                              api_visibility="private", **chatting)
        chat_stop.click(stop_chat, None, c["chat_status"], cancels=[send_event, submit_event], api_name="stop_chat",
                        queue=False)
        clear_btn.click(lambda: ([], [], "", "", ""), None, out(("dense_chat", "pruned_chat", "dense_stats",
                                                                  "pruned_stats", "chat_status")),
                        api_name="clear", queue=False)
        queued(c["export_btn"].click, "export_status", "export", export, [export_dir, overwrite], out(EXPORT_OUTPUTS),
               api_name="export", **work)
    return demo
