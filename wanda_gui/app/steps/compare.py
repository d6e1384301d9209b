"""Step 7 · Compare: methods (with options) x patterns x sparsities, each pruned on a fresh copy and measured, one
after another (core.sweep: the same runs as `wanda-gui sweep`); the chart and table fill in as runs finish, and any
finished run can be taken into the chat and export."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import gradio as gr

from ...core.errors import UserError
from .. import plots
from ..common import (AFTER_RUN, BUTTONS, COMPARE_EMPTY, COMPARE_TIME_EMPTY, COMPARE_VIEW, RUN_VIEW, STATUS_INTERVAL,
                      WORK, Page, buttons, check_count, cleared, served, session, updates, user_errors)
from ..workspace import Workspace
from ...core import sweep
from ...core.masks import Pattern
from ...core.methods import OPTIONS, get_method
from .live import PRUNE_OUTPUTS, prune_stream
from .method import METHOD_NAMES, OPTION_NAMES, calibration_source, option_keys

SPARSITIES = [(f"{level}%", level / 100) for level in range(10, 100, 10)]
PATTERNS = ["unstructured", "2:4", "4:8", "structured"]
MEMORY_NOTE = ("Runs go one after another, each on a fresh copy of the linears it prunes, freed once measured: "
               "beside the dense model there is never more than one pruned copy. So Compare first lets go of this "
               "session's pruned model (steps 3-6). To chat with a run or export it, take it: it is pruned again "
               "with the same calibration windows (the same masks) into the session's model. Calibration: as set in "
               "step 2; every decoder linear is pruned.")
SPEED_NOTE = ("Each model's prefill and generation tokens/s too (batch 1, a 512-token prompt and 128 new tokens, the "
              "median of 3), as step 4 measures them: about 20 s a model for the built-in one on 2 CPU cores")
COMPARE_OUTPUTS = ("compare_status", *COMPARE_VIEW, *BUTTONS, *RUN_VIEW, *AFTER_RUN, "prune_status")
TAKE_OUTPUTS = (*PRUNE_OUTPUTS, "compare_status")


def runs_of(methods, options, baseline, sparsities, patterns) -> tuple[list, list[str]]:
    """The sweep's runs for what the page asks: each method with the chosen options (where it reads activations,
    which every option needs) and, when asked or without options, plain, on the patterns it takes; and notes on
    what was left out."""
    unknown = [m for m in methods or () if m not in METHOD_NAMES]
    if unknown:
        raise UserError(f"Unknown method {unknown[0]!r}: choose from {', '.join(METHOD_NAMES)}.")
    if not methods:
        raise UserError("Choose at least one method to compare.")
    if not patterns:
        raise UserError("Choose at least one pattern to compare.")
    keys = option_keys(options)
    sparsities = sorted(float(s) for s in sparsities or ())
    specs, notes = {}, []
    for label in methods:
        name = METHOD_NAMES[label]
        skipped = [p for p in patterns if not get_method(name).takes(Pattern.parse(p))]
        if len(skipped) == len(patterns):
            notes.append(f"{label} takes none of the patterns asked for ({', '.join(skipped)}), so it does not run.")
            continue
        if skipped:
            notes.append(f"{label} does not take {', '.join(skipped)}, so it runs without.")
        settings = [()] if baseline or not keys else []
        if keys and get_method(name).needs_activations:
            settings.append(keys)
        elif keys:
            notes.append(f"{label} reads no activations, so it runs without the options.")
            settings = [()]
        for setting in settings:
            for spec in sweep.sweep_runs([name], sparsities, list(patterns), setting):
                specs.setdefault(spec.key, spec)
    if any(Pattern.parse(p).nm for p in patterns):
        notes += [f"{OPTIONS[key].label} {OPTIONS[key].unstructured_only}, so N:M runs go without it."
                  for key in keys if OPTIONS[key].unstructured_only]
    if "structured" in patterns:
        notes += [f"{OPTIONS[key].label} works on single weights, so structured runs go without it."
                  for key in keys if not OPTIONS[key].takes_structured]
    if not specs:
        raise UserError("None of the methods chosen takes the patterns chosen: FLAP is structured only, and "
                        "structured runs take the methods that score whole channels (Wanda, Magnitude, FLAP).")
    return list(specs.values()), notes


def spec_name(spec) -> str:
    """A run's method, options and pattern as the chart's legend names them."""
    return sweep.trace_name(spec.row())


def run_label(row: dict) -> str:
    return f"{sweep.trace_name(row)} · {row['target_sparsity']:.0%} · perplexity {row['perplexity']:.2f}"


def table_markdown(rows: list[dict]) -> str:
    """Every finished run beside the dense model: sparsity reached, perplexity and its ratio to dense, times, the
    parameters stored, and generation speed where measured."""
    if not rows:
        return ""
    dense = next((row for row in rows if row["key"] == sweep.DENSE), None)
    speed = all(row.get("generation_tokens_per_second") is not None for row in rows)
    lines = ["| run | target | achieved | perplexity | × dense | prune s | eval s | parameters |" +
             (" generation tok/s | × dense |" if speed else ""), "|---|---|---|---|---|---|---|---|" +
             ("---|---|" if speed else "")]
    for row in rows:
        ratio = f"{row['perplexity'] / dense['perplexity']:.2f}x" if dense else "–"
        name, target, prune = ("dense", "–", "–") if row["key"] == sweep.DENSE else \
            (sweep.trace_name(row), f"{row['target_sparsity']:.0%}", f"{row['prune_seconds']:.1f}")
        line = (f"| {name} | {target} | {row['achieved_sparsity']:.2%} | **{row['perplexity']:.2f}** | {ratio} "
                f"| {prune} | {row['eval_seconds']:.1f} | {row['parameters'] / 1e6:.2f} M |")
        if speed:
            tokens = row["generation_tokens_per_second"]
            line += f" {tokens:.1f} | {tokens / dense['generation_tokens_per_second']:.2f}x |" if dense else \
                f" {tokens:.1f} | – |"
        lines.append(line)
    return "\n".join(lines)


def shown_rows(ws: Workspace) -> dict:
    """Chart, table, the runs one may take, and the results files, from what the comparison has finished."""
    rows = ws.comparison.rows
    finished = ws.comparison.finished
    folder = ws.comparison.folder
    files = [str(folder / name) for name in ("results.csv", "chart.html") if (folder / name).exists()]
    speed = "speed" in sweep.axes_of(rows) and len(rows) > 1
    return dict(compare_chart=plots.comparison_chart(rows), compare_time_chart=plots.comparison_chart(rows, "seconds"),
                compare_speed_chart=gr.update(value=plots.comparison_chart(rows, "speed") if speed else None,
                                              visible=speed),
                compare_table=table_markdown(rows),
                compare_pick=gr.update(choices=[(run_label(row), row["key"]) for row in finished],
                                       value=finished[-1]["key"] if finished else None),
                compare_files=gr.update(value=files or None, visible=bool(files)))


def compare_failed(ws: Workspace, message: str):
    return updates(COMPARE_OUTPUTS, compare_status=f"✗ {message}", **buttons(ws))


@user_errors(compare_failed)
def compare(compare_methods, compare_options, compare_baseline, compare_sparsities, compare_patterns, compare_windows,
            compare_speed, calib_kind, files, dataset, nsamples, seqlen, seed, request: gr.Request):
    ws = session(request)
    policy = served(request).policy
    ws.require_model()
    specs, notes = runs_of(compare_methods, compare_options, compare_baseline, compare_sparsities, compare_patterns)
    source = calibration_source(policy, calib_kind, files, dataset)
    nsamples, seqlen = check_count(nsamples, "Samples"), check_count(seqlen, "Sequence length", 2)
    seed, nwindows = check_count(seed, "Seed", 0), check_count(compare_windows, "Evaluation windows")
    ws.check_idle()
    out = lambda **values: updates(COMPARE_OUTPUTS, **values)  # noqa: E731
    noted = "".join(f" {note}" for note in notes)
    yield out(compare_status=f"… Drawing calibration windows for {len(specs)} runs…{noted}",
              **buttons(ws, running=True))
    folder = Path(tempfile.mkdtemp(prefix="compare-", dir=policy.files_dir))  # served, never a path the visitor names
    started, last_drawn, current = time.perf_counter(), 0.0, None
    for event in ws.compare(specs, source, nsamples, seqlen, seed, nwindows, folder, bool(compare_speed)):
        elapsed = f"{time.perf_counter() - started:.0f} s elapsed"
        if isinstance(event, sweep.SweepStarted):
            yield out(compare_status=f"… Measuring the dense model ({nwindows} windows), then {event.total} runs.{noted}",
                      prune_status="The pruned model was let go for Compare (step 7); take a run from there, or "
                                   "prune again.", **buttons(ws, running=True, stop="compare_stop"),
                      **cleared(RUN_VIEW, AFTER_RUN, COMPARE_VIEW))
        elif isinstance(event, sweep.DenseMeasured):
            yield out(compare_status=f"… Dense perplexity {event.row['perplexity']:.2f}; runs next · {elapsed}",
                      **shown_rows(ws))
        elif isinstance(event, sweep.RunStarting):
            current = f"run {event.index}/{event.of}: {spec_name(event.spec)} at {event.spec.sparsity:.0%}"
            yield out(compare_status=f"… {current} · {elapsed}")
        elif isinstance(event, sweep.RunProgress):
            if time.perf_counter() - last_drawn < STATUS_INTERVAL and event.done < event.total:
                continue
            last_drawn = time.perf_counter()
            doing = (f"linear {event.done}/{event.total}" if event.done < event.total else
                     f"measuring perplexity ({nwindows} windows)" + (" and speed" if compare_speed else ""))
            yield out(compare_status=f"… {current} · {doing} · {elapsed}")
        elif isinstance(event, sweep.RunDone):
            yield out(compare_status=f"… {current} done: perplexity {event.row['perplexity']:.2f} · {elapsed}",
                      **shown_rows(ws))
        elif isinstance(event, sweep.SweepFinished):
            finished = len(ws.comparison.finished)
            status = (f"■ Stopped: the {finished} finished run(s) are kept." if event.cancelled else
                      f"✓ Compared {finished} runs in {time.perf_counter() - started:.0f} s.")
            yield out(compare_status=f"{status}{noted} Pick one to take it into the chat and export.", **shown_rows(ws),
                      **buttons(ws))


def take_failed(ws: Workspace, message: str):
    return updates(TAKE_OUTPUTS, compare_status=f"✗ {message}", **buttons(ws))


@user_errors(take_failed)
def take(compare_pick, request: gr.Request):
    """Prune the picked run again into the session's model, shown live in step 3; then chat and export use it."""
    key = compare_pick
    ws = session(request)
    ws.check_idle()
    comparison = ws.comparison
    row = next((r for r in (comparison.finished if comparison else []) if r["key"] == key), None)
    if row is None:
        raise UserError("Pick a finished run of the comparison first.")
    label = run_label(row)
    yield updates(TAKE_OUTPUTS, compare_status=f"… Pruning {label} again into this session's model (step 3 shows it)…")
    for shown in prune_stream(ws, ws.take(key), comparison.specs[key].method):
        yield updates(TAKE_OUTPUTS, **shown)
    if ws.pruned is not None and ws.summary is not None:
        yield updates(TAKE_OUTPUTS, compare_status=f"✓ {label} is this session's pruned model now: measure it (step 4), "
                                                   "chat with it (step 5), export it (step 6).")
    else:
        yield updates(TAKE_OUTPUTS, compare_status="■ Stopped before the run was taken.")


