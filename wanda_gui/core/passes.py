"""The two kinds of pass over a decoder block that every method and option builds on: read a statistic of each
linear's inputs, and replace the hidden states by the block's outputs; and the course every run takes over its
stages, unstructured or structured."""

from __future__ import annotations

import threading
import time
import traceback
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol

import torch
from torch import nn

from .architecture import BlockCall, StopForward, weight_out_in
from .distributed import merge
from .errors import UserError
from .events import Event, RunCancelled, RunFailed, RunFinished, RunStarted
from .memory import release_memory
from .statistics import SquaredMean

if TYPE_CHECKING:
    from .methods import RunContext, Step


class Cancelled(Exception):
    pass


@torch.inference_mode()
def collect_input_stats(block: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor, call: BlockCall,
                        batch_size: int, cancel: threading.Event | None, statistic: type = SquaredMean) -> dict[str, torch.Tensor]:
    """A statistic of every linear's input (mean x_j^2 by default) over all calibration tokens, from one pass.

    Linears fed the same tensor (q/k/v, gate/up) share one statistic object, so one accumulation and one result
    tensor, and the pass stops at the last linear's input: nothing after it is read.
    """
    stats: dict[str, object] = {}
    order: list[str] = []
    last_input: list = [None, None]  # (tensor, its statistic); the reference keeps the tensor alive

    def hook(name: str, width: int):
        def pre(module, args):
            x = args[0]
            if last_input[0] is not x:
                stat = stats[name] if name in stats else statistic(width, hidden.device)
                stat.add(x)
                last_input[:] = [x, stat]
            stats.setdefault(name, last_input[1])
            if len(order) < len(linears):
                order.append(name)
            elif name == order[-1]:
                raise StopForward
        return pre

    handles = [m.register_forward_pre_hook(hook(name, weight_out_in(m).shape[1])) for name, m in linears.items()]
    try:
        for start in range(0, len(hidden), batch_size):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            try:
                call(block, hidden[start:start + batch_size])
            except StopForward:
                pass
            last_input[:] = [None, None]
    finally:
        for h in handles:
            h.remove()
    for name, m in linears.items():  # a linear the forward never reached: no data, as an all-zero statistic
        stats.setdefault(name, statistic(weight_out_in(m).shape[1], hidden.device))
    unique = {id(stats[name]): stats[name] for name in linears}  # the same order on every torchrun rank
    for stat in unique.values():
        merge(stat)
    results = {key: stat.result() for key, stat in unique.items()}
    return {name: results[id(stats[name])] for name in linears}


@torch.inference_mode()
def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, batch_size: int,
              cancel: threading.Event | None) -> None:
    """Replace the hidden states by the block's outputs, batch by batch, in place."""
    for start in range(0, len(hidden), batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled
        hidden[start:start + batch_size] = call(block, hidden[start:start + batch_size])


def close_stage(ctx: "RunContext", hooks: Iterable["Step"], index: int, feed_next: bool) -> float:
    """How every stage ends, whatever pruned it: its outputs replace its inputs for the next stage (when one reads
    them), each hook hears that it is done, and on CPU the freed heap goes back to the OS. Returns the seconds the
    forward took (calibration time)."""
    seconds = 0.0
    if feed_next:
        started = time.perf_counter()
        run_block(ctx.blocks[index], ctx.hidden, ctx.calls[index], ctx.batch_size, ctx.cancel)
        seconds = time.perf_counter() - started
    for hook in hooks:
        hook.after_stage(ctx, index)
    if ctx.device.type == "cpu":
        release_memory(collect=False)
    return seconds


class PruningRun(Protocol):
    """What `drive` needs of a run (engine.Run, structured.StructuredRun)."""

    done: bool
    current_layer: str | None

    def started_event(self, model_name: str) -> RunStarted: ...
    def before_pruning(self) -> Iterator[Event]: ...
    def stage(self, index: int) -> Iterator[Event]: ...
    def finished(self) -> RunFinished: ...
    def restore(self) -> bool: ...


def drive(run: PruningRun, stages: int, model_name: str) -> Iterator[Event]:
    """Every run's course: started, each stage in turn, finished. Any failure, a cancel included, becomes the run's
    last event, and a run that did not finish (a closed stream too) puts the dense model back."""
    yield run.started_event(model_name)
    try:
        yield from run.before_pruning()
        for index in range(stages):
            yield from run.stage(index)
        yield run.finished()
    except Exception as error:  # noqa: BLE001 - every failure becomes an event; the model is restored
        yield stopped(run, error)
    finally:
        if not run.done:
            run.restore()


def stopped(run: PruningRun, error: BaseException) -> RunCancelled | RunFailed:
    """The event that says why the run ended early, the dense model restored."""
    where = f" at {run.current_layer}" if run.current_layer else ""
    detail = traceback.format_exc()
    if isinstance(error, Cancelled):
        return RunCancelled("stopped by the user", run.restore())
    if isinstance(error, torch.cuda.OutOfMemoryError):
        reason = f"out of GPU memory{where}: lower the batch size or the number of samples"
    elif isinstance(error, UserError):
        reason = str(error)
    else:  # any other failure still leaves the dense model intact
        reason = f"{type(error).__name__}{where}: {error}"
    return RunFailed(reason, run.current_layer, run.restore(), detail)
