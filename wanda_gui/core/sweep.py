"""Compare methods: every (method, pattern, sparsity) on a fresh copy of the dense model, measured, resumable."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from .config import PruneConfig, chosen_efforts
from .engine import prune, select_linears, validate
from .errors import UserError
from .evaluate import perplexity
from .events import LinearPruned
from .masks import Pattern, check_sparsity
from .memory import release_memory
from .methods import OPTIONS, get_method, get_option, structured_methods
from .passes import Cancelled
from .calibration import check_seqlen
from .estimate import check_eval_fits, check_fits
from .runs import CalibrationSpec, ModelSource, outcome, pruned_copy, vocab_size
from .speed import measure_speed

DENSE = "dense"
RESULTS_JSON, RESULTS_CSV, CHART_HTML = "results.json", "results.csv", "chart.html"
SPEED_COLUMNS = ("prefill_tokens_per_second", "generation_tokens_per_second")  # with --speed / Compare's checkbox
COLUMNS = ("key", "method", "pattern", *OPTIONS, "target_sparsity", "achieved_sparsity", "parameters", "perplexity",
           "prune_seconds", "eval_seconds", *SPEED_COLUMNS)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a method with its options, a pattern and the sparsity it prunes to (1 - N/M for N:M)."""

    method: str
    pattern: Pattern
    sparsity: float
    options: tuple[str, ...] = ()  # keys of methods.OPTIONS, in their order
    efforts: tuple[tuple[str, str], ...] = ()  # (option key, its named setting) where not the option's first

    @property
    def key(self) -> str:
        """Stable across processes, so a rerun recognises the runs already in results.json."""
        efforts = dict(self.efforts)
        options = ''.join(f"+{o}" + (f"={efforts[o]}" if o in efforts else "") for o in self.options)
        return f"{self.method}{options}|{self.pattern}|{self.sparsity:g}"

    def config(self) -> PruneConfig:
        return PruneConfig(method=self.method, sparsity=self.sparsity, pattern=self.pattern, options=self.options,
                           efforts=dict(self.efforts), restore_on_abort=False)

    def row(self, **measured) -> dict:
        """A results row: the run's settings (a column per option) and what was measured."""
        return {"key": self.key, "method": self.method, "pattern": str(self.pattern),
                **{key: key in self.options for key in OPTIONS}, **measured}


@dataclasses.dataclass
class SweepStarted:
    total: int  # runs in the plan
    to_run: int  # of them, not already in results.json


@dataclasses.dataclass
class DenseMeasured:
    row: dict  # the dense model's row: its perplexity is the chart's reference line


@dataclasses.dataclass
class RunStarting:
    index: int  # 1-based among the runs this call does
    of: int
    spec: RunSpec


@dataclasses.dataclass
class RunProgress:
    key: str
    done: int  # linears pruned so far in this run
    total: int


@dataclasses.dataclass
class RunSkipped:
    spec: RunSpec
    row: dict  # the result recorded earlier


@dataclasses.dataclass
class RunDone:
    row: dict


@dataclasses.dataclass
class SweepFinished:
    rows: list[dict]  # every row of results.json, the dense one first
    header: dict  # the settings that make the rows comparable
    cancelled: bool = False


SweepEvent = SweepStarted | DenseMeasured | RunStarting | RunProgress | RunSkipped | RunDone | SweepFinished


def sweep_runs(methods: list[str], sparsities: list[float], patterns: list[str | Pattern],
               options: tuple[str, ...] = (), efforts: dict[str, str] | None = None) -> list[RunSpec]:
    """Every method x pattern x sparsity, each with the options asked for; an N:M pattern has one sparsity of its
    own, so it ignores the sparsity axis (and an option that refuses N:M, such as OWL, leaves those runs alone). A
    method skips the patterns it cannot take (SparseGPT structured, FLAP anything else), and a structured run goes
    without the options that work on single weights."""
    names = [get_method(m).name for m in methods]
    chosen = tuple(key for key in OPTIONS if key in {get_option(o).key for o in options})
    named = {key: effort for key, effort in chosen_efforts(chosen, efforts or {}).items()
             if effort != next(iter(OPTIONS[key].efforts))}
    parsed = [p if isinstance(p, Pattern) else Pattern.parse(p) for p in patterns]
    levels = [check_sparsity(s) for s in sparsities]
    if not names or not parsed:
        raise UserError("A sweep needs at least one method and one pattern.")
    if not levels and any(not p.nm for p in parsed):
        raise UserError("An unstructured sweep needs at least one sparsity, e.g. 0.5.")
    specs: dict[str, RunSpec] = {}
    for name in names:
        for pattern in (p for p in parsed if get_method(name).takes(p)):
            kept = tuple(key for key in chosen if not (pattern.nm and OPTIONS[key].unstructured_only)
                         and not (pattern.structured and not OPTIONS[key].takes_structured))
            for sparsity in ([pattern.sparsity(0.0)] if pattern.nm else levels):
                spec = RunSpec(name, pattern, sparsity, kept, tuple((k, e) for k, e in named.items() if k in kept))
                spec.config()  # refused here, before anything runs, when the combination is invalid
                specs.setdefault(spec.key, spec)
    if not specs:
        raise UserError(f"No method asked for takes the patterns asked for ({', '.join(map(str, parsed))}): "
                        f"{', '.join(structured_methods())} remove whole channels (structured), the others single "
                        "weights.")
    return list(specs.values())