def stop_compare(request: gr.Request):
    """Ask the comparison to stop; the finished runs stay (its own stream says so)."""
    session(request).cancel.set()
    return gr.update(interactive=False)


def layout(page: Page) -> None:
    add = page.add
    with gr.Column(elem_classes="step"):
        gr.Markdown("### 7 · Compare methods")
        with gr.Row():
            add("compare_methods", gr.CheckboxGroup(list(METHOD_NAMES), value=["Wanda", "Magnitude"], label="Methods",
                                                    elem_id="compare-methods"))
            add("compare_options", gr.CheckboxGroup(list(OPTION_NAMES), value=[], elem_id="compare-options",
                                                    label="Options (on methods that read activations)"))
            add("compare_baseline", gr.Checkbox(value=True, label="Also each method without the options",
                                                elem_id="compare-baseline"))
        with gr.Row():
            add("compare_sparsities", gr.CheckboxGroup(SPARSITIES, value=[0.3, 0.5, 0.6, 0.7],
                                                       label="Sparsities (unstructured and structured)",
                                                       elem_id="compare-sparsities"))
            add("compare_patterns", gr.CheckboxGroup(PATTERNS, value=["unstructured"], label="Patterns",
                                                     info="N:M runs have their own sparsity (1 - N/M); structured "
                                                          "removes that share of the linears' weights",
                                                     elem_id="compare-patterns"))
            add("compare_windows", gr.Number(8, label="Evaluation windows per run (512 tokens each)", precision=0,
                                             minimum=1, elem_id="compare-windows"))
            add("compare_speed", gr.Checkbox(value=False, label="Measure speed", info=SPEED_NOTE,
                                             elem_id="compare-speed"))
        gr.Markdown(MEMORY_NOTE, elem_id="compare-note")
        with gr.Row():
            add("compare_btn", gr.Button("Compare", variant="primary", interactive=False, elem_id="compare"))
            add("compare_stop", gr.Button("Stop (keeps finished runs)", variant="stop", interactive=False,
                                          elem_id="compare-stop"))
        add("compare_status", gr.Markdown(elem_id="compare-status"))
        with gr.Row():
            add("compare_chart", gr.Plot(plots.empty(COMPARE_EMPTY), label="Comparison", elem_id="compare-chart",
                                         min_width=520))
            add("compare_time_chart", gr.Plot(plots.empty(COMPARE_TIME_EMPTY), label="Quality for the time",
                                              elem_id="compare-time-chart", min_width=520))
        add("compare_speed_chart", gr.Plot(None, label="Quality for the speed", visible=False,
                                           elem_id="compare-speed-chart"))
        add("compare_table", gr.Markdown(elem_id="compare-table"))
        with gr.Row():
            add("compare_pick", gr.Dropdown([], label="A finished run", interactive=True, scale=3,
                                            elem_id="compare-pick"))
            add("take_btn", gr.Button("Take into chat and export", interactive=False, scale=1, elem_id="take"))
        add("compare_files", gr.File(label="results.csv and chart.html", file_count="multiple", visible=False,
                                     elem_id="compare-files"))


def wire(page: Page) -> None:
    page.queued(page["compare_btn"].click, "compare_status", "compare", compare, page.out(COMPARE_OUTPUTS),
                api_name="compare", **WORK)
    page["compare_stop"].click(stop_compare, None, page["compare_stop"], api_name="stop_compare", queue=False)
    page.queued(page["take_btn"].click, "compare_status", "take the run", take, page.out(TAKE_OUTPUTS),
                api_name="take", **WORK)
