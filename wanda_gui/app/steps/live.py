"""Step 3 · Live: the run under way (per-block chart, the linear's score and mask maps, the why-it-works view), and
any pruned linear picked afterwards. `prune_stream` turns a run's events into what the page shows; the method step's
Start and Compare's Take feed it."""

from __future__ import annotations

import time
from typing import Iterator

import gradio as gr

from ...core import events as ev
from ...core.errors import UserError
from .. import plots
from ..common import (AFTER_RUN, BUTTONS, DRAW_INTERVAL, MAPS_EMPTY, RUN_VIEW, STATUS_INTERVAL, WHY_EMPTY, Page, buttons,
                      cleared, session, updates, user_errors)
from ..workspace import Workspace
from .results import results_markdown

PRUNE_OUTPUTS = ("prune_status", *RUN_VIEW, *BUTTONS, *AFTER_RUN)


def prune_failed(ws: Workspace, message: str):
    return updates(PRUNE_OUTPUTS, prune_status=f"✗ {message}", **buttons(ws))


def prune_stream(ws: Workspace, events: Iterator, method: str) -> Iterator[dict]:
    """Follow one prune into the session's pruned model (the Workspace's event stream, `ws.prune(...)` or
    `ws.take(...)`); yield, by output name, what the page shows as it goes."""
    # The previous run's results go at once; Stop opens with the run itself, once it can take effect.
    yield dict(prune_status="… Drawing calibration windows…", **buttons(ws, running=True),
               **cleared(RUN_VIEW, AFTER_RUN))
    sparsity_by_block, seconds_by_block, targets, differing, block_target = {}, {}, None, {}, None
    blocks, target, started, heatmap, why, last_drawn, last_status = 1, None, time.perf_counter(), gr.update(), gr.update(), 0.0, 0.0
    shrunk: dict[int, tuple[int, int, int, int]] = {}  # a structured run's kept widths per block
    owl_figure = None  # OWL's choice per block; a fresh gr.update each time (Gradio consumes an update's value)

    def block_plot():
        fig = plots.block_chart(blocks, sparsity_by_block, seconds_by_block, target)
        return plots.targets_trace(fig, targets[:blocks]) if targets else fig

    for event in events:
        if isinstance(event, ev.RunStarted):
            blocks, target, started = len(event.blocks), event.target_sparsity, time.perf_counter()
            yield dict(prune_status=f"… {event.method} · {event.pattern} · {event.total_linears} linears in {blocks} blocks",
                       block_plot=block_plot(), **buttons(ws, running=True, stop="stop_btn"))
        elif isinstance(event, ev.Progress):
            yield dict(prune_status=f"… {event.what}: block {event.done}/{event.total} · "
                                    f"{time.perf_counter() - started:.0f} s elapsed")
        elif isinstance(event, ev.TargetsChosen):
            targets = event.sparsities
            owl_figure = plots.owl_chart(targets, event.basis, target, blocks)
            yield dict(prune_status=f"… {event.note}", block_plot=block_plot(),
                       owl_plot=gr.update(value=owl_figure, visible=True))
        elif isinstance(event, ev.BlockStarted):
            block_target = event.target
        elif isinstance(event, ev.LinearPruned):
            if event.explanation is not None:
                differing[event.name] = event.explanation.differing
            now, last = time.perf_counter(), event.done == event.total
            if now - last_status < STATUS_INTERVAL and not last:
                continue  # a line per linear would slow a fast run down; the picker shows them all afterwards
            last_status, elapsed = now, now - started
            finished = len(seconds_by_block)  # blocks cost alike (two passes each); linears do not (1 s to 7 s)
            eta = (f"ETA {elapsed / finished * (blocks - finished):.0f} s" if finished else
                   "ETA after the first block")
            own_target = f" (target {block_target:.1%})" if targets and block_target is not None else ""
            shown = dict(prune_status=f"… block {event.block + 1}/{blocks}{own_target} · linear {event.done}/"
                                      f"{event.total} ({event.done / event.total:.0%}) · {elapsed:.0f} s elapsed · {eta}")
            if now - last_drawn >= DRAW_INTERVAL or last:  # the maps, far heavier, less often
                last_drawn = now
                heatmap = plots.layer_maps(event.name, event.shape, event.sparsity, plots.coarser(event.score_map),
                                           plots.coarser(event.mask_map), method=method)
                if event.explanation is not None:
                    why = plots.why_chart(event.name, plots.coarser_explanation(event.explanation), differing)
                shown.update(map_plot=heatmap, why_plot=why)
            yield shown
        elif isinstance(event, ev.BlockShrunk):  # a structured run: no per-weight maps, the widths instead
            shrunk[event.index] = (event.kept_channels, event.total_channels, event.kept_heads, event.total_heads)
            heatmap = plots.widths_chart(blocks, shrunk)
            yield dict(prune_status=f"… block {event.index + 1}/{blocks}: kept {event.kept_heads}/"
                                    f"{event.total_heads} heads and {event.kept_channels}/{event.total_channels} MLP channels · "
                                    f"{time.perf_counter() - started:.0f} s elapsed", map_plot=heatmap)
        elif isinstance(event, ev.BlockFinished):
            sparsity_by_block[event.index] = event.sparsity
            seconds_by_block[event.index] = event.seconds
            yield dict(block_plot=block_plot())
        elif isinstance(event, ev.RunFinished):
            names, summary = list(ws.maps), event.summary
            removed = (f"removed {summary.achieved_sparsity:.2%} of the block linears' weights: "
                       f"{summary.parameters_before:,} → {summary.parameters_after:,} parameters" if summary.structure
                       else f"achieved sparsity {summary.achieved_sparsity:.2%}")
            yield dict(prune_status=f"✓ Pruned in {summary.seconds:.1f} s: {removed}.",
                       block_plot=block_plot(), map_plot=heatmap, why_plot=why,
                       owl_plot=gr.update(value=owl_figure, visible=True) if owl_figure else gr.update(),
                       layer_pick=gr.update(choices=names, value=names[-1] if names else None),
                       results=results_markdown(ws),
                       **buttons(ws))
        elif isinstance(event, ev.RunCancelled):
            yield dict(prune_status="■ Stopped. " + ("The dense weights were restored." if event.restored else
                                                     "The dense model was never touched (the pruned copy was discarded)."),
                       **buttons(ws))
        elif isinstance(event, ev.RunFailed):
            raise UserError(f"Pruning failed{f' at {event.layer}' if event.layer else ''}: {event.reason}. "
                            "The dense model is intact.")


