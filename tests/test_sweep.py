"""The sweep: its plan, fresh copies that leave the dense model untouched, saved results, resume, the chart."""

from __future__ import annotations

import csv
import json
import math
import re
import threading

import pytest
import torch

from wanda_gui.core.calibration import windows_from_text
from wanda_gui.core.copies import pruning_copy, shared_bytes, tensor_bytes
from wanda_gui.core.errors import UserError
from wanda_gui.core.models import load_model
from wanda_gui.core.sweep import (DenseMeasured, RunDone, RunSkipped, RunStarting, SweepFinished, SweepStarted, chart_figure,
                                  figure_of, run_sweep, sweep_runs)

METHODS = ["wanda", "magnitude", "sparsegpt"]
EVAL = dict(eval_nwindows=3, eval_seqlen=32)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def calibration(loaded, text_file):
    return windows_from_text(loaded.tokenizer, text_file.read_text(), "file:calib.txt", 4, 32, seed=0)


@pytest.fixture(scope="module")
def swept(loaded, calibration, tmp_path_factory):
    """One sweep of three methods x two sparsities plus 2:4, with the dense weights taken before it."""
    out = tmp_path_factory.mktemp("sweep")
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    specs = sweep_runs(METHODS, [0.3, 0.6], ["unstructured", "2:4"])
    events = list(run_sweep(loaded, specs, *calibration, out_dir=out, **EVAL))
    return out, specs, events, dense


def test_sweep_runs_takes_every_combination_and_one_run_per_nm_pattern():
    specs = sweep_runs(["wanda", "magnitude", "sparsegpt"], [0.3, 0.5, 0.6, 0.7, 0.5], ["unstructured", "2:4", "4:8"])
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys)) == 3 * 4 + 3 * 2
    assert "wanda|2:4|0.5" in keys and "sparsegpt|4:8|0.5" in keys and "magnitude|unstructured|0.7" in keys
    assert not any(k.startswith("wanda|2:4|0.3") for k in keys)
    assert {s.sparsity for s in specs if s.pattern.nm} == {0.5}
    assert sweep_runs(["wanda"], [0.5], ["1:3"])[0].key == "wanda|1:3|0.666667"


def test_sweep_runs_carries_every_option_into_its_runs_and_keys():
    """OWL leaves N:M runs alone (they fix their sparsity); DSnoT and reconstruction apply to every pattern."""
    specs = sweep_runs(["wanda"], [0.5], ["unstructured", "2:4"], ("reconstruct", "owl", "dsnot"))
    assert [s.key for s in specs] == ["wanda+owl+dsnot+reconstruct|unstructured|0.5", "wanda+dsnot+reconstruct|2:4|0.5"]
    assert specs[0].config().options == ("owl", "dsnot", "reconstruct")
    assert specs[1].options == ("dsnot", "reconstruct") and specs[1].config().options == ("dsnot", "reconstruct")
    with pytest.raises(UserError, match="DSnoT"):
        sweep_runs(["magnitude"], [0.5], ["unstructured"], ("dsnot",))


def test_a_run_named_as_a_sweeps_key_reads_back_as_its_config():
    """core.config.recipe, which the benchmarks name their runs with, is the inverse of the keys' METHOD+OPTION=EFFORT."""
    from wanda_gui.core.config import PruneConfig, recipe

    specs = sweep_runs(["wanda", "sparsegpt"], [0.5], ["unstructured"], ("reconstruct", "owl"), {"reconstruct": "thorough"})
    for spec in specs:
        named = PruneConfig(sparsity=0.5, **recipe(spec.key.split("|")[0]))
        wanted = spec.config()
        assert (named.method, named.options, named.efforts) == (wanted.method, wanted.options, wanted.efforts)
    assert recipe("alps+reconstruct=thorough") == {"method": "alps", "options": ("reconstruct",),
                                                   "efforts": {"reconstruct": "thorough"}}


