"""Plotly figures for the live view: per-block sparsity and time, and a linear's score and mask maps.

Gradio's plot component raises a titled figure's top margin to at least 100 px, so every figure here keeps its title,
subtitle and legend inside a top margin of exactly TOP px, and nothing else in it."""

from __future__ import annotations

import dataclasses

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.methods import get_method
from ..core.sweep import AXES, figure_of

ACCENT = "#0f766e"
SECOND = "#f59e0b"
MUTED = "#64748b"
OUTLIER = "#dc2626"
TOP = 100
LAYOUT = dict(margin=dict(l=50, r=50, t=40, b=40), height=320, template="plotly_white",
              font=dict(family="system-ui, sans-serif", size=12))


def titled(text: str, subtitle: str) -> dict:
    """A left-aligned title with a smaller second line, below the corner where Gradio draws the plot's label (26 px
    tall; with pad 44 the title's box starts 30 px down: tests/test_app_browser_compare.py checks they never meet)."""
    return dict(text=f"{text}<br><span style='font-size:11px;color:{MUTED}'>{subtitle}</span>", x=0, xref="paper",
                xanchor="left", y=1, yref="container", yanchor="top", pad=dict(t=44), font=dict(size=15))


def block_chart(blocks: int, sparsity: dict[int, float], seconds: dict[int, float], target: float | None) -> go.Figure:
    """Achieved sparsity (bars) and seconds (line) per decoder block, filling in as blocks finish."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    done, span = sorted(sparsity), [-0.5, max(blocks, 1) - 0.5]
    fig.add_bar(x=done, y=[sparsity[i] for i in done], name="sparsity", marker_color=ACCENT,
                hovertemplate="block %{x}<br>sparsity %{y:.2%}<extra></extra>")
    fig.add_scatter(x=done, y=[seconds[i] for i in done], name="seconds", mode="lines+markers",
                    line=dict(color=SECOND), secondary_y=True, hovertemplate="block %{x}<br>%{y:.2f} s<extra></extra>")
    if target is not None:  # a legend entry, not an annotation: its label can never sit on the bars
        fig.add_scatter(x=span, y=[target, target], name=f"target {target:.0%}", mode="lines", hoverinfo="skip",
                        line=dict(color=MUTED, dash="dot", width=1.5))
    fig.update_layout(**{**LAYOUT, "margin": dict(l=60, r=60, t=TOP, b=45)},
                      title=titled("Per-block sparsity and time",
                                   "bars: share of each block's weights set to zero · line: seconds per block"),
                      legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom", font=dict(size=11)),
                      bargap=0.15)
    fig.update_xaxes(title=dict(text="decoder block", standoff=6), range=span, dtick=max(1, blocks // 15))
    fig.update_yaxes(title="sparsity", range=[0, 1], tickformat=".0%", secondary_y=False)
    fig.update_yaxes(title="seconds", rangemode="tozero", tickmode="auto", nticks=5, secondary_y=True, showgrid=False)
    return fig


def widths_chart(blocks: int, shrunk: dict[int, tuple[int, int, int, int]]) -> go.Figure:
    """A structured run: each block's kept share of MLP channels and of attention heads (bars, counts on hover),
    filling in as blocks are shrunk. shrunk: block -> (kept channels, channels, kept heads, heads)."""
    done, span = sorted(shrunk), [-0.5, max(blocks, 1) - 0.5]
    fig = go.Figure()
    for name, kept, total, color in (("MLP channels", 0, 1, ACCENT), ("attention heads", 2, 3, SECOND)):
        fig.add_bar(x=done, y=[shrunk[i][kept] / shrunk[i][total] for i in done], name=f"{name} kept",
                    marker_color=color, customdata=[[shrunk[i][kept], shrunk[i][total]] for i in done],
                    hovertemplate=f"block %{{x}}<br>%{{customdata[0]}} of %{{customdata[1]}} {name} kept<extra></extra>")
    fig.update_layout(**{**LAYOUT, "margin": dict(l=60, r=60, t=TOP, b=45)},
                      title=titled("Kept channels and heads per block",
                                   "structured: the removed ones are gone, the linears are smaller"),
                      legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom", font=dict(size=11)),
                      barmode="group", bargap=0.15)
    fig.update_xaxes(title=dict(text="decoder block", standoff=6), range=span, dtick=max(1, blocks // 15))
    fig.update_yaxes(title="kept", range=[0, 1], tickformat=".0%")
    return fig


def cell_windows(n: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of the indices each cell of an adaptive average pool of n into `cells` covers."""
    i = np.arange(cells)
    return (i * n) // cells, -((-(i + 1) * n) // cells)


