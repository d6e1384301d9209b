"""What every step's callbacks share: the page's components by name, errors as page messages, the session a request
belongs to, named outputs, and work streamed from a worker thread."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import queue
import threading
import traceback
from typing import Iterator

import gradio as gr

from ..core.errors import UserError
from . import plots
from .policy import ServePolicy
from .workspace import Workspace

WHY_EMPTY = "Why it works: input-feature norms and Wanda vs magnitude, as each linear is pruned"
MAPS_EMPTY = "Score and mask maps appear as each linear is pruned"
COMPARE_EMPTY = "Perplexity against sparsity fills in as each run finishes"
COMPARE_TIME_EMPTY = "Perplexity against prune time fills in as each run finishes"
LOG = logging.getLogger("wanda_gui")
STATUS_INTERVAL = 0.25  # seconds between live status lines (a few bytes each)
DRAW_INTERVAL = 1.0  # seconds between live map updates: each is ~100 KiB of figure that the browser redraws, and
# at 4 a second (with maps twice as fine) a run's page stopped answering and its tab grew to 2 GiB


class Page:
    """The components every step adds, by the names callbacks use, and the wiring helpers they share."""

    def __init__(self, policy: ServePolicy):
        self.policy = policy
        self.c: dict[str, gr.components.Component] = {}
        self.events: dict[str, object] = {}  # events a later step chains onto (e.g. "load": estimate after a load)

    def add(self, name: str, component):
        self.c[name] = component
        if hasattr(component, "preprocess"):  # an input, not a layout block
            component.preprocess = logged_in_one_line(component, component.preprocess)
        return component

    def __getitem__(self, name: str):
        return self.c[name]

    def out(self, names: tuple[str, ...]) -> list:
        return [self.c[name] for name in names]

    def inputs_of(self, fn) -> list:
        """The components a callback reads: its parameters, by name (so a callback and its wiring can never
        disagree on the order); `request`, Gradio's own, is not a component."""
        return self.out(tuple(name for name in inspect.signature(fn).parameters if name != "request"))

    def queued(self, trigger, status: str, what: str, fn, outputs, **kwargs):
        """trigger -> at once, a status line saying the click was taken -> fn in its queue, whose place and wait
        Gradio shows on that same status line. fn's inputs are the components its parameters name."""
        note = f"… Waiting for the server to {what}; other sessions' work goes first (your place in the queue shows here)."
        return trigger(lambda: note, None, self.c[status], queue=False, api_visibility="private").then(
            fn, self.inputs_of(fn), outputs, show_progress_on=[self.c[status]], **kwargs)


def logged_in_one_line(component, preprocess):
    """A component's own check of an API caller's value (a slider's range, a radio's choices): the caller gets the
    message, the server's log one line instead of Gradio's traceback."""
    @functools.wraps(preprocess)
    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error as e:
            label = getattr(component, "label", None) or type(component).__name__
            LOG.warning("rejected a value for %r: %s", label, e.message)
            raise gr.Error(e.message, title=e.title, print_exception=False) from None
    return checked


# Heavy work (load, prune, evaluate, export, compare) takes turns in one queue; chat has its own, so it never waits
# behind another session's prune.
WORK = dict(concurrency_id="work", concurrency_limit=1)
CHATTING = dict(concurrency_id="chat", concurrency_limit=2)


def as_page_error(e: Exception, policy: ServePolicy) -> gr.Error:
    """UserError (and anything unexpected) as a readable message for the page, never a traceback; its paths as the
    policy lets visitors see them."""
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, UserError):
        return gr.Error(policy.shown(str(e)), title="Cannot do that", print_exception=False)
    traceback.print_exc()
    return gr.Error(policy.shown(f"Unexpected {type(e).__name__}: {e}. The app is still usable."),
                    title="Something went wrong", print_exception=False)