@user_errors()
def show_layer(layer_pick, request: gr.Request):
    ws = session(request)
    if not layer_pick or layer_pick not in ws.maps:
        return plots.empty("Pick a pruned linear"), plots.empty(WHY_EMPTY)
    m = ws.maps[layer_pick]
    differing = {n: v.explanation.differing for n, v in ws.maps.items() if v.explanation is not None}
    return (plots.layer_maps(layer_pick, m.shape, m.sparsity, m.score_map, m.mask_map, method=ws.summary.method),
            plots.why_chart(layer_pick, m.explanation, differing) if m.explanation is not None else
            plots.empty("No explanation for this linear (its method reads no activations)"))


def layout(page: Page) -> None:
    with gr.Column(elem_classes="step"):
        gr.Markdown("### 3 · Live")
        page.add("prune_status", gr.Markdown("Load a model, then start pruning.", elem_id="prune-status"))
        with gr.Row():
            page.add("block_plot", gr.Plot(plots.block_chart(1, {}, {}, None), label="Blocks", elem_id="block-plot",
                                           min_width=520))
            page.add("map_plot", gr.Plot(plots.empty(MAPS_EMPTY), label="Maps", elem_id="map-plot", min_width=520))
        page.add("layer_pick", gr.Dropdown([], label="Look at any pruned linear", interactive=True,
                                           elem_id="layer-pick"))
        page.add("why_plot", gr.Plot(plots.empty(WHY_EMPTY), label="Why it works", elem_id="why-plot"))
        page.add("owl_plot", gr.Plot(label="OWL", visible=False, elem_id="owl-plot"))


def wire(page: Page) -> None:
    page["layer_pick"].change(show_layer, page["layer_pick"], page.out(("map_plot", "why_plot")), api_name="show_layer")
