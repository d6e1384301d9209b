"""The block-by-block pruning loop: capture inputs, collect statistics, prune, re-run, emit events."""

from __future__ import annotations

import ctypes
import dataclasses
import fnmatch
import platform
import threading
import time
import traceback
from collections import defaultdict
from typing import Iterator

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn

from .architecture import capture_block_inputs, find_blocks, find_head, find_linears, head_input_stat, weight_out_in
from .errors import UserError
from .events import (BlockFinished, BlockStarted, Event, LayerSparsity, LinearPruned, PruneSummary, RunCancelled,
                     RunFailed, RunFinished, RunStarted, TargetsChosen)
from .explain import explain
from .masks import Pattern, check_sparsity
from .methods import OPTIONS, BlockMasked, Method, RunContext, Step, get_method, option_steps
from .passes import Cancelled, collect_input_stats, run_block
from .statistics import Several, SquaredMean

MAP_SIZE = 128


@dataclasses.dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: Pattern = dataclasses.field(default_factory=Pattern)
    layerwise: bool = False  # magnitude only: one threshold for the whole layer (the reference's variant)
    include: tuple[str, ...] = ()  # fnmatch patterns on qualified linear names; empty = every block linear
    exclude: tuple[str, ...] = ()
    prune_head: bool = False  # also the LM head (and so the input embeddings, when the two are tied)
    batch_size: int | None = None  # None: about 1k tokens a batch on CPU, 32k on CUDA
    restore_on_abort: bool = True  # keep a dense copy of each pruned weight until the run ends
    wanda_variant: bool = False  # Wanda only: the reference's α-variant (per-layer target, rows differ)
    explain: bool = False  # attach to each LinearPruned its input norms and how Wanda's mask differs from magnitude's
    owl: bool = False  # OWL: per-block sparsities from the blocks' outlier ratios (methods/owl.py)
    dsnot: bool = False  # DSnoT: after masking, swap pruned and kept weights to cut each row's expected error
    reconstruct: bool = False  # after masking, fit each block's kept weights to the dense block's outputs

    def __post_init__(self):
        """Parse and check what needs no model, so the CLI and the app fail before loading anything."""
        if isinstance(self.pattern, str):
            self.pattern = Pattern.parse(self.pattern)
        self.method = get_method(self.method).name
        self.sparsity = check_sparsity(self.sparsity)
        if self.layerwise and self.method != "magnitude":
            raise UserError(f"Layer-wide comparison is a magnitude-pruning option; {self.method} has its own "
                            "comparison groups (output rows, or SparseGPT's column blocks).")
        if self.layerwise and self.pattern.structured:
            raise UserError("Layer-wide comparison does not apply to N:M patterns, which work within groups of a row.")
        if self.wanda_variant and (self.method != "wanda" or self.pattern.structured):
            raise UserError("The α-variant is a Wanda option for unstructured sparsity; choose method wanda and "
                            "pattern unstructured, or turn the variant off.")
        for name, option in OPTIONS.items():
            if getattr(self, name):
                option.check(self.pattern, get_method(self.method).needs_activations)
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"Batch size must be at least 1; got {self.batch_size}.")