def check_out_dir(out_dir: Path) -> None:
    """The results folder is a folder (or not there yet); checked before a model is loaded."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; the sweep's output must be a folder.")
    if any(parent.exists() and not parent.is_dir() for parent in out_dir.parents):
        raise UserError(f"{out_dir} lies under a file, not a folder; pick another output folder.")


def sweep_header(loaded, calibration_info: dict, eval_seqlen: int, eval_nwindows: int, speed: bool = False) -> dict:
    """What makes two sweeps' numbers comparable: a rerun must match it to reuse finished runs (one that measures
    speed names its device: tokens/s compare only there)."""
    header = {"model": loaded.name, "dtype": loaded.info.dtype, "calibration": dict(calibration_info),
              "evaluation": {"seqlen": eval_seqlen, "nwindows": eval_nwindows}}
    return {**header, "speed": {"device": loaded.info.device}} if speed else header


def read_results(out_dir: Path, header: dict) -> list[dict]:
    """The rows of an earlier sweep in out_dir; refused when it was run with other settings."""
    path = out_dir / RESULTS_JSON
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        old, rows = data["header"], list(data["rows"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a sweep's results file; pick another output folder.") from None
    differs = setting_differences(old, json.loads(json.dumps(header)))
    if differs:
        detail = "; ".join(differs)
        raise UserError(f"{out_dir} holds a sweep run with other settings ({detail}). Use the same settings to "
                        "resume it, or another output folder.")
    return rows


def setting_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'calibration seed: 0 there, 3 now' for every setting that differs, nested settings named by their path."""
    differs = []
    for key in dict.fromkeys([*new, *old]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differs += setting_differences(a, b, f"{prefix}{key} ")
        elif a != b:
            differs.append(f"{prefix}{key}: {a} there, {b} now")
    return differs


def write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a stopped sweep never leaves a half-written results file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def results_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def save(out_dir: Path, header: dict, rows: list[dict]) -> None:
    """results.json, results.csv and chart.html, each replaced whole."""
    write_atomic(out_dir / RESULTS_JSON, json.dumps({"header": header, "rows": rows}, indent=2))
    write_atomic(out_dir / RESULTS_CSV, results_csv(rows))
    write_atomic(out_dir / CHART_HTML, chart_html(rows))


class Stopped(Exception):
    """The user stopped the sweep; the finished runs stay saved."""


def stopped(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def zero_fraction(model: torch.nn.Module) -> float:
    """Share of zeros in the linears a default prune would touch: the dense model's own sparsity."""
    _, stages = select_linears(model, PruneConfig())
    weights = [linear.weight for linears in stages for linear in linears.values()]
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))


def measure(loaded, model: torch.nn.Module, eval_seqlen: int, eval_nwindows: int,
            cancel: threading.Event | None, speed: bool) -> dict:
    """Perplexity and its seconds on the protocol's evaluation windows, the parameters stored, and with `speed`
    prefill and generation tokens/s (core.speed, as the results page measures them)."""
    try:
        result = perplexity(model, loaded.tokenizer, seqlen=eval_seqlen, nwindows=eval_nwindows, cancel=cancel)
    except UserError:
        if stopped(cancel):
            raise Stopped from None
        raise
    measured = {"parameters": sum(p.numel() for p in model.parameters()), "perplexity": result.perplexity,
                "eval_seconds": result.seconds}
    if speed:
        if stopped(cancel):
            raise Stopped
        speeds = measure_speed(model, loaded.tokenizer, loaded.info.device)
        measured.update({column: speeds[column] for column in SPEED_COLUMNS})
    return measured