def user_errors(on_error=None):
    """Raise errors as gr.Error (a message box in the page); a callback may first yield (or return) `on_error(ws,
    message)`, the outputs that put the message in its status line and set its buttons right again. The session's
    Workspace and the serving policy are found from the gr.Request every callback takes last."""

    def decorate(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def generator(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:
                    error = as_page_error(e, served(args[-1]).policy)
                    if on_error is not None:
                        yield on_error(session(args[-1]), error.message)
                    raise error from None
            return generator

        @functools.wraps(fn)
        def function(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise as_page_error(e, served(args[-1]).policy) from None
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


def check_count(value, name: str, minimum: int = 1) -> int:
    if value is None or int(value) != value or value < minimum:
        raise UserError(f"{name} must be a whole number of at least {minimum}; got {value!r}.")
    return int(value)


# -- named outputs ----------------------------------------------------------------------------------------------------
# Each callback names its outputs; the page maps the names to components, so a callback returns only what it changes.

BUTTONS = ("load_btn", "start_btn", "send_btn", "export_btn", "eval_btn", "stop_btn", "compare_btn", "compare_stop",
           "take_btn", "zs_btn", "speed_btn")
# what a run produces after pruning: cleared when a new model or run starts
AFTER_RUN = ("ppl_md", "dense_chat", "pruned_chat", "dense_stats", "pruned_stats", "chat_status", "export_status",
             "report_file", "zs_md", "speed_md")
RUN_VIEW = ("block_plot", "map_plot", "layer_pick", "results", "why_plot", "owl_plot")
COMPARE_VIEW = ("compare_chart", "compare_time_chart", "compare_speed_chart", "compare_table", "compare_pick",
                "compare_files")  # what a comparison shows


def updates(names: tuple[str, ...], **values) -> tuple:
    """Positional outputs for `names`, `gr.update()` (no change) where no value is given."""
    return tuple(values.get(name, gr.update()) for name in names)


def buttons(ws: Workspace, running: bool = False, stop: str | None = None) -> dict:
    """Which buttons a user may press now: nothing that would disturb a run while it runs; `stop` names the one
    Stop button that can end the run under way."""
    pruned = not running and ws.pruned is not None
    dense = not running and ws.loaded is not None and ws.dense_kept
    return dict(load_btn=gr.update(interactive=not running), start_btn=gr.update(interactive=dense),
                send_btn=gr.update(interactive=dense or pruned), export_btn=gr.update(interactive=pruned),
                eval_btn=gr.update(interactive=pruned), stop_btn=gr.update(interactive=stop == "stop_btn"),
                compare_btn=gr.update(interactive=dense and not ws.offloaded),
                compare_stop=gr.update(interactive=stop == "compare_stop"),
                take_btn=gr.update(interactive=dense and bool(ws.comparison and ws.comparison.finished)),
                zs_btn=gr.update(interactive=pruned), speed_btn=gr.update(interactive=pruned))


def cleared(*groups: tuple[str, ...]) -> dict:
    """Empty values for everything a previous model or run left on the page."""
    empty = dict(block_plot=plots.block_chart(1, {}, {}, None), map_plot=plots.empty(MAPS_EMPTY),
                 why_plot=plots.empty(WHY_EMPTY), owl_plot=gr.update(value=None, visible=False),
                 layer_pick=gr.update(choices=[], value=None), results="", ppl_md="", zs_md="", speed_md="",
                 dense_chat=[],
                 pruned_chat=[], dense_stats="", pruned_stats="", chat_status="", export_status="",
                 report_file=gr.update(value=None, visible=False), compare_chart=plots.empty(COMPARE_EMPTY),
                 compare_time_chart=plots.empty(COMPARE_TIME_EMPTY),
                 compare_speed_chart=gr.update(value=None, visible=False),
                 compare_table="", compare_pick=gr.update(choices=[], value=None),
                 compare_files=gr.update(value=None, visible=False))
    return {name: empty[name] for group in groups for name in group}


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
