"""The Compare step, the why-it-works view and OWL's per-block targets in a real headless chromium, on tiny models.

What the page draws is read from plotly's own graph div (`gd._fullData`, `gd.layout`) and from the SVG it rendered, so
a chart that is sent but never drawn fails too; and no two of a chart's label, title, legend and annotations may
overlap. Screenshots land in artifacts/screenshots/ (look at them)."""

import json
import re

import pytest
import torch

from conftest import tiny_model
from test_app_browser import ARTIFACTS, Watched, browser, calibrate_with_text, url  # noqa: F401  (fixtures: this module's own server)

pytestmark = pytest.mark.browser

# Plotly's graph div of a gr.Plot: its traces as plotly drew them (typed arrays decoded: name, type, points), layout
# titles, axis types, and what the SVG holds.
FIGURE_JS = """id => {
    const gd = document.querySelector(`#${id} .js-plotly-plot`);
    if (!gd || !gd.data) return null;
    const text = t => (t && (t.text ?? t)) || '';
    const length = xs => xs ? (xs.length ?? Object.keys(xs).length) : 0;
    return {
        traces: (gd._fullData || []).map(t => ({name: t.name || '', type: t.type, n: length(t.z ?? t.x),
                                                x: Array.from(t.x ?? [], Number), y: Array.from(t.y ?? [], Number),
                                                color: t.marker?.color ?? null,
                                                names: Array.from(t.customdata ?? [])})),
        title: text(gd.layout.title),
        annotations: (gd.layout.annotations || []).map(a => a.text || ''),
        axes: Object.fromEntries(Object.entries(gd._fullLayout || {}).filter(([k]) => /^[xy]axis\\d*$/.test(k))
                                 .map(([k, a]) => [k, a.type])),
        drawn: {lines: gd.querySelectorAll('.scatterlayer .trace .js-line').length,
                points: gd.querySelectorAll('.scatterlayer .trace .point').length,
                bars: gd.querySelectorAll('.barlayer .trace .point path').length,
                heatmaps: gd.querySelectorAll('.heatmaplayer image, .hm image').length,
                legend: Array.from(gd.querySelectorAll('.legend .traces .legendtext')).map(e => e.textContent)},
    };
}"""

# The boxes of what a plot writes around its axes: Gradio's label in the corner, the title (with its subtitle), the
# legend's entries and the annotations (subplot titles, captions). Any two of them that overlap are unreadable.
BOXES_JS = """id => {
    const root = document.getElementById(id);
    const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
    const union = bs => bs.length ? [Math.min(...bs.map(b => b[0])), Math.min(...bs.map(b => b[1])),
                                     Math.max(...bs.map(b => b[2])), Math.max(...bs.map(b => b[3]))] : null;
    const boxes = {label: box(root.querySelector('[data-testid="block-label"]'))};
    const title = root.querySelector('.gtitle');
    if (title) boxes.title = box(title);
    const legend = union(Array.from(root.querySelectorAll('.legend .traces')).map(box));
    if (legend) boxes.legend = legend;
    root.querySelectorAll('.annotation').forEach((a, i) => { boxes[`annotation ${i}: ${a.textContent}`] = box(a); });
    return boxes;
}"""

TABLE_JS = """id => Array.from(document.querySelectorAll(`#${id} table tbody tr`))
                  .map(tr => Array.from(tr.querySelectorAll('td')).map(td => td.innerText.trim()))"""


def figure(w: Watched, elem_id: str) -> dict:
    return w.page.evaluate(FIGURE_JS, elem_id)


def wait_figure(w: Watched, elem_id: str, condition: str, timeout: float = 10_000) -> dict:
    """Wait until a plot's figure (as `figure` reads it, named `f` in the JS condition) meets the condition: a status
    line's text shows at once, while plotly draws the figure that came with it a moment later."""
    try:
        w.page.wait_for_function(f"id => {{ const f = ({FIGURE_JS})(id); return !!f && ({condition}); }}", arg=elem_id,
                                 timeout=timeout)
    except Exception:
        raise AssertionError(f"#{elem_id} never met {condition}: {figure(w, elem_id)}") from None
    return figure(w, elem_id)


