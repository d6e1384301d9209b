"""The block-by-block pruning loop: capture inputs, collect statistics, prune, re-run, emit events."""

from __future__ import annotations

import dataclasses
import fnmatch
import threading
import time
from collections import defaultdict
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .architecture import capture_block_inputs, find_blocks, find_head, find_linears, head_input_stat, weight_out_in
from .config import PruneConfig, default_batch_size, refuse_without_activations
from .errors import UserError
from .events import (BlockFinished, BlockStarted, Event, LayerSparsity, LinearPruned, PruneSummary, RunFinished,
                     RunStarted, TargetsChosen)
from .explain import explain
from .masks import Selection
from .memory import keep_freed_memory_mapped, peak_bytes
from .methods import BlockMasked, Method, RunContext, Step, get_method
from .passes import Cancelled, close_stage, collect_input_stats, drive
from .statistics import Several, SquaredMean
from .structured import prune_structured, validate_structured

MAP_SIZE = 128


def select_linears(model: nn.Module, config: PruneConfig) -> tuple[nn.ModuleList, list[dict[str, nn.Module]]]:
    """The decoder blocks and, per block, the linears to prune by qualified name; the LM head as one more
    stage after the blocks when asked for (never the input embeddings on their own)."""
    blocks_name, blocks = find_blocks(model)
    stages = []
    for i, block in enumerate(blocks):
        chosen = {}
        for name, linear in find_linears(block).items():
            full = f"{blocks_name}.{i}.{name}"
            if config.include and not any(fnmatch.fnmatchcase(full, p) for p in config.include):
                continue
            if any(fnmatch.fnmatchcase(full, p) for p in config.exclude):
                continue
            chosen[full] = linear
        stages.append(chosen)
    if config.prune_head:
        head = find_head(model)
        if head is None:
            raise UserError(f"{type(model).__name__} has no linear LM head to prune.")
        stages.append({} if any(fnmatch.fnmatchcase(head[0], p) for p in config.exclude) else dict([head]))
    if not any(stages):
        raise UserError("The include/exclude patterns select no linear layer to prune.")
    return blocks, stages


def validate(model: nn.Module, config: PruneConfig) -> None:
    """The checks of the configuration against this model that can fail before a weight is touched."""
    if config.pattern.structured:
        validate_structured(model, config)
        return
    _, stages = select_linears(model, config)
    if config.pattern.nm:
        for linears in stages:
            for name, linear in linears.items():
                width = weight_out_in(linear).shape[1]
                if width % config.pattern.m:
                    raise UserError(f"Pattern {config.pattern} needs every pruned layer's input width to be a multiple of "
                                    f"{config.pattern.m}; {name} has {width}. Exclude it or pick another M.")


def pooled(x: torch.Tensor) -> np.ndarray:
    """Mean-pool a (C_out, C_in) map to at most 128 x 128 float32 for plotting."""
    size = (min(MAP_SIZE, x.shape[0]), min(MAP_SIZE, x.shape[1]))
    return F.adaptive_avg_pool2d(x.float()[None, None], size)[0, 0].cpu().numpy()