@pytest.mark.parametrize("methods, sparsities, patterns", [
    (["wanda", "nosuch"], [0.5], ["unstructured"]),
    (["wanda"], [0.5], ["3:2"]),
    (["wanda"], [0.5], ["diagonal"]),
    (["wanda"], [1.0], ["unstructured"]),
    (["wanda"], [-0.1], ["unstructured"]),
    (["wanda"], [], ["unstructured"]),
    ([], [0.5], ["unstructured"]),
])
def test_sweep_runs_refuses_bad_input(methods, sparsities, patterns):
    with pytest.raises(UserError):
        sweep_runs(methods, sparsities, patterns)


def test_the_dense_model_is_bit_identical_after_a_sweep(loaded, swept):
    *_, dense = swept
    after = loaded.model.state_dict()
    assert dense.keys() == after.keys()
    assert all(torch.equal(dense[k], after[k]) for k in dense)


def test_results_have_one_row_per_run_plus_dense(swept):
    out, specs, events, _ = swept
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["key"] for r in rows] == ["dense"] + [s.key for s in specs]
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["key"] for r in table] == [r["key"] for r in rows]
    assert all(math.isfinite(float(r["perplexity"])) and float(r["perplexity"]) > 1 for r in table)
    assert rows[0]["achieved_sparsity"] < 0.01
    for spec, row in zip(specs, rows[1:]):
        assert row["target_sparsity"] == pytest.approx(spec.sparsity)
        assert abs(row["achieved_sparsity"] - spec.sparsity) < 0.02, row
        assert row["prune_seconds"] > 0 and row["eval_seconds"] > 0
    assert sum(isinstance(e, RunDone) for e in events) == len(specs)
    assert isinstance(events[0], SweepStarted) and events[0].to_run == len(specs)
    assert isinstance(events[1], DenseMeasured) and events[1].row == rows[0]  # before any run: the chart's dense line
    assert isinstance(events[-1], SweepFinished) and not events[-1].cancelled
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_runs_differ_from_each_other(swept):
    """Each run starts from the dense weights: pruning one copy after another would pile up the zeros."""
    out, *_ = swept
    rows = {r["key"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["wanda|unstructured|0.3"]["achieved_sparsity"] < 0.31
    assert rows["magnitude|unstructured|0.3"]["achieved_sparsity"] < 0.31


def test_a_rerun_runs_nothing_new_and_an_added_spec_runs_alone(loaded, calibration, swept):
    out, specs, _, _ = swept
    before = (out / "results.json").read_text()
    events = list(run_sweep(loaded, specs, *calibration, out_dir=out, **EVAL))
    assert events[0] == SweepStarted(len(specs), 0)
    assert sum(isinstance(e, RunSkipped) for e in events) == len(specs)
    assert not any(isinstance(e, (RunDone, RunStarting)) for e in events)
    assert (out / "results.json").read_text() == before

    more = specs + sweep_runs(["magnitude"], [0.5], ["unstructured"])
    events = list(run_sweep(loaded, more, *calibration, out_dir=out, **EVAL))
    assert [e.row["key"] for e in events if isinstance(e, RunDone)] == ["magnitude|unstructured|0.5"]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["key"] for r in rows] == ["dense"] + [s.key for s in more]


@pytest.mark.parametrize("change", ["seed", "nsamples", "eval_nwindows"])
def test_a_changed_setting_is_refused(loaded, calibration, swept, change):
    out, specs, _, _ = swept
    windows, info = calibration
    settings = dict(EVAL)
    if change == "eval_nwindows":
        settings["eval_nwindows"] += 1
    else:
        info = {**info, change: info[change] + 1}
    named = {"seed": "calibration seed: 0 there, 1 now", "nsamples": "calibration nsamples: 4 there, 5 now",
             "eval_nwindows": "evaluation nwindows: 3 there, 4 now"}[change]
    with pytest.raises(UserError, match=f"other settings \\({named}\\)"):
        list(run_sweep(loaded, specs, windows, info, out_dir=out, **settings))


def test_a_foreign_results_file_is_refused(loaded, calibration, tmp_path):
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a sweep's results"):
        list(run_sweep(loaded, sweep_runs(["magnitude"], [0.5], ["unstructured"]), *calibration, out_dir=tmp_path, **EVAL))


def test_a_stop_keeps_the_finished_runs(loaded, calibration, tmp_path):
    cancel = threading.Event()
    specs = sweep_runs(["magnitude"], [0.3, 0.5, 0.7], ["unstructured"])
    events = []
    for event in run_sweep(loaded, specs, *calibration, out_dir=tmp_path, cancel=cancel, **EVAL):
        events.append(event)
        if isinstance(event, RunDone):
            cancel.set()
    assert isinstance(events[-1], SweepFinished) and events[-1].cancelled
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["key"] for r in rows] == ["dense", specs[0].key]


def test_chart_is_self_contained_log_scale_with_a_trace_per_method(swept):
    out, *_ = swept
    html = (out / "chart.html").read_text()
    for name in ('"name":"wanda"', '"name":"magnitude"', '"name":"sparsegpt"', '"name":"wanda 2:4"',
                 '"name":"dense ('):
        assert name in html, name
    assert '"type":"log"' in html and html.count('class="plotly-graph-div"') == 2 and "prune seconds" in html
    assert not re.search(r"<script[^>]*\bsrc=", html) and len(html) > 1_000_000  # plotly.js inlined: opens offline


def test_chart_draws_nm_runs_as_markers_and_dense_as_a_line():
    rows = [{"key": "wanda|2:4|0.5", "method": "wanda", "pattern": "2:4", "owl": False, "achieved_sparsity": 0.5,
             "perplexity": 150.0, "prune_seconds": 3.0},
            {"key": "wanda|unstructured|0.5", "method": "wanda", "pattern": "unstructured", "owl": False,
             "achieved_sparsity": 0.5, "perplexity": 50.0, "prune_seconds": 4.0}]
    figure = chart_figure(rows, 24.5)
    assert {trace.name: trace.mode for trace in figure.data} == {
        "wanda 2:4": "markers", "wanda": "lines+markers", "dense (24.50)": "lines"}
    options = chart_figure([{**rows[1], "key": "wanda+owl+dsnot|unstructured|0.5", "owl": True, "dsnot": True}], None)
    assert [trace.name for trace in options.data] == ["wanda + OWL + DSnoT"]
    dense = next(t for t in figure.data if t.name.startswith("dense"))
    assert set(dense.y) == {24.5} and figure.layout.yaxis.type == "log"


def test_a_second_chart_puts_quality_against_prune_time():
    """Time beside quality: each run at its prune seconds (log axis), so a user can pick the best method for the
    time they have; the dense line spans the runs' times."""
    rows = [{"key": f"{m}|unstructured|0.5", "method": m, "pattern": "unstructured", "achieved_sparsity": 0.5,
             "perplexity": p, "prune_seconds": t} for m, p, t in (("wanda", 50.0, 60.0), ("sparsegpt", 40.0, 110.0))]
    figure = chart_figure(rows, 24.5, "seconds")
    runs = {t.name: (list(t.x), list(t.y), t.mode) for t in figure.data if not t.name.startswith("dense")}
    assert runs == {"wanda": ([60.0], [50.0], "markers"), "sparsegpt": ([110.0], [40.0], "markers")}
    assert figure.layout.xaxis.type == "log" and "prune seconds" in figure.layout.xaxis.title.text
    dense = next(t for t in figure.data if t.name.startswith("dense"))
    assert list(dense.x) == [60.0, 110.0]


def test_each_run_prunes_a_copy_sharing_the_untouched_tensors(loaded, calibration, tmp_path, monkeypatch):
    """Only the linears to prune are copied: embeddings and norms stay the dense model's own tensors."""
    from wanda_gui.core import runs

    copies = []

    def spy(model, linears):
        linears = list(linears)
        copy = pruning_copy(model, linears)
        copies.append((shared_bytes(copy, model), tensor_bytes(model), sum(l.weight.nbytes for l in linears)))
        return copy

    monkeypatch.setattr(runs, "pruning_copy", spy)
    list(run_sweep(loaded, sweep_runs(["magnitude"], [0.5], ["unstructured"]), *calibration, out_dir=tmp_path, **EVAL))
    [(shared, total, pruned)] = copies
    assert shared == total - pruned


def test_a_pattern_the_model_cannot_take_is_refused_before_anything_runs(loaded, calibration, tmp_path):
    specs = sweep_runs(["magnitude"], [0.5], ["unstructured", "3:5"])  # the tiny model's widths are 64 and 128
    with pytest.raises(UserError, match="3:5"):
        list(run_sweep(loaded, specs, *calibration, out_dir=tmp_path / "out", **EVAL))
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_is_refused(loaded, calibration, tmp_path):
    (tmp_path / "file").write_text("x")
    specs = sweep_runs(["magnitude"], [0.5], ["unstructured"])
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(UserError, match="file"):
            list(run_sweep(loaded, specs, *calibration, out_dir=out, **EVAL))


def test_each_method_runs_the_patterns_it_takes_and_structured_runs_drop_single_weight_options():
    """FLAP is structured only, SparseGPT scores single weights; a structured run keeps reconstruction (it refits the
    smaller linears) and drops DSnoT (it swaps single weights)."""
    specs = sweep_runs(["wanda", "sparsegpt", "flap"], [0.2], ["unstructured", "structured"], ("dsnot", "reconstruct"))
    assert [s.key for s in specs] == ["wanda+dsnot+reconstruct|unstructured|0.2", "wanda+reconstruct|structured|0.2",
                                      "sparsegpt+dsnot+reconstruct|unstructured|0.2", "flap+reconstruct|structured|0.2"]
    with pytest.raises(UserError, match="takes the patterns"):
        sweep_runs(["flap"], [0.5], ["unstructured", "2:4"])
    with pytest.raises(UserError, match="takes the patterns"):
        sweep_runs(["sparsegpt"], [0.5], ["structured"])


def test_a_structured_sweep_with_speed_measures_parameters_and_tokens_per_second(loaded, calibration, tmp_path):
    """Parameters and speed per row: a structured run really has fewer parameters, an unstructured one stores as many
    as dense; a third chart puts perplexity against generation speed, the dense model as a point; a rerun without
    speed is refused (its rows would have none)."""
    specs = sweep_runs(["wanda"], [0.4], ["unstructured", "structured"])
    list(run_sweep(loaded, specs, *calibration, out_dir=tmp_path, speed=True, **EVAL))
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    dense, flat, shrunk = rows["dense"], rows["wanda|unstructured|0.4"], rows["wanda|structured|0.4"]
    assert flat["parameters"] == dense["parameters"] > shrunk["parameters"]
    assert shrunk["achieved_sparsity"] == pytest.approx(0.4, abs=0.05)
    assert all(r[c] > 0 for r in rows.values() for c in ("prefill_tokens_per_second", "generation_tokens_per_second"))
    assert data["header"]["speed"] == {"device": "cpu"}
    html = (tmp_path / "chart.html").read_text()
    assert html.count('class="plotly-graph-div"') == 3 and "generation tokens" in html
    figure = figure_of(data["rows"], "speed")
    points = {t.name: list(t.x) for t in figure.data}
    assert points["dense model"] == [dense["generation_tokens_per_second"]]
    assert points["wanda structured"] == [shrunk["generation_tokens_per_second"]]
    with open(tmp_path / "results.csv", newline="") as f:
        assert int(next(r for r in csv.DictReader(f) if r["key"] == shrunk["key"])["parameters"]) == shrunk["parameters"]
    with pytest.raises(UserError, match="speed"):
        list(run_sweep(loaded, specs, *calibration, out_dir=tmp_path, **EVAL))