def shot_of(w: Watched, selector: str, name: str) -> None:
    """A screenshot of one part of the page (the full-page ones are 5000 px tall)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    w.page.locator(selector).first.screenshot(path=str(ARTIFACTS / name))


def assert_readable(w: Watched, elem_id: str) -> None:
    """Nothing a plot writes around its axes (Gradio's label, title, legend, annotations) overlaps anything else."""
    boxes = w.page.evaluate(BOXES_JS, elem_id)
    names = list(boxes)
    clashes = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
               if min(boxes[a][2], boxes[b][2]) - max(boxes[a][0], boxes[b][0]) > 1
               and min(boxes[a][3], boxes[b][3]) - max(boxes[a][1], boxes[b][1]) > 1]
    assert not clashes, (elem_id, clashes, boxes)


def table(w: Watched, elem_id: str = "compare-table") -> list[list[str]]:
    return w.page.evaluate(TABLE_JS, elem_id)


def load_and_calibrate(w: Watched, folder, text_file) -> None:
    """A local tiny model, a text file for calibration, 4 windows of 32 tokens."""
    page = w.page
    page.locator("#source").get_by_text("Local folder", exact=True).click()
    w.fill("folder", folder)
    page.locator("#load").click()
    w.wait_text("load-status", "Loaded")
    calibrate_with_text(w, text_file)


def tick(w: Watched, group: str, wanted: set[str]) -> None:
    """Set a checkbox group to exactly the labels in `wanted`."""
    boxes = w.page.locator(f"#{group} label")
    for i in range(boxes.count()):
        label = boxes.nth(i)
        box = label.locator("input")
        if (label.inner_text().strip() in wanted) != box.is_checked():
            label.click()
    checked = {boxes.nth(i).inner_text().strip() for i in range(boxes.count())
               if boxes.nth(i).locator("input").is_checked()}
    assert checked == wanted, (group, checked)


def click_and_wait(w: Watched, button: str, status: str, needle: str) -> None:
    """Click, then wait until the status line has changed and shows `needle` (it may show it already, from before)."""
    w.page.evaluate("""id => {
        window.changed = false;
        new MutationObserver(() => { window.changed = true; })
            .observe(document.getElementById(id), {childList: true, subtree: true, characterData: true});
    }""", status)
    w.page.locator(f"#{button}").click()
    w.page.wait_for_function("window.changed", timeout=30_000)
    w.wait_text(status, needle)


def pick(w: Watched, dropdown: str, option: str) -> None:
    w.page.locator(f"#{dropdown} input").click()
    w.page.get_by_role("option", name=option, exact=True).click()


