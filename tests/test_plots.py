"""The live view's figures: nothing drawn over the plot area or the axis titles, maps in real indices that say how
they were pooled and what bright columns mean, small payloads. docs/check_plots.py renders them for the eye."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wanda_gui.app import plots
from wanda_gui.core.engine import pooled
from wanda_gui.core.errors import UserError


def down_proj_maps(method: str = "wanda"):
    """Maps of a 576x1536 linear (the built-in model's down_proj shape) pooled the way the engine pools them."""
    torch.manual_seed(0)
    score = torch.rand(576, 1536)
    return plots.layer_maps("model.layers.3.mlp.down_proj", (576, 1536), 0.5, pooled(score), pooled(score > 0.5),
                            method=method)


def inside_plot_area(annotation) -> bool:
    """Whether an annotation's anchor lies in the plot area (data coordinates, or paper coordinates within [0, 1])."""
    def inside(ref, value, shift):
        return not str(ref).startswith("paper") or (0 < value < 1 or (value in (0, 1) and shift == 0))
    return inside(annotation.xref, annotation.x, annotation.xshift or 0) and \
        inside(annotation.yref, annotation.y, annotation.yshift or 0)


def test_block_chart_legend_sits_above_the_plot_not_on_the_axis_title():
    fig = plots.block_chart(30, {0: 0.5, 1: 0.5}, {0: 1.0, 1: 1.2}, 0.5)
    legend = fig.layout.legend
    assert legend.orientation == "h" and legend.y >= 1 and legend.yanchor == "bottom"
    assert fig.layout.margin.t >= 100  # room for title, subtitle and legend (Gradio raises a titled figure's to 100)


def test_block_chart_target_is_labelled_outside_the_bars():
    fig = plots.block_chart(30, {i: 0.5 for i in range(12)}, {i: 1.0 for i in range(12)}, 0.5)
    assert not [a.text for a in fig.layout.annotations if inside_plot_area(a)]
    target = [t for t in fig.data if t.name == "target 50%"]
    assert len(target) == 1 and target[0].showlegend is not False
    assert list(target[0].y) == [0.5, 0.5] and list(target[0].x) == [-0.5, 29.5] and target[0].line.dash == "dot"


def test_block_chart_without_target_has_no_target_entry():
    fig = plots.block_chart(1, {}, {}, None)
    assert [t.name for t in fig.data] == ["sparsity", "seconds"]


def test_block_chart_title_says_what_bars_and_line_are():
    title = plots.block_chart(30, {0: 0.5}, {0: 1.0}, 0.5).layout.title
    assert "sparsity and time" in title.text and "bars:" in title.text and "line: seconds" in title.text
    assert title.yref == "container" and title.yanchor == "top"


def test_maps_axes_say_how_many_rows_and_columns_a_cell_averages():
    fig = down_proj_maps()
    assert fig.layout.yaxis.title.text == "output row i<br>(each cell averages 5 rows)"  # 576 / 128 = 4.5: windows of 5
    texts = [a.text for a in fig.layout.annotations]
    assert "input feature j (each cell averages 12 columns)" in texts  # 1536 / 128


@pytest.mark.parametrize("n, cells", [(1536, 128), (576, 128), (100, 64), (64, 64)])
def test_maps_coordinates_are_the_mean_index_each_cell_covers(n, cells):
    """Adaptive average pooling of the indices 0..n-1 gives each cell's mean index: the ticks read in real indices."""
    expected = F.adaptive_avg_pool1d(torch.arange(n, dtype=torch.float64)[None, None], cells)[0, 0].numpy()
    np.testing.assert_allclose(plots.cell_centres(n, cells), expected, atol=1e-4)


def test_maps_heatmaps_are_placed_in_real_row_and_input_indices():
    fig = down_proj_maps()
    for heatmap in fig.data:
        assert heatmap.x[0] == pytest.approx(5.5) and heatmap.x[-1] == pytest.approx(1529.5)
        assert heatmap.y[0] == pytest.approx(2) and heatmap.y[-1] == pytest.approx(573)


def test_pooling_words_for_uneven_and_unpooled_windows():
    assert plots.pooling_words(100, 64, "row") == "each cell averages 2–3 rows"
    assert plots.pooling_words(64, 64, "column") == "one cell per column"


def test_maps_caption_says_what_bright_columns_mean_below_the_axis_title():
    fig = down_proj_maps()
    by_text = {a.text: a for a in fig.layout.annotations}
    caption = next(a for text, a in by_text.items() if text.startswith("Bright columns"))
    assert "large activations (||X_j||)" in caption.text and "Wanda keeps and magnitude pruning ignores" in caption.text
    axis = by_text["input feature j (each cell averages 12 columns)"]
    for note in (axis, caption):  # under the plot area, the caption under the axis title, both inside the margin
        assert note.yref == "paper" and note.y == 0 and note.yanchor == "top"
    line = 1.3 * axis.font.size
    assert caption.yshift <= axis.yshift - line
    assert fig.layout.margin.b >= -caption.yshift + caption.text.count("<br>") * line + line
    assert axis.yshift <= -26  # below the x tick labels


def test_maps_caption_for_magnitude_says_the_score_ignores_activations():
    texts = [a.text for a in down_proj_maps("magnitude").layout.annotations]
    assert any("ignores activations" in t for t in texts)
    assert not any("Bright columns" in t for t in texts)
    assert "score = |W|;" in down_proj_maps("magnitude").layout.title.text


def test_maps_colorbars_stay_beside_their_panels_and_below_the_subplot_titles():
    fig = down_proj_maps()
    left, right = fig.layout.xaxis.domain, fig.layout.xaxis2.domain
    first, second = (h.colorbar for h in fig.data)
    assert left[1] < first.x < right[0] and second.x > right[1]
    for bar in (first, second):
        assert 0 <= bar.y - bar.len / 2 and bar.y + bar.len / 2 <= 1  # subplot titles sit above y = 1
    assert all(a.y >= 1 for a in fig.layout.annotations if a.text in ("score, log10", "weights kept (white: all)"))


def test_maps_payload_is_float32_and_at_most_128_square():
    fig = down_proj_maps()
    for heatmap in fig.data:
        assert heatmap.z.dtype == np.float32 and heatmap.z.shape == (128, 128)
        assert heatmap.x.dtype == np.float32 and heatmap.y.dtype == np.float32
    assert len(fig.to_json()) < 240_000


def test_maps_refuse_an_unknown_method_clearly():
    with pytest.raises(UserError, match="Unknown method"):
        down_proj_maps("nonsense")


def test_log_axes_over_decades_label_only_powers_of_ten():
    """Plotly labels the 2s and 5s between decades of a wide log axis as bare digits ("2" for 20000)."""
    wide = plots.log_ticks([21.1, 45.5, 17538.6])
    assert wide["dtick"] == 1 and wide["minor"]["dtick"] == "D1"
    assert plots.log_ticks([513.0, 516.2]) == {} and plots.log_ticks([]) == {}  # within a decade: plotly's own ticks
    rows = [{"key": "dense", "perplexity": 21.1, "achieved_sparsity": 0.0},
            {"key": "wanda|unstructured|0.7", "method": "wanda", "pattern": "unstructured", "target_sparsity": 0.7,
             "achieved_sparsity": 0.7, "perplexity": 587.0, "prune_seconds": 3.2}]
    assert plots.comparison_chart(rows).layout.yaxis.dtick == 1


def test_a_live_run_sends_its_maps_at_most_once_a_second_and_coarse(monkeypatch):
    """A run pruning a linear every 0.1 s for 4 s: status lines about 4 a second, maps about once a second, each
    64 x 64 cells (a quarter of the picker's): the page stays responsive (at 4 maps a second of 128 x 128 it froze)."""
    from wanda_gui.app.pool import ModelPool
    from wanda_gui.app.steps import live
    from wanda_gui.app.workspace import Workspace
    from wanda_gui.core import events as ev

    clock = [0.0]
    monkeypatch.setattr(live.time, "perf_counter", lambda: clock[0])
    score = np.random.default_rng(0).random((128, 128), dtype=np.float32)

    def events():
        yield ev.RunStarted("m", "wanda", "unstructured", 0.5, [[f"l{i}" for i in range(40)]], 40, 4, 32, 2, "s")
        for i in range(1, 41):
            clock[0] += 0.1
            yield ev.LinearPruned(0, f"l{i}", (576, 1536), 0.5, score, score, 0.1, i, 40)

    shown = list(live.prune_stream(Workspace(ModelPool()), events(), "wanda"))
    statuses = [s for s in shown if "linear" in str(s.get("prune_status", ""))]
    maps = [s["map_plot"] for s in shown if "map_plot" in s and s["map_plot"].data]  # not the first, cleared one
    assert 12 <= len(statuses) <= 17 and 4 <= len(maps) <= 5, (len(statuses), len(maps))
    assert all(np.asarray(m.data[0].z).shape == (64, 64) for m in maps)
    assert len(maps[-1].to_json()) < 80_000