class Run:
    """One pruning run, in the order it happens: the stages to prune, what the hooks see of it (ctx), the dense weights
    kept to restore on a stop or failure, and what was pruned so far. `prune` drives it."""

    def __init__(self, model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None,
                 cancel: threading.Event | None, steps: tuple[Step, ...], bounded: bool = False):
        validate(model, config)
        self.method = method = get_method(config.method)
        self.hooks = (method, *config.steps(), *steps)
        if method.needs_activations and (calibration is None or calibration.numel() == 0):
            raise UserError(f"{method.name} needs calibration data; none was given.")
        blocks, stages = select_linears(model, config)
        self.config, self.cancel, self.bounded, self.started = config, cancel, bounded, time.perf_counter()
        device = next(model.parameters()).device
        nsamples, seqlen = calibration.shape if method.needs_activations else (0, 0)
        self.ctx = RunContext(model, config.pattern, config.sparsity, blocks, stages, calibration if method.needs_activations else None, None,
                              None, config.batch_size or default_batch_size(device, seqlen), device,
                              [config.sparsity] * len(stages), cancel)
        self.samples = (int(nsamples), int(seqlen))
        self.kinds = statistic_kinds(method, self.hooks, config)
        # hooks that read a stage's masks and dense weights after masking (DSnoT, reconstruction); without them
        # neither is kept (a linear's mask and score go as soon as its event is made)
        self.keep_masks = any(type(h).after_masking is not Step.after_masking for h in self.hooks)
        # each pruned weight's dense values, on the host: to restore, and for those hooks
        self.keep_dense = config.restore_on_abort or self.keep_masks
        self.backup: dict[nn.Module, torch.Tensor] = {}
        self.layers: list[LayerSparsity] = []
        self.calibration_seconds = 0.0
        self.current_layer: str | None = None
        self.done = False

    @property
    def total_linears(self) -> int:
        return sum(len(s) for s in self.ctx.stages)

    def started_event(self, model_name: str) -> RunStarted:
        c = self.config
        return RunStarted(model_name, self.method.name, str(c.pattern), c.pattern.sparsity(c.sparsity),
                          [list(s) for s in self.ctx.stages], self.total_linears, *self.samples, self.ctx.batch_size,
                          self.method.score_label)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled

    def before_pruning(self) -> Iterator[Event]:
        """The first block's inputs captured, then each hook's look at the dense model (OWL's targets)."""
        ctx = self.ctx
        for hook in self.hooks[1:]:  # options, and a caller's own steps (the config checked its options already)
            if getattr(hook, "needs_activations", False):
                refuse_without_activations(type(hook), self.method)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        else:
            keep_freed_memory_mapped(not self.bounded)
        if ctx.calibration is not None:
            ctx.hidden, ctx.calls = capture_block_inputs(ctx.model, ctx.blocks, ctx.calibration, ctx.batch_size,
                                                         ctx.device)
        for hook in self.hooks:
            yield from hook.before_pruning(ctx) or ()
        if ctx.target_note or any(s != self.config.sparsity for s in ctx.sparsities):
            yield TargetsChosen(list(ctx.sparsities), ctx.target_note, ctx.target_basis)

    def stage(self, index: int) -> Iterator[Event]:
        """One block (or the LM head): its statistics, its linears masked, the hooks after masking, its pruned
        outputs computed for the next block."""
        ctx, linears = self.ctx, self.ctx.stages[index]
        self.check_cancel()
        is_head = index == len(ctx.blocks)
        started = time.perf_counter()
        yield BlockStarted(index, next(iter(linears), "head") if is_head else f"block {index}", len(linears),
                           None if self.config.pattern.nm else ctx.sparsities[index])
        for hook in reversed(self.hooks):
            hook.before_stage(ctx, index)
        t = time.perf_counter()
        statistics = stage_statistics(ctx, self.kinds, index, linears)
        self.calibration_seconds += time.perf_counter() - t
        masked = BlockMasked(index, linears, {}, {}, statistics)
        yield from self.mask_linears(masked)
        for hook in self.hooks:
            hook.after_masking(ctx, masked)
        del masked
        feed_next = ctx.calibration is not None and not is_head and (
            index < len(ctx.blocks) - 1 or len(ctx.stages) > len(ctx.blocks))
        self.calibration_seconds += close_stage(ctx, self.hooks, index, feed_next)
        stage = [layer for layer in self.layers if layer.block == index]
        elements = sum(layer.shape[0] * layer.shape[1] for layer in stage)
        zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in stage)
        yield BlockFinished(index, time.perf_counter() - started, zeros / max(1, elements), peak_bytes(ctx.device))

    def mask_linears(self, masked: BlockMasked) -> Iterator[LinearPruned]:
        """Each linear of the stage scored and masked by the method (linears sharing an input share its prepared
        statistic), its dense weight kept as asked, an event with its maps."""
        ctx, index = self.ctx, masked.index
        stats = masked.statistics.get(self.method.statistic, {})
        selection = self.config.selection(ctx.sparsities[index])
        prepared: dict[int, object] = {}  # per shared statistic
        for name, linear in masked.linears.items():
            self.check_cancel()
            self.current_layer = name
            t = time.perf_counter()
            if self.keep_dense:  # in host memory: a GPU holds no second copy of the model
                masked.dense_weights[name] = linear.weight.detach().to("cpu", copy=True)
            if self.config.restore_on_abort:
                self.backup[linear] = masked.dense_weights[name]
            stat = stats.get(name)
            if id(stat) not in prepared:
                prepared[id(stat)] = self.method.prepare(stat)
            why = (explain(weight_out_in(linear), masked.statistics[SquaredMean][name], selection, pooled)
                   if self.config.explain and SquaredMean in masked.statistics else None)
            score, mask, zeros = prune_linear(linear, self.method, prepared[id(stat)], selection)
            maps, shape = (pooled(score), pooled(~mask)), tuple(mask.shape)
            if self.keep_masks:
                masked.masks[name] = mask
            del score, mask  # before the event is handed on: the next linear's scoring must not meet them
            self.layers.append(LayerSparsity(name, index, shape, zeros / (shape[0] * shape[1])))
            yield LinearPruned(index, name, shape, zeros / (shape[0] * shape[1]), *maps, time.perf_counter() - t,
                               len(self.layers), self.total_linears, why)
        self.current_layer = None

    def finished(self) -> RunFinished:
        self.done = True
        self.backup.clear()
        summary = summarize(self.config, self.method.name, self.layers, time.perf_counter() - self.started,
                            self.calibration_seconds, peak_bytes(self.ctx.device))
        summary.parameters_before = summary.parameters_after = sum(p.numel() for p in self.ctx.model.parameters())
        return RunFinished(summary)

    @torch.no_grad()
    def restore(self) -> bool:
        """Put every pruned weight back as it was; True when the dense model is whole again."""
        for linear, weight in self.backup.items():
            linear.weight.copy_(weight)
        self.backup.clear()
        return self.config.restore_on_abort


def prune(model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None = None,
          cancel: threading.Event | None = None, model_name: str = "model", steps: tuple[Step, ...] = (),
          bounded: bool = False) -> Iterator[Event]:
    """Prune the model in place, block by block, yielding events.

    calibration: (nsamples, seqlen) token ids, needed by methods that read activations. steps: hooks that run around
    the loop after the method's own and the options' (methods/base.py), except around a stage: their before_stage
    runs first and their after_stage last (offload brings a block in before anything reads it, and out after
    everything else is done with it). bounded: a run under a memory budget hands freed memory back to the OS at
    once, so its peak is what it holds (a few percent slower on CPU). On cancellation, a failure, or the consumer
    closing the stream, every pruned weight is restored (unless restore_on_abort is off).
    """
    if config.pattern.structured:
        yield from prune_structured(model, config, calibration, cancel, model_name, steps)
        return
    run = Run(model, config, calibration, cancel, steps, bounded)
    yield from drive(run, len(run.ctx.stages), model_name)


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
def prune_linear(linear: nn.Module, method: Method, prepared, selection: Selection) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prune one linear in place with the method; return (score, pruned mask, zeros now in it)."""
    weight = weight_out_in(linear)
    score, mask = method.prune(weight, prepared, selection)
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
