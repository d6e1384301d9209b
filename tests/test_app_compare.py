"""The Compare step through the app's API on a tiny model: runs fill the chart and the table one by one, Stop keeps
the finished ones, and a finished run taken into the session prunes to the very masks the comparison measured."""

import json
import re

import pytest
from gradio_client import Client, handle_file

from test_app_api import error_of, load_tiny, serving
from wanda_gui.app.common import BUTTONS
from wanda_gui.app.steps.compare import COMPARE_OUTPUTS, TAKE_OUTPUTS
from wanda_gui.app.steps.method import CALIBRATION


@pytest.fixture(scope="module")
def app():
    with serving() as demo:
        yield demo


def named(values, names):
    """An API result by output name (buttons are not part of the API's outputs)."""
    return dict(zip([n for n in names if n not in BUTTONS], values))


def latest(job, names) -> dict:
    """What the page shows once a streaming call ends: each output's last value (an update that changes nothing
    leaves the one before)."""
    shown = {}
    for values in job.outputs():
        shown.update({k: v for k, v in named(values, names).items() if not (isinstance(v, dict) and
                                                                            v.get("__type__") == "update")})
    return shown


def compare_args(files, **overrides):
    args = dict(methods=["Wanda", "Magnitude"], options=[], baseline=True, sparsities=[0.3, 0.6],
                patterns=["unstructured"], nwindows=2, speed=False, calib_kind=CALIBRATION[1],
                files=[handle_file(str(f)) for f in files], dataset="", nsamples=4, seqlen=32, seed=0)
    args.update(overrides)
    return list(args.values())


def traces(plot) -> dict[str, int]:
    """Points per trace of a plot's figure, by trace name."""
    def count(xs):
        return xs.get("shape", [len(xs.get("bdata", ""))])[0] if isinstance(xs, dict) else len(xs)
    return {t["name"]: count(t["x"]) for t in json.loads(plot["plot"])["data"]}


def table_runs(table: str) -> list[str]:
    """The run names of the table's body rows."""
    return [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]


def test_two_methods_by_two_sparsities_fill_in_and_a_run_goes_into_the_chat(app, tiny_model_dir, text_file):
    client = Client(app.local_url, verbose=False)
    load_tiny(client, tiny_model_dir)
    job = client.submit(*compare_args([text_file]), api_name="/compare")
    shown = [named(u, COMPARE_OUTPUTS) for u in job]
    final = named(job.result(), COMPARE_OUTPUTS)
    assert final["compare_status"].startswith("✓ Compared 4 runs"), final["compare_status"]
    assert table_runs(final["compare_table"]) == ["dense", "wanda", "wanda", "magnitude", "magnitude"]
    assert traces(final["compare_chart"]) == {"wanda": 2, "magnitude": 2, "dense (" + re.search(
        r"\| dense \| – \| [\d.]+% \| \*\*([\d.]+)\*\*", final["compare_table"]).group(1) + ")": 2}
    assert json.loads(final["compare_chart"]["plot"])["layout"]["yaxis"]["type"] == "log"
    timed = json.loads(final["compare_time_chart"]["plot"])  # each run at its prune seconds, as the table says
    seconds = sorted(round(x, 1) for t in timed["data"] if not t["name"].startswith("dense") for x in t["x"])
    assert timed["layout"]["xaxis"]["type"] == "log" and seconds == sorted(
        float(r.split("|")[6]) for r in final["compare_table"].splitlines()[3:])
    # The table grew run by run while the comparison went on, and the status line followed each run's linears.
    sizes = [len(table_runs(s["compare_table"])) for s in shown if isinstance(s["compare_table"], str)
             and s["compare_table"]]
    assert sizes == sorted(sizes) and {1, 2, 3, 4, 5} <= set(sizes)
    assert any(re.search(r"run 2/4: .* · linear \d+/14", s["compare_status"] or "") for s in shown)
    files = final["compare_files"]
    assert files["visible"] and sorted(p.rsplit("/", 1)[-1] for p in files["value"]) == ["chart.html", "results.csv"]

    taken = "wanda|unstructured|0.6"
    job = client.submit(taken, api_name="/take")
    job.result()
    result = latest(job, TAKE_OUTPUTS)
    row = next(line for line in final["compare_table"].splitlines() if line.startswith("| wanda | 60%")).split("|")
    achieved, table_ppl = row[3].strip(), float(row[4].strip(" *"))
    assert result["prune_status"].startswith("✓ Pruned") and f"achieved sparsity {achieved}" in result["prune_status"]
    assert "is this session's pruned model now" in result["compare_status"]
    assert "**wanda · unstructured** · target 60.0%" in result["results"]
    # The same setting on the same calibration windows: the same masks, so the same perplexity as in the table.
    ppl = client.predict(2, api_name="/evaluate")
    assert float(re.search(r"\| pruned \| \*\*([\d.]+)\*\*", ppl).group(1)) == pytest.approx(table_ppl, abs=0.006)
    _, dense, pruned, _, pruned_stats, _ = client.predict("Hello there", [], [], 6, True, 0.7, 0.9, 0, api_name="/chat")
    assert [m["role"] for m in pruned] == ["user", "assistant"] and "6 tokens" in pruned_stats
    client.close()