def keep_freed_memory_mapped() -> None:
    """Ask glibc to keep large freed blocks instead of handing them back to the OS: otherwise every batch of a
    block forward page-faults fresh zeroed memory in again (SmolLM2 block passes ran 5-9% faster with this)."""
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS once a stage is done: with the thresholds above glibc keeps every
    page, and the process grew by a third of a block per block (SmolLM2 offloaded, 30 blocks: 646 -> 784 MiB;
    trimmed after each block, flat at 510 MiB)."""
    if platform.system() != "Linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def default_batch_size(device: torch.device, seqlen: int) -> int:
    """About 1k tokens a forward on CPU (measured on SmolLM2 blocks, 2 cores: batch 2 at seqlen 512 beat 4, 8 and
    12 by 2-8%, the activations staying in cache); GPUs want far more tokens per call."""
    tokens = 32768 if device.type == "cuda" else 1024
    return max(1, tokens // max(1, seqlen))


def select_linears(model: nn.Module, config: PruneConfig) -> tuple[nn.ModuleList, list[dict[str, nn.Module]]]:
    """The decoder blocks and, per block, the linears to prune by qualified name; the LM head as one more
    stage after the blocks when asked for (never the input embeddings on their own)."""
    blocks_name, blocks = find_blocks(model)
    plan = []
    for i, block in enumerate(blocks):
        chosen = {}
        for name, linear in find_linears(block).items():
            full = f"{blocks_name}.{i}.{name}"
            if config.include and not any(fnmatch.fnmatchcase(full, p) for p in config.include):
                continue
            if any(fnmatch.fnmatchcase(full, p) for p in config.exclude):
                continue
            chosen[full] = linear
        plan.append(chosen)
    if config.prune_head:
        head = find_head(model)
        if head is None:
            raise UserError(f"{type(model).__name__} has no linear LM head to prune.")
        plan.append({} if any(fnmatch.fnmatchcase(head[0], p) for p in config.exclude) else dict([head]))
    if not any(plan):
        raise UserError("The include/exclude patterns select no linear layer to prune.")
    return blocks, plan


def validate(model: nn.Module, config: PruneConfig) -> None:
    """The checks of the configuration against this model that can fail before a weight is touched."""
    _, plan = select_linears(model, config)
    if config.pattern.structured:
        for linears in plan:
            for name, linear in linears.items():
                width = weight_out_in(linear).shape[1]
                if width % config.pattern.m:
                    raise UserError(f"Pattern {config.pattern} needs every pruned layer's input width to be a multiple of "
                                    f"{config.pattern.m}; {name} has {width}. Exclude it or pick another M.")


def pooled(x: torch.Tensor) -> np.ndarray:
    """Mean-pool a (C_out, C_in) map to at most 128 x 128 float32 for plotting."""
    size = (min(MAP_SIZE, x.shape[0]), min(MAP_SIZE, x.shape[1]))
    return F.adaptive_avg_pool2d(x.float()[None, None], size)[0, 0].cpu().numpy()


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def prune(model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None = None,
          cancel: threading.Event | None = None, model_name: str = "model", steps: tuple[Step, ...] = ()) -> Iterator[Event]:
    """Prune the model in place, block by block, yielding events.

    calibration: (nsamples, seqlen) token ids, needed by methods that read activations. steps: options whose hooks
    run around the loop after the method's own and the options' (methods/base.py), except around a stage: their
    before_stage runs first and their after_stage last (offload brings a block in before anything reads it, and
    out after everything else is done with it). On cancellation, a failure, or the consumer
    closing the stream, every pruned weight is restored (unless restore_on_abort is off).
    """
    validate(model, config)
    method = get_method(config.method)
    if method.needs_activations and (calibration is None or calibration.numel() == 0):
        raise UserError(f"{method.name} needs calibration data; none was given.")
    blocks, plan = select_linears(model, config)
    has_head = len(plan) > len(blocks)
    device = next(model.parameters()).device
    nsamples, seqlen = (calibration.shape if method.needs_activations else (0, 0))
    batch_size = config.batch_size or default_batch_size(device, seqlen)
    total = sum(len(p) for p in plan)
    hooks = (method, *option_steps(config), *steps)
    keep_dense = config.restore_on_abort or any(type(h).after_masking is not Step.after_masking for h in hooks)
    backup: dict[nn.Module, torch.Tensor] = {}
    finished = False
    current_layer = None

    @torch.no_grad()
    def restore() -> bool:
        for linear, weight in backup.items():
            linear.weight.copy_(weight)
        backup.clear()
        return config.restore_on_abort

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        keep_freed_memory_mapped()
    yield RunStarted(model_name, method.name, str(config.pattern), config.pattern.sparsity(config.sparsity),
                     [list(p) for p in plan], total, int(nsamples), int(seqlen), batch_size, method.score_label)
    started = time.perf_counter()
    calibration_seconds = 0.0
    layers: list[LayerSparsity] = []
    try:
        ctx = RunContext(model, config, blocks, plan, calibration if method.needs_activations else None, None, None,
                         batch_size, device, [config.sparsity] * len(plan), cancel)
        if method.needs_activations:
            ctx.hidden, ctx.calls = capture_block_inputs(model, blocks, calibration, batch_size, device)
        for hook in hooks:
            yield from hook.before_pruning(ctx) or ()
        if ctx.target_note or any(s != config.sparsity for s in ctx.sparsities):
            yield TargetsChosen(list(ctx.sparsities), ctx.target_note, ctx.target_basis)
        kinds = statistic_kinds(method, hooks, config)
        for i, linears in enumerate(plan):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            is_head = i == len(blocks)
            block_started = time.perf_counter()
            yield BlockStarted(i, next(iter(linears), "head") if is_head else f"block {i}", len(linears),
                               None if config.pattern.structured else ctx.sparsities[i])
            for hook in reversed(hooks):
                hook.before_stage(ctx, i)
            t = time.perf_counter()
            statistics = stage_statistics(ctx, kinds, i, linears)
            stats = statistics.get(method.statistic, {})
            calibration_seconds += time.perf_counter() - t
            prepared: dict[int, object] = {}  # per shared statistic
            dense: dict[str, torch.Tensor] = {}
            masks: dict[str, torch.Tensor] = {}
            zeros = elements = 0
            for name, linear in linears.items():
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                current_layer = name
                t = time.perf_counter()
                if keep_dense:  # in host memory: a GPU holds no second copy of the model
                    dense[name] = linear.weight.detach().to("cpu", copy=True)
                if config.restore_on_abort:
                    backup[linear] = dense[name]
                stat = stats.get(name)
                if id(stat) not in prepared:
                    prepared[id(stat)] = method.prepare(stat)
                why = (explain(weight_out_in(linear), statistics[SquaredMean][name], ctx.sparsities[i], config.pattern,
                               pooled) if SquaredMean in statistics and config.explain else None)
                score, mask, nz = prune_linear(linear, method, prepared[id(stat)], ctx.sparsities[i], config)
                masks[name] = mask
                numel = mask.numel()
                zeros, elements = zeros + nz, elements + numel
                layers.append(LayerSparsity(name, i, tuple(mask.shape), nz / numel))
                yield LinearPruned(i, name, tuple(mask.shape), nz / numel, pooled(score), pooled(~mask),
                                   time.perf_counter() - t, len(layers), total, why)
            current_layer = None
            for hook in hooks:
                hook.after_masking(ctx, BlockMasked(i, linears, masks, dense, statistics))
            del dense, masks, prepared, stats, statistics
            if method.needs_activations and not is_head and (i < len(blocks) - 1 or has_head):
                t = time.perf_counter()
                run_block(blocks[i], ctx.hidden, ctx.calls[i], batch_size, cancel)
                calibration_seconds += time.perf_counter() - t
            for hook in hooks:
                hook.after_stage(ctx, i)
            if device.type == "cpu":
                return_freed_memory()
            yield BlockFinished(i, time.perf_counter() - block_started, zeros / max(1, elements), peak_memory(device))
        finished = True
        backup.clear()
        yield RunFinished(summarize(config, method.name, layers, time.perf_counter() - started, calibration_seconds,
                                    peak_memory(device)))
    except Cancelled:
        yield RunCancelled("stopped by the user", restore())
    except torch.cuda.OutOfMemoryError:
        yield RunFailed(f"out of GPU memory{f' at {current_layer}' if current_layer else ''}: lower the batch size or "
                        "the number of samples", current_layer, restore(), traceback.format_exc())
    except UserError as e:
        yield RunFailed(str(e), current_layer, restore(), traceback.format_exc())
    except Exception as e:  # any other failure still leaves the dense model intact
        where = f" at {current_layer}" if current_layer else ""
        yield RunFailed(f"{type(e).__name__}{where}: {e}", current_layer, restore(), traceback.format_exc())
    finally:
        if not finished:
            restore()


def statistic_kinds(method: Method, hooks: tuple[Step, ...], config: PruneConfig) -> tuple[type, ...]:
    """Every statistic the run reads of each linear's input (the method's, the hooks', the explanation's),
    in one pass; none without calibration."""
    if not method.needs_activations:
        return ()
    wanted = [method.statistic, *(h.statistic for h in hooks), SquaredMean if config.explain else None]
    return tuple(dict.fromkeys(k for k in wanted if k is not None))


def stage_statistics(ctx: RunContext, kinds: tuple[type, ...], index: int,
                     linears: dict[str, nn.Module]) -> dict[type, dict[str, torch.Tensor]]:
    """Each statistic kind for every linear of a stage (a block, or the LM head), from the current inputs, in
    one pass."""
    if not kinds or not linears:
        return {}
    statistic = kinds[0] if len(kinds) == 1 else Several.of(kinds)
    if index == len(ctx.blocks):
        name, head = next(iter(linears.items()))
        stat = statistic(weight_out_in(head).shape[1], ctx.hidden.device)
        found = {name: head_input_stat(ctx.model, ctx.blocks, head, ctx.calibration, ctx.hidden, ctx.batch_size,
                                       ctx.device, stat)}
    else:
        found = collect_input_stats(ctx.blocks[index], linears, ctx.hidden, ctx.calls[index], ctx.batch_size,
                                    ctx.cancel, statistic)
    if len(kinds) == 1:
        return {kinds[0]: found}
    # linears sharing an input share one result dict, so still one tensor per kind (SparseGPT's prepare runs once)
    return {kind: {name: found[name][kind] for name in linears} for kind in kinds}


@torch.no_grad()
def prune_linear(linear: nn.Module, method: Method, prepared, sparsity: float,
                 config: PruneConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prune one linear in place with the method; return (score, pruned mask, zeros now in it)."""
    weight = weight_out_in(linear)
    score, mask = method.prune(weight, prepared, sparsity, config)
    return score, mask, int((weight == 0).sum())