def dense_row(loaded, eval_seqlen: int, eval_nwindows: int, cancel: threading.Event | None, speed: bool) -> dict:
    return {"key": DENSE, "method": DENSE, "pattern": "", **{key: False for key in OPTIONS}, "target_sparsity": 0.0,
            "achieved_sparsity": zero_fraction(loaded.model), "prune_seconds": 0.0,
            **measure(loaded, loaded.model, eval_seqlen, eval_nwindows, cancel, speed)}


def run_one(loaded, spec: RunSpec, windows: torch.Tensor, eval_seqlen: int, eval_nwindows: int,
            cancel: threading.Event | None, speed: bool = False) -> Iterator[RunProgress | RunDone]:
    """Prune a copy that shares every untouched tensor with the dense model, measure it, free it."""
    config = spec.config()
    copy = pruned_copy(loaded.model, config)
    started = time.perf_counter()
    try:
        try:
            summary = yield from outcome(prune(copy, config, windows, cancel=cancel, model_name=loaded.name),
                                         lambda e: RunProgress(spec.key, e.done, e.total)
                                         if isinstance(e, LinearPruned) else None)
        except Cancelled:
            raise Stopped from None
        except UserError as e:
            raise UserError(f"Run {spec.key} failed: {e}. The finished runs are kept; rerun to resume.") from None
        prune_seconds = time.perf_counter() - started
        measured = measure(loaded, copy, eval_seqlen, eval_nwindows, cancel, speed)
    finally:
        del copy
        release_memory()
    yield RunDone(spec.row(target_sparsity=summary.target_sparsity, achieved_sparsity=summary.achieved_sparsity,
                           prune_seconds=prune_seconds, **measured))