def test_compare_fills_in_run_by_run_and_a_taken_run_goes_into_chat_and_export(  # noqa: F811
        browser, url, tiny_model_dir, text_file, tmp_path):  # noqa: F811
    w = Watched(browser, url)
    page = w.page
    assert page.locator("#compare").is_disabled()
    load_and_calibrate(w, tiny_model_dir, text_file)
    tick(w, "compare-methods", {"Wanda", "Magnitude"})
    tick(w, "compare-options", {"OWL"})
    tick(w, "compare-sparsities", {"30%", "60%"})
    w.fill("compare-windows", 2)
    # Watch the table grow and the status line follow the runs: every row count and status shown, in order.
    page.evaluate("""() => {
        window.tableSizes = [];
        window.statuses = [];
        const note = () => {
            const n = document.querySelectorAll('#compare-table table tbody tr').length;
            if (window.tableSizes[window.tableSizes.length - 1] !== n) window.tableSizes.push(n);
            const status = document.getElementById('compare-status').innerText;
            if (window.statuses[window.statuses.length - 1] !== status) window.statuses.push(status);
        };
        for (const id of ['compare-table', 'compare-status'])
            new MutationObserver(note).observe(document.getElementById(id),
                                               {childList: true, subtree: true, characterData: true});
    }""")
    page.locator("#compare").click()
    w.wait_text("compare-status", "✓ Compared 6 runs")
    statuses = page.evaluate("window.statuses")
    assert any(re.match(r"… run [1-6]/6: ", s) for s in statuses), statuses  # each run says what it does
    shot_of(w, ".step:has(#compare)", "compare-1-finished.png")

    rows = table(w)
    assert [r[0] for r in rows] == ["dense", "wanda", "wanda", "wanda + OWL", "wanda + OWL", "magnitude", "magnitude"]
    assert [r[1] for r in rows] == ["–", "30%", "60%", "30%", "60%", "30%", "60%"]
    perplexity = {(r[0], r[1]): float(r[3]) for r in rows}  # a number in every finished row
    assert all(p > 1 for p in perplexity.values()), rows
    assert rows[0][4] == "1.00x"
    sizes = page.evaluate("window.tableSizes")
    assert sizes == sorted(sizes) and sizes[-1] == 7 and len(set(sizes) - {0, 7}) >= 2, sizes  # it filled in

    chart = wait_figure(w, "compare-chart", "f.traces.length === 4 && f.drawn.lines === 4")
    dense = perplexity[("dense", "–")]
    assert {t["name"]: t["n"] for t in chart["traces"]} == {"wanda": 2, "wanda + OWL": 2, "magnitude": 2,
                                                             f"dense ({dense:.2f})": 2}
    wanda = next(t for t in chart["traces"] if t["name"] == "wanda")
    assert sorted(wanda["y"]) == pytest.approx(sorted([perplexity[("wanda", "30%")], perplexity[("wanda", "60%")]]),
                                               abs=0.006)
    assert chart["axes"]["yaxis"] == "log" and "Perplexity against sparsity" in chart["title"]
    assert chart["drawn"]["lines"] == 4 and chart["drawn"]["points"] >= 6  # drawn, not only sent
    assert sorted(chart["drawn"]["legend"]) == sorted(t["name"] for t in chart["traces"])
    assert_readable(w, "compare-chart")
    page.set_viewport_size({"width": 700, "height": 1000})  # a narrow window: plotly lays the chart out again
    page.wait_for_timeout(1000)
    assert_readable(w, "compare-chart")
    shot_of(w, "#compare-chart", "compare-1-narrow.png")
    page.set_viewport_size({"width": 1400, "height": 1000})
    files = page.locator("#compare-files").inner_text()
    assert "results.csv" in files and "chart.html" in files

    # Take the OWL run at 60% into the session: pruned again, shown live, then in chat and export.
    page.locator("#compare-pick input").click()
    options = [o.strip() for o in page.get_by_role("option").all_inner_texts()]
    label = next(o for o in options if o.startswith("wanda + OWL · 60%"))
    assert len(options) == 6 and f"perplexity {perplexity[('wanda + OWL', '60%')]:.2f}" in label, options
    page.get_by_role("option", name=label, exact=True).click()
    page.locator("#take").click()
    w.wait_text("compare-status", "is this session's pruned model now")
    assert w.text("prune-status").startswith("✓ Pruned")
    assert "wanda + OWL · unstructured · target 60.0%" in w.text("results")
    blocks = wait_figure(w, "block-plot", "f.traces.some(t => t.name === 'OWL target')")
    owl = next(t for t in blocks["traces"] if t["name"] == "OWL target")
    assert owl["n"] == 2 and sum(owl["y"]) / 2 == pytest.approx(0.6, abs=0.05)  # a target per block, mean the run's
    assert page.locator("#owl-plot .js-plotly-plot").is_visible()
    wait_figure(w, "why-plot", "f.title.startsWith('Why it works: model.layers.1.mlp.down_proj')")
    for plot in ("block-plot", "map-plot", "why-plot", "owl-plot"):
        assert_readable(w, plot)
    shot_of(w, ".step:has(#block-plot)", "compare-2-taken.png")

    w.fill("nwindows", 2)
    page.locator("#eval").click()
    w.wait_text("perplexity", "Pruned / dense")
    measured = float(re.search(r"pruned\s+([\d.]+)", w.text("perplexity")).group(1))
    assert measured == pytest.approx(perplexity[("wanda + OWL", "60%")], abs=0.006)  # the very run the table measured

    w.fill("prompt", "Hello there")
    page.locator("#send").click()
    w.wait_text("pruned-stats", "done")
    assert page.locator("#pruned-chat").inner_text().count("Hello there") == 1

    out = tmp_path / "export"
    w.fill("export-dir", out)
    page.locator("#export").click()
    w.wait_text("export-status", "Exported")
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["method"] == "wanda" and report["target_sparsity"] == 0.6, report
    assert w.outside == [], w.outside
    assert w.errors == [], w.errors