def summarize(config: PruneConfig, method: str, layers: list[LayerSparsity], seconds: float,
              calibration_seconds: float, peak: int) -> PruneSummary:
    zeros = defaultdict(float)
    sizes = defaultdict(int)
    for layer in layers:
        kind = layer.name.rsplit(".", 1)[-1]
        n = layer.shape[0] * layer.shape[1]
        zeros[kind] += layer.sparsity * n
        sizes[kind] += n
    total = sum(sizes.values())
    return PruneSummary(
        method=method, pattern=str(config.pattern), target_sparsity=config.pattern.sparsity(config.sparsity),
        achieved_sparsity=sum(zeros.values()) / max(1, total),
        by_type={k: zeros[k] / sizes[k] for k in sizes}, layers=layers, pruned_parameters=total,
        settings={**dataclasses.asdict(config), "pattern": str(config.pattern)},
        seconds=seconds, calibration_seconds=calibration_seconds, peak_memory_bytes=peak,
    )


def run_to_end(events: Iterator[Event]) -> PruneSummary:
    """Drain an event stream; return the summary or raise UserError with the reason it stopped."""
    for event in events:
        if isinstance(event, RunFinished):
            return event.summary
        if isinstance(event, (RunCancelled, RunFailed)):
            raise UserError(f"Pruning did not finish: {event.reason}")
    raise UserError("Pruning did not finish.")