def run_sweep(loaded, specs: list[RunSpec], windows: torch.Tensor, calibration_info: dict, eval_nwindows: int,
              out_dir: str | Path, cancel: threading.Event | None = None, eval_seqlen: int = 512,
              speed: bool = False) -> Iterator[SweepEvent]:
    """Dense perplexity once, then each spec on a fresh pruning copy (the dense model is never touched); results
    are saved after every run, and runs already in out_dir's results.json (same settings) are skipped. A stop
    ends the stream with SweepFinished(cancelled=True), the finished runs saved. `speed`: each model's prefill and
    generation tokens/s too (a structured run's are its own; zeros stored densely run at the dense speed)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    for spec in specs:  # every run must fit this model before the first one starts
        validate(loaded.model, spec.config())
    out_dir.mkdir(parents=True, exist_ok=True)
    header = sweep_header(loaded, calibration_info, eval_seqlen, eval_nwindows, speed)
    rows = read_results(out_dir, header)
    done = {row["key"]: row for row in rows}
    todo = [s for s in specs if s.key not in done]
    yield SweepStarted(len(specs), len(todo))
    for spec in specs:
        if spec.key in done:
            yield RunSkipped(spec, done[spec.key])
    try:
        if DENSE not in done:
            rows.insert(0, dense_row(loaded, eval_seqlen, eval_nwindows, cancel, speed))
            save(out_dir, header, rows)
            yield DenseMeasured(rows[0])
        for index, spec in enumerate(todo, 1):
            if stopped(cancel):
                raise Stopped
            yield RunStarting(index, len(todo), spec)
            for event in run_one(loaded, spec, windows, eval_seqlen, eval_nwindows, cancel, speed):
                if isinstance(event, RunDone):
                    rows.append(event.row)
                    save(out_dir, header, rows)
                yield event
    except Stopped:
        yield SweepFinished(rows, header, cancelled=True)
        return
    yield SweepFinished(rows, header)


def trace_name(row: dict) -> str:
    """One legend entry per method (with its options) and pattern."""
    method = row["method"] + "".join(f" + {option.label}" for key, option in OPTIONS.items() if row.get(key))
    return method if row["pattern"] == "unstructured" else f"{method} {row['pattern']}"


# What a comparison's charts put on the x axis: the row's column, the axis title, and whether the axis is logarithmic
AXES = {"sparsity": ("achieved_sparsity", "achieved sparsity (structured: the linears' weights removed)", False),
        "seconds": ("prune_seconds", "prune seconds (log scale)", True),
        "speed": ("generation_tokens_per_second", "generation tokens/s (batch 1)", False)}


def axes_of(rows: list[dict]) -> list[str]:
    """The AXES every pruned row has a value for (speed only where it was measured)."""
    pruned = [row for row in rows if row["key"] != DENSE]
    return [x for x, (column, _, _) in AXES.items() if all(row.get(column) is not None for row in pruned)]


def chart_figure(rows: list[dict], dense_ppl: float | None, x: str = "sparsity", dense_x: float | None = None):
    """Perplexity (log scale) against a column of AXES, as a plotly Figure: a line per method against sparsity
    (markers for N:M runs, diamonds for N:M and structured), markers against time and speed, the dense model as a
    line (and, against speed, a point: `dense_x`); the app shows these figures live, chart_html saves them."""
    import plotly.graph_objects as go

    column, title, log = AXES[x]
    fig = go.Figure()
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["key"] != DENSE:
            groups.setdefault(trace_name(row), []).append(row)
    for name, group in groups.items():
        group.sort(key=lambda r: r[column])
        pattern = Pattern.parse(group[0]["pattern"])
        diamond = pattern.nm or pattern.structured
        fig.add_scatter(x=[r[column] for r in group], y=[r["perplexity"] for r in group], name=name,
                        mode="markers" if pattern.nm or x != "sparsity" else "lines+markers",
                        marker=dict(size=11 if diamond else 7, symbol="diamond" if diamond else "circle"),
                        customdata=[[r["key"], r["achieved_sparsity"], r["prune_seconds"]] for r in group],
                        hovertemplate="%{customdata[0]}<br>sparsity %{customdata[1]:.3f}<br>prune %{customdata[2]:.1f} s"
                                      "<br>perplexity %{y:.2f}<extra></extra>")
    if dense_ppl is not None and dense_x is not None:  # the dense model's own point (its speed)
        fig.add_scatter(x=[dense_x], y=[dense_ppl], name="dense model", mode="markers",
                        marker=dict(color="black", size=10, symbol="star"), hoverinfo="name+x")
    if dense_ppl is not None:
        values = [r[column] for r in rows if r["key"] != DENSE] + ([dense_x] if dense_x is not None else [])
        span = [min(values), max(values)] if log and values else [0, max(values + [0.5])]
        fig.add_scatter(x=span, y=[dense_ppl, dense_ppl], name=f"dense ({dense_ppl:.2f})", mode="lines",
                        line=dict(color="black", dash="dash"), hoverinfo="name")
    fig.update_layout(title=f"Perplexity against {x} (lower is better)", template="plotly_white",
                      xaxis=dict(title=title, **({"type": "log"} if log else {"tickformat": ".0%"})),
                      yaxis=dict(title="perplexity (log scale)", type="log"), legend=dict(title="method"))
    return fig


def figure_of(rows: list[dict], x: str):
    """chart_figure for every row of a sweep, the dense one included: its perplexity as the line, and its speed as
    a point of its own on the speed axis."""
    dense = next((row for row in rows if row["key"] == DENSE), None)
    return chart_figure([row for row in rows if row["key"] != DENSE], dense and dense["perplexity"], x,
                        dense.get(AXES[x][0]) if dense and x == "speed" else None)


def chart_html(rows: list[dict]) -> str:
    """Every chart of AXES the rows have values for, in one HTML file with plotly.js inlined, so it opens offline."""
    figures = [figure_of(rows, x).to_html(include_plotlyjs=i == 0, full_html=False)
               for i, x in enumerate(axes_of(rows))]
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{''.join(figures)}</body></html>"


@dataclasses.dataclass
class SweepJob:
    """A headless sweep: the model, the calibration, the runs, where the results go and how each is measured."""

    model: ModelSource
    calibration: CalibrationSpec
    runs: list[RunSpec]
    out: Path
    eval_nwindows: int = 64
    eval_seqlen: int = 512  # PROTOCOL.md's evaluation windows
    speed: bool = False  # each model's prefill and generation tokens/s too

    def check(self) -> None:
        """Everything that needs no model, before the model is loaded."""
        self.model.check()
        self.calibration.check()
        check_out_dir(self.out)


def run_job(job: SweepJob, progress=None) -> Iterator[SweepEvent]:
    """Load, check that every run fits, draw the calibration windows, then run_sweep's events."""
    job.check()
    text = job.calibration.text()
    loaded = job.model.load(progress=progress)
    check_seqlen(job.eval_seqlen, loaded.info.context_length)
    c = job.calibration
    for method in dict.fromkeys(spec.method for spec in job.runs):
        check_fits(loaded.info, method, c.nsamples, c.seqlen, dense_copy=True, hint="lower --nsamples or --seqlen")
    check_eval_fits(loaded.info, vocab_size(loaded.model), job.eval_seqlen, hint="lower --eval-seqlen")
    windows, calibration = c.windows(loaded, text)
    yield from run_sweep(loaded, job.runs, windows, calibration, job.eval_nwindows, job.out,
                         eval_seqlen=job.eval_seqlen, speed=job.speed)