def test_stop_keeps_the_finished_runs_in_table_chart_and_picker(browser, url, tiny_model_dir, text_file):  # noqa: F811
    w = Watched(browser, url)
    page = w.page
    load_and_calibrate(w, tiny_model_dir, text_file)
    tick(w, "compare-methods", {"Wanda", "Magnitude", "SparseGPT", "RIA"})
    tick(w, "compare-sparsities", {f"{p}0%" for p in range(1, 10)})  # 36 runs: far more than finish before Stop
    w.fill("compare-windows", 1)
    page.locator("#compare").click()
    page.wait_for_function("document.querySelectorAll('#compare-table table tbody tr').length >= 2", timeout=60_000)
    page.locator("#compare-stop").click()
    w.wait_text("compare-status", "■ Stopped")
    finished = int(re.search(r"the (\d+) finished run", w.text("compare-status")).group(1))
    assert 1 <= finished < 36, w.text("compare-status")
    rows = table(w)
    assert len(rows) == 1 + finished and all(float(r[3]) > 1 for r in rows), rows
    chart = wait_figure(w, "compare-chart", f"f.traces.reduce((n, t) => n + t.n, 0) === {finished} + 2")  # + dense
    runs = [t for t in chart["traces"] if not t["name"].startswith("dense")]
    assert sum(t["n"] for t in runs) == finished and chart["drawn"]["points"] >= finished
    page.locator("#compare-pick input").click()
    assert len(page.get_by_role("option").all_inner_texts()) == finished
    page.keyboard.press("Escape")
    assert page.locator("#take").is_enabled() and page.locator("#compare").is_enabled()
    assert page.locator("#compare-stop").is_disabled()
    shot_of(w, ".step:has(#compare)", "compare-4-stopped.png")
    assert w.errors == [], w.errors