def cell_centres(n: int, cells: int) -> np.ndarray:
    """Each pooled cell's centre as an index of the original matrix: the axes read in real rows and inputs."""
    start, end = cell_windows(n, cells)
    return ((start + end - 1) / 2).astype(np.float32)


def pooling_words(n: int, cells: int, unit: str) -> str:
    """'each cell averages 12 columns' (or '4–5 rows' where windows differ), 'one cell per row' when not pooled."""
    start, end = cell_windows(n, cells)
    low, high = int((end - start).min()), int((end - start).max())
    if high == 1:
        return f"one cell per {unit}"
    return f"each cell averages {low if low == high else f'{low}–{high}'} {unit}s"


def caption(method: str) -> str:
    """What bright columns of the score map mean for this method (magnitude's score has no activations in it)."""
    m = get_method(method)
    if not m.needs_activations:
        return ("The magnitude score |W| ignores activations: bright cells are large weights,<br>"
                "and no input feature is kept for how strongly it fires.")
    who = m.description.split(":")[0]
    return ("Bright columns: input features with large activations (||X_j||),<br>"
            f"which {who} keeps and magnitude pruning ignores.")


def layer_maps(name: str, shape: tuple[int, int], sparsity: float, score_map: np.ndarray, mask_map: np.ndarray,
               method: str = "wanda") -> go.Figure:
    """The pooled score map (log scale: scores are heavy-tailed) beside the share of weights kept, in real indices."""
    rows, cols = shape
    y, x = cell_centres(rows, score_map.shape[0]), cell_centres(cols, score_map.shape[1])
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.2,
                        subplot_titles=("score, log10", "weights kept (white: all)"))
    hover = "output row ≈ %{y:.0f}, input j ≈ %{x:.0f}<br>"
    log_score = np.log10(np.maximum(score_map, 1e-12)).astype(np.float32)
    fig.add_heatmap(z=log_score, x=x, y=y, colorscale="Viridis", colorbar=dict(x=0.41, len=1, y=0.5, thickness=10),
                    row=1, col=1, hovertemplate=hover + "log10 score %{z:.2f}<extra></extra>")
    fig.add_heatmap(z=mask_map.astype(np.float32), x=x, y=y, colorscale="Greys", reversescale=True, zmin=0, zmax=1,
                    colorbar=dict(x=1.01, len=1, y=0.5, thickness=10, tickformat=".0%"), row=1, col=2,
                    hovertemplate=hover + "kept %{z:.0%}<extra></extra>")
    fig.update_yaxes(autorange="reversed", title=dict(text=f"output row i<br>({pooling_words(rows, len(y), 'row')})",
                                                      font=dict(size=11)), row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_annotations(font=dict(size=12))
    fig.add_annotation(text=f"input feature j ({pooling_words(cols, len(x), 'column')})", x=0.5, y=0, yshift=-28,
                       xref="paper", yref="paper", xanchor="center", yanchor="top", showarrow=False, font=dict(size=11))
    fig.add_annotation(text=caption(method), x=0.5, y=0, yshift=-50, xref="paper", yref="paper", xanchor="center",
                       yanchor="top", align="center", showarrow=False, font=dict(size=11, color=MUTED))
    label = get_method(method).score_label
    fig.update_layout(**{**LAYOUT, "height": 460, "margin": dict(l=75, r=55, t=TOP, b=95)},
                      title=titled(f"{name}  {rows}x{cols}, {sparsity:.1%} zero", f"score = {label}; "
                                   "each cell is the mean over the weights it covers"))
    return fig


LIVE_CELLS = 64  # a live map's cells per side: a quarter of the picker's, so that a run's updates stay light


def coarser(cells: np.ndarray, most: int = LIVE_CELLS) -> np.ndarray:
    """A pooled map averaged again, 2x2 at a time, until no side exceeds `most` cells (a trailing odd row or column
    joins as its own cell)."""
    while max(cells.shape) > most:
        rows, cols = cells.shape
        pad = np.pad(cells, ((0, rows % 2), (0, cols % 2)), mode="edge")
        cells = pad.reshape(pad.shape[0] // 2, 2, pad.shape[1] // 2, 2).mean(axis=(1, 3)).astype(np.float32)
    return cells


def coarser_explanation(explanation):
    """The explanation with its difference map as coarse as a live map."""
    return dataclasses.replace(explanation, difference_map=coarser(explanation.difference_map))


def empty(title: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(**{**LAYOUT, "height": 260}, title=title, xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def log_ticks(values) -> dict:
    """Tick settings for a log axis over `values`. Over a decade or more plotly labels the 2s and 5s between powers
    of ten as bare digits ("2" for 20000): then label the powers of ten only, with unlabelled grid lines between."""
    positive = np.asarray(values, dtype=np.float64)
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if positive.size == 0 or np.log10(positive.max() / positive.min()) < 1:
        return {}
    return dict(dtick=1, minor=dict(dtick="D1", showgrid=True, gridcolor="#f1f5f9"))


def why_chart(name: str, explanation, differing: dict[str, float]) -> go.Figure:
    """Why Wanda works, for one linear: its input features' norms (log scale, outliers marked), where Wanda's and
    magnitude's masks part on its weights, and that share for every linear pruned so far."""
    norms = np.asarray(explanation.input_norms, dtype=np.float32)
    outliers = np.asarray(explanation.outliers, dtype=np.int64)
    diff = np.asarray(explanation.difference_map, dtype=np.float32)
    fig = make_subplots(rows=2, cols=2, column_widths=[0.58, 0.42], row_heights=[0.62, 0.38], vertical_spacing=0.2,
                        horizontal_spacing=0.14, specs=[[{}, {}], [{"colspan": 2}, None]],
                        # two short lines each: side by side in a narrow window, long ones run into each other
                        subplot_titles=(f"input-feature norm ||X_j|| (log)<br><span style='color:{OUTLIER}'>◆ "
                                        f"{len(outliers)} outlier{'' if len(outliers) == 1 else 's'}</span>",
                                        f"Wanda vs magnitude:<br>{explanation.differing:.1%} of positions differ",
                                        "share of positions that differ, per pruned linear<br>in pruning order "
                                        f"(<span style='color:{SECOND}'>this one</span>; hover for names)"))
    # No legend: above the subplots it would sit on their titles; the first title names the red markers instead.
    fig.add_scatter(x=np.arange(len(norms)), y=np.maximum(norms, 1e-12), mode="lines", name="||X_j||",
                    line=dict(color=ACCENT, width=1), row=1, col=1, showlegend=False,
                    hovertemplate="input j %{x}<br>||X_j|| %{y:.3g}<extra></extra>")
    fig.add_scatter(x=outliers, y=np.maximum(norms[outliers], 1e-12), mode="markers", name=f"outliers ({len(outliers)})",
                    marker=dict(color=OUTLIER, size=7, symbol="diamond"), row=1, col=1, showlegend=False,
                    hovertemplate="outlier j %{x}<br>||X_j|| %{y:.3g}<extra></extra>")
    rows, cols = diff.shape
    fig.add_heatmap(z=diff, colorscale="Reds", zmin=0, zmax=max(float(diff.max()), 1e-6), row=1, col=2,
                    colorbar=dict(x=1.01, y=0.8, len=0.55, thickness=10, tickformat=".0%"),
                    hovertemplate="cell row %{y}, col %{x}<br>%{z:.0%} differ<extra></extra>")
    names = list(differing)
    fig.add_bar(x=[n.split(".", 2)[-1] if n.count(".") > 2 else n for n in names], y=[differing[n] for n in names],
                marker_color=[SECOND if n == name else MUTED for n in names], name="differ", showlegend=False,
                row=2, col=1, customdata=names, hovertemplate="%{customdata}<br>%{y:.1%} differ<extra></extra>")
    fig.update_yaxes(type="log", row=1, col=1, **log_ticks(norms))
    fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=2)
    fig.update_xaxes(showticklabels=False, row=1, col=2)
    fig.update_xaxes(title=dict(text="input feature j", standoff=2), row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=2, col=1)
    fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=2, col=1)
    fig.update_annotations(font=dict(size=12))
    fig.update_layout(**{**LAYOUT, "height": 570, "margin": dict(l=60, r=55, t=TOP + 14, b=30)},
                      title=titled(f"Why it works: {name}", "a few input features fire far harder than the rest "
                                   "(red: above 5x the median); Wanda keeps their weights, magnitude does not"))
    return fig


def targets_trace(fig: go.Figure, targets: list[float]) -> go.Figure:
    """Add OWL's per-block targets to the block chart as a stepped line."""
    fig.add_scatter(x=list(range(len(targets))), y=targets, name="OWL target", mode="lines", line_shape="hvh",
                    line=dict(color="#7c3aed", width=2), hovertemplate="block %{x}<br>target %{y:.1%}<extra></extra>")
    return fig


def owl_chart(sparsities: list[float], outlier_ratios: list[float] | None, target: float | None,
              blocks: int) -> go.Figure:
    """OWL's choice per decoder block: the sparsity it prunes to (bars) from the block's outlier ratio (line, %)."""
    chosen = sparsities[:blocks]
    x = list(range(len(chosen)))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=x, y=chosen, name="chosen sparsity", marker_color="#7c3aed",
                hovertemplate="block %{x}<br>sparsity %{y:.1%}<extra></extra>")
    if outlier_ratios is not None:
        fig.add_scatter(x=x, y=outlier_ratios[:blocks], name="outlier ratio (%)", mode="lines+markers",
                        line=dict(color=SECOND), secondary_y=True,
                        hovertemplate="block %{x}<br>%{y:.2f}% of scores are outliers<extra></extra>")
    if target is not None:
        fig.add_scatter(x=[-0.5, len(chosen) - 0.5], y=[target, target], name=f"run target {target:.0%}",
                        mode="lines", hoverinfo="skip", line=dict(color=MUTED, dash="dot", width=1.5))
    low, high = (min(chosen), max(chosen)) if chosen else (0.0, 1.0)
    pad = max(0.02, (high - low) * 0.5)
    fig.update_layout(**{**LAYOUT, "margin": dict(l=60, r=60, t=TOP, b=45)},
                      title=titled("OWL: sparsity chosen per block", "blocks with more outlier scores keep more "
                                   "weights; the weighted mean stays at the run's target"),
                      legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom", font=dict(size=11)),
                      bargap=0.15)
    fig.update_xaxes(title=dict(text="decoder block", standoff=6), dtick=max(1, len(chosen) // 15))
    fig.update_yaxes(title="sparsity", tickformat=".0%", range=[max(0.0, low - pad), min(1.0, high + pad)],
                     secondary_y=False)
    fig.update_yaxes(title="outlier ratio (%)", rangemode="tozero", nticks=5, showgrid=False, secondary_y=True)
    return fig


# per axis of core.sweep.AXES: the chart's title and how to read it
TITLES = {"sparsity": "Perplexity against sparsity", "seconds": "Perplexity against prune time",
          "speed": "Perplexity against generation speed"}
SUBTITLES = {"sparsity": "lower is better · log scale · a line per method · N:M and structured runs as diamonds",
             "seconds": "lower and further left is better: the quality a run buys for its time · both axes log scale",
             "speed": "lower and further right is better · the dense model as a star · zeros stored densely run at "
                      "the dense speed; structured runs are smaller and faster"}


def comparison_chart(rows: list[dict], x: str = "sparsity") -> go.Figure:
    """core.sweep's chart (perplexity against sparsity, prune seconds or generation speed, the dense model), titled
    like the page's other figures. Its legend goes to the right, one entry a line: a comparison may have many entries,
    and a row of them above the plot would wrap up onto the title in a narrow window."""
    fig = figure_of(rows, x)
    fig.update_layout(**{**LAYOUT, "height": 420, "margin": dict(l=65, r=30, t=TOP, b=45)},
                      title=titled(TITLES[x], SUBTITLES[x]),
                      legend=dict(title=None, orientation="v", x=1.02, xanchor="left", y=1, yanchor="top",
                                  font=dict(size=11)))
    fig.update_xaxes(title=dict(text=AXES[x][1], standoff=6))
    fig.update_yaxes(**log_ticks([row["perplexity"] for row in rows]))
    return fig