def test_stop_keeps_the_finished_runs(tiny_model_dir, text_file, tmp_path):
    """Stop between runs (set when the first run is done, so no race with how fast the runs go): the finished ones
    stay in the comparison and in its results, and any of them can still be taken into the session."""
    from wanda_gui.app.pool import ModelPool
    from wanda_gui.app.workspace import Workspace
    from wanda_gui.core import sweep

    ws = Workspace(ModelPool())
    ws.load(str(tiny_model_dir), "cpu", None)
    specs = sweep.sweep_runs(["magnitude"], [i / 10 for i in range(1, 10)], ["unstructured"])
    events = []
    for event in ws.compare(specs, [str(text_file)], 4, 32, 0, 2, tmp_path / "cmp"):
        events.append(event)
        if isinstance(event, sweep.RunDone):
            ws.cancel.set()
    assert isinstance(events[-1], sweep.SweepFinished) and events[-1].cancelled
    finished = [row["key"] for row in ws.comparison.finished]
    assert finished == [specs[0].key]  # the run under way when Stop came finished; nothing after it started
    assert [row["key"] for row in json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"]][1:] == finished
    taken = list(ws.take(specs[0].key))
    assert ws.summary is not None and ws.summary.achieved_sparsity == pytest.approx(0.1, abs=0.02) and taken


def test_refusals_are_answered_in_words(app, tiny_model_dir, text_file):
    client = Client(app.local_url, verbose=False)
    assert "Load a model first" in error_of(lambda: client.predict(*compare_args([text_file]), api_name="/compare"))
    load_tiny(client, tiny_model_dir)
    assert "at least one method" in error_of(lambda: client.predict(*compare_args([text_file], methods=[]),
                                                                    api_name="/compare"))
    assert "Pick a finished run" in error_of(lambda: client.predict(None, api_name="/take"))
    # Options go only where they apply, and the status line says what was left out.
    job = client.submit(*compare_args([text_file], options=["DSnoT"], baseline=False, sparsities=[0.5], nwindows=1),
                        api_name="/compare")
    final = named(job.result(), COMPARE_OUTPUTS)
    assert table_runs(final["compare_table"]) == ["dense", "wanda + DSnoT", "magnitude"]
    assert "Magnitude reads no activations" in final["compare_status"]
    client.close()


def test_structured_runs_with_speed_show_parameters_and_a_speed_chart(app, tiny_model_dir, text_file):
    """Structured beside unstructured, each method on the patterns it takes (FLAP structured only, said so), the
    table with parameters and generation speed against dense, and the chart of perplexity against speed."""
    client = Client(app.local_url, verbose=False)
    load_tiny(client, tiny_model_dir)
    job = client.submit(*compare_args([text_file], methods=["Wanda", "FLAP"], sparsities=[0.4], nwindows=1,
                                      patterns=["unstructured", "structured"], speed=True), api_name="/compare")
    job.result()
    final = latest(job, COMPARE_OUTPUTS)
    assert final["compare_status"].startswith("✓ Compared 3 runs"), final["compare_status"]
    assert "FLAP does not take unstructured" in final["compare_status"]
    assert table_runs(final["compare_table"]) == ["dense", "wanda", "wanda structured", "flap structured"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in final["compare_table"].splitlines()[2:]}
    parameters = {name: float(cells[6].removesuffix(" M")) for name, cells in rows.items()}
    assert parameters["wanda"] == parameters["dense"] > parameters["wanda structured"]
    assert rows["dense"][8] == "1.00x" and all(float(cells[7]) > 0 for cells in rows.values())
    chart = named(job.outputs()[-1], COMPARE_OUTPUTS)["compare_speed_chart"]  # shown only once speed is measured
    assert chart["visible"]
    speed = traces(chart["value"])
    assert speed["dense model"] == 1 and speed["wanda structured"] == 1 and speed["flap structured"] == 1
    client.close()