@pytest.fixture(scope="module")
def outlier_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny LLaMA with one huge input feature (7) into block 1's attention: Wanda's textbook case."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[7] = 300.0
    path = tmp_path_factory.mktemp("outlier-llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_why_view_follows_the_pruned_linear_and_owl_draws_its_targets(browser, url, outlier_model_dir,  # noqa: F811
                                                                      text_file):
    w = Watched(browser, url)
    page = w.page
    load_and_calibrate(w, outlier_model_dir, text_file)
    tick(w, "options", {"OWL"})
    # Every title the why view and the maps show while the run goes, side by side.
    page.evaluate("""() => {
        window.seen = [];
        const title = id => document.querySelector(`#${id} .js-plotly-plot`)?.layout?.title?.text || '';
        window.watch = setInterval(() => {
            const pair = [title('why-plot'), title('map-plot')];
            const last = window.seen[window.seen.length - 1];
            if (!last || last[0] !== pair[0] || last[1] !== pair[1]) window.seen.push(pair);
        }, 20);
    }""")
    page.locator("#start").click()
    w.wait_text("prune-status", "Pruned")
    page.evaluate("clearInterval(window.watch)")
    seen = page.evaluate("window.seen")

    def linears(column: int) -> list[str]:
        names = [m.group(0) for pair in seen if (m := re.search(r"model\.layers\.\d\.\w+\.\w+", pair[column]))]
        return [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    # Live, the why view shows the linear being pruned: only linears the maps beside it showed too (how many of the
    # run's draws the browser gets to render depends on timing), and at the end the last one pruned.
    assert linears(0) and set(linears(0)) <= set(linears(1)), seen
    assert linears(0)[-1] == linears(1)[-1] == "model.layers.1.mlp.down_proj", seen

    why = wait_figure(w, "why-plot", "f.title.startsWith('Why it works: model.layers.1.mlp.down_proj')")
    maps = figure(w, "map-plot")
    assert "model.layers.1.mlp.down_proj" in maps["title"]  # the same linear as the maps beside it
    # OWL: its per-block targets on the block chart, a stepped line drawn over the bars; its own chart beside.
    blocks = wait_figure(w, "block-plot", "f.drawn.bars === 2 && f.traces.some(t => t.name === 'OWL target')")
    owl = next(t for t in blocks["traces"] if t["name"] == "OWL target")
    assert owl["n"] == 2 and sum(owl["y"]) / 2 == pytest.approx(0.5, abs=0.05) and owl["y"][0] != owl["y"][1]
    assert "OWL target" in blocks["drawn"]["legend"] and blocks["drawn"]["bars"] == 2
    chosen = wait_figure(w, "owl-plot", "f.drawn.bars === 2")
    assert [t["name"] for t in chosen["traces"]] == ["chosen sparsity", "outlier ratio (%)", "run target 50%"]
    assert chosen["traces"][0]["y"] == pytest.approx(owl["y"]) and chosen["drawn"]["bars"] == 2
    shot_of(w, ".step:has(#block-plot)", "why-1-owl-run.png")

    # Any pruned linear, picked afterwards: block 1's q_proj reads the planted outlier, and the view marks exactly it.
    pick(w, "layer-pick", "model.layers.1.self_attn.q_proj")
    why = wait_figure(w, "why-plot", "f.title.includes('model.layers.1.self_attn.q_proj') && f.drawn.bars === 14")
    by_name = {t["name"]: t for t in why["traces"]}
    assert by_name["outliers (1)"]["x"] == [7] and why["drawn"]["points"] == 1  # one red marker, drawn
    assert any("◆ 1 outlier" in a for a in why["annotations"])
    assert why["axes"]["yaxis"] == "log" and why["drawn"]["heatmaps"] == 1
    assert any("of positions differ" in a for a in why["annotations"])
    bars = next(t for t in why["traces"] if t["type"] == "bar")
    assert bars["n"] == 14 and why["drawn"]["bars"] == 14  # one per pruned linear
    highlighted = [name for name, c in zip(bars["names"], bars["color"]) if c != "#64748b"]
    assert highlighted == ["model.layers.1.self_attn.q_proj"], bars  # the picked one stands out
    wait_figure(w, "map-plot", "f.title.includes('model.layers.1.self_attn.q_proj')")
    shot_of(w, "#why-plot", "why-2-picked-outlier.png")
    for plot in ("block-plot", "map-plot", "why-plot", "owl-plot"):
        assert_readable(w, plot)
    page.set_viewport_size({"width": 700, "height": 1000})
    page.wait_for_timeout(1000)
    shot_of(w, ".step:has(#block-plot)", "why-3-narrow.png")
    for plot in ("block-plot", "map-plot", "why-plot", "owl-plot"):
        assert_readable(w, plot)
    page.set_viewport_size({"width": 1400, "height": 1000})

    # A run without OWL: no targets left over from the one before.
    tick(w, "options", set())
    click_and_wait(w, "start", "prune-status", "Pruned")
    w.wait_text("results", "wanda · unstructured")  # the results may follow the status line by an update
    assert "OWL" not in w.text("results")
    wait_figure(w, "block-plot", "f.drawn.bars === 2 && !f.traces.some(t => t.name === 'OWL target')")
    assert not page.locator("#owl-plot").is_visible()
    assert w.outside == [], w.outside
    assert w.errors == [], w.errors
