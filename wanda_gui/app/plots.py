"""Plotly figures for the live view: per-block sparsity and time, and a linear's score and mask maps."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

ACCENT = "#0f766e"
SECOND = "#f59e0b"
LAYOUT = dict(margin=dict(l=50, r=50, t=40, b=40), height=320, template="plotly_white",
              font=dict(family="system-ui, sans-serif", size=12))


def block_chart(blocks: int, sparsity: dict[int, float], seconds: dict[int, float], target: float | None) -> go.Figure:
    """Achieved sparsity (bars) and seconds (line) per decoder block, filling in as blocks finish."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    done = sorted(sparsity)
    fig.add_bar(x=done, y=[sparsity[i] for i in done], name="sparsity", marker_color=ACCENT,
                hovertemplate="block %{x}<br>sparsity %{y:.2%}<extra></extra>")
    fig.add_scatter(x=done, y=[seconds[i] for i in done], name="seconds", mode="lines+markers",
                    line=dict(color=SECOND), secondary_y=True, hovertemplate="block %{x}<br>%{y:.2f} s<extra></extra>")
    if target is not None:
        fig.add_hline(y=target, line_dash="dot", line_color="#64748b", annotation_text=f"target {target:.0%}")
    fig.update_layout(**LAYOUT, title="Per-block sparsity and time", legend=dict(orientation="h", y=-0.2),
                      bargap=0.15)
    fig.update_xaxes(title="decoder block", range=[-0.5, max(blocks, 1) - 0.5], dtick=max(1, blocks // 15))
    fig.update_yaxes(title="sparsity", range=[0, 1], tickformat=".0%", secondary_y=False)
    fig.update_yaxes(title="seconds", rangemode="tozero", secondary_y=True, showgrid=False)
    return fig


def layer_maps(name: str, shape: tuple[int, int], sparsity: float, score_map: np.ndarray, mask_map: np.ndarray) -> go.Figure:
    """The pooled score map (log scale: scores are heavy-tailed) beside the fraction of weights kept."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("score, log10 (mean-pooled)", "weights kept (fraction per cell)"),
                        horizontal_spacing=0.2)
    log_score = np.log10(np.maximum(score_map, 1e-12)).astype(np.float32)
    fig.add_heatmap(z=log_score, colorscale="Viridis", colorbar=dict(x=0.41, len=0.9, thickness=10), row=1, col=1,
                    hovertemplate="row cell %{y}, input cell %{x}<br>log10 score %{z:.2f}<extra></extra>")
    fig.add_heatmap(z=mask_map.astype(np.float32), colorscale="Greys", reversescale=True, zmin=0, zmax=1,
                    colorbar=dict(x=1.0, len=0.9, thickness=10), row=1, col=2,
                    hovertemplate="row cell %{y}, input cell %{x}<br>kept %{z:.0%}<extra></extra>")
    fig.update_yaxes(autorange="reversed", title="output rows (pooled)", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_xaxes(title="input features (pooled)")
    fig.update_layout(**{**LAYOUT, "height": 360},
                      title=f"{name}  {shape[0]}x{shape[1]}, {sparsity:.1%} zero")
    return fig


def empty(title: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(**{**LAYOUT, "height": 260}, title=title, xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig
