"""Structured pruning: whole MLP channels (rows of gate/up, columns of down) and attention heads (whole key/value
groups with their query heads) removed from every decoder block, block by block, the linears replaced by smaller
ones and the config updated, so that the model in memory, the chat and the export are really smaller and faster.

As FLAP's reference (CASIA-IVA-Lab/FLAP) does, every choice is read at the inputs of o_proj and down_proj: a method's
channel_score rates each of their input channels (Wanda-sp: mean |W| x ||X||; FLAP: variance x squared column norm;
magnitude: column norm), a head group is rated by the sum over its channels, and the highest are kept. FLAP adds the
removed channels' mean input times their weight columns back as the output bias (where the family's config has a
bias to hold it). Widths: uniform (every block alike) or adaptive (FLAP's AL-AM: each block's scores standardised,
then ranked across blocks and modules on the dense model, each unit weighted by the parameters it holds).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import threading
import time
from typing import Iterator

import torch
from torch import nn

from .architecture import capture_block_inputs, find_blocks
from .config import PruneConfig, default_batch_size, refuse_without_activations
from .errors import UserError
from .events import (BlockFinished, BlockShrunk, BlockStarted, Event, LayerSparsity, Progress, PruneSummary,
                     RunFinished, RunStarted)
from .memory import peak_bytes
from .methods import BlockMasked, Method, RunContext, Step, get_method
from .passes import Cancelled, close_stage, collect_input_stats, drive, run_block
from .statistics import Moments

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# model_type -> name: the families whose modeling code reads each block's widths from its weights (heads from q/k/v's
# shapes, the MLP from its linears), checked against transformers 5
FAMILIES = {"llama": "LLaMA", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2",
            "gemma3_text": "Gemma 3"}
# the config flags that give o_proj / down_proj a bias (LLaMA's attention_bias gives q/k/v one too: zeros here);
# Mistral and Qwen2 have none, so FLAP's compensation is skipped there (and said so)
BIAS_SLOTS = {"llama": ("attention_bias", "mlp_bias"), "qwen3": ("attention_bias", None),
              "gemma2": ("attention_bias", None), "gemma3_text": ("attention_bias", None)}


@dataclasses.dataclass
class Layout:
    """One decoder block's attention and MLP, and what a head group and an MLP channel cost in weights."""

    attention: nn.Module
    mlp: nn.Module
    head_dim: int
    hidden: int

    @property
    def kv_heads(self) -> int:
        return self.attention.k_proj.out_features // self.head_dim

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.attention.q_proj.out_features // self.attention.k_proj.out_features

    @property
    def channels(self) -> int:
        return self.mlp.down_proj.in_features

    @property
    def names(self) -> tuple[str, ...]:
        return ATTENTION + tuple(n for n in MLP if hasattr(self.mlp, n))

    def linear(self, name: str) -> nn.Linear:
        return getattr(self.attention if name in ATTENTION else self.mlp, name)

    @property
    def group_cost(self) -> int:
        return self.hidden * self.head_dim * (2 * self.group + 2)

    @property
    def channel_cost(self) -> int:
        return self.hidden * (len(self.names) - len(ATTENTION))

    def weights(self) -> int:
        return sum(self.linear(n).weight.numel() for n in self.names)


def text_config(model: nn.Module):
    return model.config.get_text_config()


def layouts(model: nn.Module) -> list[Layout]:
    """Every block's layout; refuses, naming what is missing, a model of any other family."""
    config = text_config(model)
    kind = getattr(config, "model_type", "")
    _, blocks = find_blocks(model)
    attention, mlp = getattr(blocks[0], "self_attn", None), getattr(blocks[0], "mlp", None)
    missing = [f"self_attn.{n}" for n in ATTENTION if not isinstance(getattr(attention, n, None), nn.Linear)]
    missing += [f"mlp.{n}" for n in MLP[1:] if not isinstance(getattr(mlp, n, None), nn.Linear)]
    if kind not in FAMILIES or missing:
        why = (f"its blocks have no {', '.join(missing)}" if missing else
               "its modeling code was not checked to read smaller blocks from their weights")
        raise UserError(f"Structured pruning supports the {', '.join(FAMILIES.values())} families; "
                        f"{type(model).__name__} ({kind or 'no model_type'}) is not one of them: {why}.")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [Layout(block.self_attn, block.mlp, head_dim, config.hidden_size) for block in blocks]


def uniform_widths(layout: Layout, sparsity: float) -> tuple[int, int]:
    """(head groups, MLP channels) every block keeps so that `sparsity` of its linears' weights go: whole key/value
    groups first (rounded down), the MLP channels making up the rest. Refuses a fraction that would leave a block
    without a head or a channel."""
    total = layout.kv_heads * layout.group_cost + layout.channels * layout.channel_cost
    groups = min(layout.kv_heads - 1, math.floor(sparsity * layout.kv_heads))
    channels = round((sparsity * total - groups * layout.group_cost) / layout.channel_cost)
    if channels >= layout.channels:
        most = 1 - (layout.group_cost + layout.channel_cost) / total
        raise UserError(f"Removing {sparsity:.0%} of each block's linear weights would leave it no MLP channel: "
                        f"a block keeps at least one key/value group and one channel, so at most {most:.1%} can go.")
    return layout.kv_heads - groups, layout.channels - max(0, channels)


def standardised(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std within one block's module, as FLAP's AL-AM (a constant vector: zeros)."""
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def adaptive_widths(found: list[Layout], attention: list[torch.Tensor], mlp: list[torch.Tensor],
                    sparsity: float) -> list[tuple[int, int]]:
    """FLAP's AL-AM: each block's channel scores standardised per module (a head group: the mean over its
    channels), every unit of every block ranked together, and the highest kept while their weights add up to
    (1 - sparsity) of all (the cut where the running total comes closest). Each block keeps at least one of each."""
    scores, costs, owners = [], [], []
    for i, (layout, a, m) in enumerate(zip(found, attention, mlp)):
        groups = standardised(a).view(layout.kv_heads, -1).mean(dim=1)
        for kind, values, cost in ((0, groups, layout.group_cost), (1, standardised(m), layout.channel_cost)):
            scores.append(values)
            costs.append(torch.full_like(values, float(cost), dtype=torch.float64))
            owners.append(torch.full((len(values),), 2 * i + kind))
    scores, costs, owners = torch.cat(scores), torch.cat(costs), torch.cat(owners)
    order = torch.argsort(scores, descending=True, stable=True)
    running = costs[order].cumsum(0)
    count = int(torch.argmin((running - (1 - sparsity) * costs.sum()).abs())) + 1
    kept = torch.bincount(owners[order[:count]], minlength=2 * len(found)).clamp_(min=1)
    return [(int(kept[2 * i]), int(kept[2 * i + 1])) for i in range(len(found))]


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ties to the lower index, in ascending order (the kept rows keep theirs)."""
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def channel_scores(method: Method, layout: Layout,
                   moments: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input channel of o_proj and of down_proj (FLAP squares the attention's, as its reference)."""
    attention = method.channel_score(layout.attention.o_proj.weight, moments.get("o_proj"))
    return attention.pow(method.head_score_power), method.channel_score(layout.mlp.down_proj.weight,
                                                                        moments.get("down_proj"))


def head_rows(groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """The rows (or o_proj's columns) of the kept groups, `per_group` rows each."""
    return (groups[:, None] * per_group + torch.arange(per_group, device=groups.device)).reshape(-1)


def resized(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
            bias: bool = False, extra: torch.Tensor | None = None) -> nn.Linear:
    """A new linear holding the given rows and columns of the old one's weight; a bias if the old one had one or
    `bias` asks (zeros), plus `extra`."""
    weight = linear.weight.detach()
    weight = weight if rows is None else weight[rows.to(weight.device)]
    weight = weight if cols is None else weight[:, cols.to(weight.device)]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias or linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    new.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if new.bias is not None:
        old = (linear.bias.detach() if linear.bias is not None else
               torch.zeros(linear.out_features, device=weight.device, dtype=weight.dtype))
        old = old if rows is None else old[rows.to(old.device)]
        new.bias = nn.Parameter((old + (extra.to(old.dtype) if extra is not None else 0)).clone(), requires_grad=False)
    return new


def compensation(linear: nn.Linear, kept: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """FLAP's bias: the removed input channels' mean input times their weight columns, W[:, removed] @ mean[removed]."""
    removed = torch.ones(linear.in_features, dtype=torch.bool)
    removed[kept.cpu()] = False
    removed = removed.to(linear.weight.device)
    return linear.weight.detach().float()[:, removed] @ mean.to(linear.weight.device).float()[removed]


class StructuredRun:
    """One structured run, in the order it happens; `prune_structured` drives it. The replaced linears are kept
    (parent, name, old module) so that a stop or a failure puts the dense block back."""

    def __init__(self, model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None,
                 cancel: threading.Event | None, steps: tuple[Step, ...]):
        self.method = method = get_method(config.method)
        self.layouts = layouts(model)
        if method.needs_activations and (calibration is None or calibration.numel() == 0):
            raise UserError(f"{method.name} needs calibration data; none was given.")
        self.hooks = (*config.steps(), *steps)
        for hook in self.hooks:
            if getattr(hook, "needs_activations", False):
                refuse_without_activations(type(hook), method)
        self.model, self.config, self.cancel, self.started = model, config, cancel, time.perf_counter()
        blocks_name, blocks = find_blocks(model)
        self.names = [{f"{blocks_name}.{i}.{self.qualified(layout, n)}": n for n in layout.names}
                      for i, layout in enumerate(self.layouts)]
        calibrated = calibration if calibration is not None and method.needs_activations else None
        nsamples, seqlen = calibrated.shape if calibrated is not None else (0, 0)
        device = next(model.parameters()).device
        stages = [{q: layout.linear(n) for q, n in names.items()} for names, layout in zip(self.names, self.layouts)]
        self.ctx = RunContext(model, config.pattern, config.sparsity, blocks, stages, calibrated, None, None, config.batch_size or default_batch_size(device, seqlen), device,
                              [config.sparsity] * len(blocks), cancel)
        self.samples = (int(nsamples), int(seqlen))
        self.dense_copies = any(type(h).after_masking is not Step.after_masking for h in self.hooks)
        kind = getattr(text_config(model), "model_type", "")
        slots = BIAS_SLOTS.get(kind, (None, None))
        self.bias_slots = slots if method.compensates else (None, None)
        self.parameters_before = sum(p.numel() for p in model.parameters())
        self.dense_shapes = [(layout.kv_heads, layout.group, layout.channels, layout.weights())
                             for layout in self.layouts]
        self.widths: list[tuple[int, int]] = []
        self.replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self.layers: list[LayerSparsity] = []
        self.calibration_seconds = 0.0
        self.current_layer: str | None = None  # the block being shrunk, for a failure's message
        self.done = False

    @staticmethod
    def qualified(layout: Layout, name: str) -> str:
        return f"self_attn.{name}" if name in ATTENTION else f"mlp.{name}"

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled

    def started_event(self, model_name: str) -> RunStarted:
        return RunStarted(model_name, self.method.name, "structured", self.config.sparsity,
                          [list(names) for names in self.names], sum(len(n) for n in self.names), *self.samples,
                          self.ctx.batch_size, self.method.score_label)

    def moments(self, index: int, hidden: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """statistics.Moments of o_proj's and down_proj's inputs in block `index` (none without calibration)."""
        if hidden is None:
            return {}
        layout, ctx = self.layouts[index], self.ctx
        t = time.perf_counter()
        found = collect_input_stats(ctx.blocks[index], {"o_proj": layout.attention.o_proj,
                                                        "down_proj": layout.mlp.down_proj},
                                    hidden, ctx.calls[index], ctx.batch_size, self.cancel, Moments)
        self.calibration_seconds += time.perf_counter() - t
        return found

    def before_pruning(self) -> Iterator[Event]:
        ctx = self.ctx
        if ctx.calibration is not None:
            ctx.hidden, ctx.calls = capture_block_inputs(ctx.model, ctx.blocks, ctx.calibration, ctx.batch_size,
                                                         ctx.device)
        if self.config.widths == "adaptive":
            yield from self.adaptive()
        else:
            self.widths = [uniform_widths(layout, self.config.sparsity) for layout in self.layouts]
        for hook in self.hooks:
            yield from hook.before_pruning(ctx) or ()

    def adaptive(self) -> Iterator[Event]:
        """A pass over the dense model (its own hidden states, apart from the run's): every block's scores, then the
        widths chosen from all of them at once."""
        ctx, attention, mlp = self.ctx, [], []
        hidden = ctx.hidden.clone() if ctx.hidden is not None else None
        for index, layout in enumerate(self.layouts):
            self.check_cancel()
            a, m = channel_scores(self.method, layout, self.moments(index, hidden))
            attention.append(a.cpu())
            mlp.append(m.cpu())
            if hidden is not None and index < len(self.layouts) - 1:
                run_block(ctx.blocks[index], hidden, ctx.calls[index], ctx.batch_size, self.cancel)
            yield Progress("scoring the dense blocks for adaptive widths", index + 1, len(self.layouts))
        del hidden
        self.widths = adaptive_widths(self.layouts, attention, mlp, self.config.sparsity)
        weights = [d[3] for d in self.dense_shapes]
        kept = [g * layout.group_cost + c * layout.channel_cost for (g, c), layout in zip(self.widths, self.layouts)]
        ctx.sparsities = [1 - k / w for k, w in zip(kept, weights)]  # each BlockStarted says its own

    def stage(self, index: int) -> Iterator[Event]:
        ctx, layout = self.ctx, self.layouts[index]
        self.check_cancel()
        started = time.perf_counter()
        self.current_layer = f"block {index}"
        yield BlockStarted(index, self.current_layer, len(layout.names), ctx.sparsities[index])
        for hook in reversed(self.hooks):
            hook.before_stage(ctx, index)
        moments = self.moments(index, ctx.hidden)
        attention, mlp = channel_scores(self.method, layout, moments)
        kept_groups, kept_channels = self.widths[index]
        groups = top(attention.view(layout.kv_heads, -1).sum(dim=1), kept_groups)
        channels = top(mlp, kept_channels)
        dense = copy.deepcopy(ctx.blocks[index]) if self.dense_copies else None
        before = layout.weights()
        self.shrink(index, groups, channels, moments)
        after = layout.weights()
        kv, group, width, _ = self.dense_shapes[index]
        yield BlockShrunk(index, layout.channels, width, layout.kv_heads * group, kv * group, before, after)
        linears = {q: layout.linear(n) for q, n in self.names[index].items()}
        nothing_pruned = {q: torch.zeros_like(linear.weight, dtype=torch.bool) for q, linear in linears.items()}
        masked = BlockMasked(index, linears, nothing_pruned if dense is not None else {}, {}, dense_block=dense)
        for hook in self.hooks:
            hook.after_masking(ctx, masked)
        del masked, dense
        self.calibration_seconds += close_stage(ctx, self.hooks, index,
                                                ctx.hidden is not None and index < len(ctx.blocks) - 1)
        self.current_layer = None
        yield BlockFinished(index, time.perf_counter() - started, 1 - after / before, peak_bytes(ctx.device))

    @torch.no_grad()
    def shrink(self, index: int, groups: torch.Tensor, channels: torch.Tensor,
               moments: dict[str, torch.Tensor | None]) -> None:
        """Replace the block's linears by smaller ones holding the kept groups and channels (and FLAP's bias)."""
        layout = self.layouts[index]
        attention_bias, mlp_bias = (slot is not None for slot in self.bias_slots)
        kv, group, width, _ = self.dense_shapes[index]
        q_rows = head_rows(groups, group * layout.head_dim)
        kv_rows = head_rows(groups, layout.head_dim)
        o_extra = compensation(layout.attention.o_proj, q_rows, moments["o_proj"][0]) if attention_bias else None
        down_extra = compensation(layout.mlp.down_proj, channels, moments["down_proj"][0]) if mlp_bias else None
        new = {"q_proj": resized(layout.attention.q_proj, rows=q_rows, bias=attention_bias),
               "k_proj": resized(layout.attention.k_proj, rows=kv_rows, bias=attention_bias),
               "v_proj": resized(layout.attention.v_proj, rows=kv_rows, bias=attention_bias),
               "o_proj": resized(layout.attention.o_proj, cols=q_rows, bias=attention_bias, extra=o_extra),
               "up_proj": resized(layout.mlp.up_proj, rows=channels, bias=mlp_bias),
               "down_proj": resized(layout.mlp.down_proj, cols=channels, bias=mlp_bias, extra=down_extra)}
        if hasattr(layout.mlp, "gate_proj"):
            new["gate_proj"] = resized(layout.mlp.gate_proj, rows=channels, bias=mlp_bias)
        for qualified, name in self.names[index].items():
            parent = layout.attention if name in ATTENTION else layout.mlp
            old = getattr(parent, name)
            self.replaced.append((parent, name, old))
            setattr(parent, name, new[name])
            self.ctx.stages[index][qualified] = new[name]
            removed = 1 - new[name].weight.numel() / old.weight.numel()
            self.layers.append(LayerSparsity(qualified, index, (old.out_features, old.in_features), removed))

    def finished(self) -> RunFinished:
        self.done = True
        self.replaced.clear()
        compensated = update_config(self.model, self.layouts, self.bias_slots)
        blocks = [{"kept_heads": layout.kv_heads * group, "total_heads": kv * group, "kept_kv_heads": layout.kv_heads,
                   "total_kv_heads": kv, "kept_channels": layout.channels, "total_channels": width}
                  for layout, (kv, group, width, _) in zip(self.layouts, self.dense_shapes)]
        total = sum(d[3] for d in self.dense_shapes)
        after = sum(layout.weights() for layout in self.layouts)
        uniform = len({(b["kept_heads"], b["kept_channels"]) for b in blocks}) == 1
        structure = {"widths": self.config.widths, "blocks": blocks, "uniform": uniform,
                     "bias_compensation": compensated, "export": export_note(uniform)}
        by_type: dict[str, list[int]] = {}
        for layer in self.layers:
            kind = layer.name.rsplit(".", 1)[-1]
            n = layer.shape[0] * layer.shape[1]
            by_type.setdefault(kind, [0, 0])
            by_type[kind][0] += round(layer.sparsity * n)
            by_type[kind][1] += n
        summary = PruneSummary(
            method=self.method.name, pattern="structured", target_sparsity=self.config.sparsity,
            achieved_sparsity=1 - after / total, by_type={k: r / n for k, (r, n) in by_type.items()},
            layers=self.layers, pruned_parameters=total,
            settings={**dataclasses.asdict(self.config), "pattern": "structured"},
            seconds=time.perf_counter() - self.started, calibration_seconds=self.calibration_seconds,
            peak_memory_bytes=peak_bytes(self.ctx.device), parameters_before=self.parameters_before,
            parameters_after=sum(p.numel() for p in self.model.parameters()), structure=structure)
        return RunFinished(summary)

    def restore(self) -> bool:
        """Put every replaced linear back: the dense model whole again."""
        for parent, name, old in reversed(self.replaced):
            setattr(parent, name, old)
        self.replaced.clear()
        return True


def export_note(uniform: bool) -> str:
    if uniform:
        return ("every block has the same widths: config.json says them, and any runtime that reads the family "
                "(transformers' AutoModelForCausalLM without remote code, vLLM, llama.cpp's converter) reads it")
    return ("the blocks have different widths, which no standard config can say: the export pads every block with "
            "zero channels and heads to the widest, which gives the same logits and loads anywhere the family loads "
            "(transformers without remote code, vLLM, llama.cpp's converter), at the widest block's size and speed; "
            "config.json's structured_widths lists each block's real widths")


def update_config(model: nn.Module, found: list[Layout], slots: tuple[str | None, str | None]) -> dict:
    """The config says the pruned widths (the widest block's, with each block's in structured_widths where they
    differ), an explicit head_dim, and the bias flags compensation turned on; which compensation was made."""
    config = text_config(model)
    channels = [layout.channels for layout in found]
    kv = [layout.kv_heads for layout in found]
    config.intermediate_size = max(channels)
    config.num_key_value_heads = max(kv)
    config.num_attention_heads = max(kv) * found[0].group
    config.head_dim = found[0].head_dim
    if len(set(channels)) > 1 or len(set(kv)) > 1:
        config.structured_widths = {"intermediate_size": channels, "num_key_value_heads": kv}
    elif hasattr(config, "structured_widths"):
        del config.structured_widths
    for slot in slots:
        if slot is not None:
            setattr(config, slot, True)
    return {"o_proj": slots[0] is not None, "down_proj": slots[1] is not None}


def padded(linear: nn.Linear, rows: int = 0, cols: int = 0) -> nn.Linear:
    """A copy with `rows` zero output rows (and zero biases) and `cols` zero input columns appended."""
    weight = nn.functional.pad(linear.weight.detach(), (0, cols, 0, rows))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        new.bias = nn.Parameter(nn.functional.pad(linear.bias.detach(), (0, rows)), requires_grad=False)
    return new


@contextlib.contextmanager
def padded_to_widest(model: nn.Module) -> Iterator[None]:
    """For as long as it lasts, every block narrower than the widest holds zero channels and zero head groups up to
    it: save_pretrained then writes what the config says, and the logits are the same (a zero MLP channel adds
    nothing; a zero head attends uniformly to zero values). A model with one width is left alone."""
    if not getattr(text_config(model), "structured_widths", None):
        yield
        return
    found = layouts(model)
    channels, kv = max([l.channels for l in found]), max([l.kv_heads for l in found])
    swaps = []
    for layout in found:
        more_channels, more_groups = channels - layout.channels, kv - layout.kv_heads
        heads = more_groups * layout.head_dim
        wider = {"q_proj": padded(layout.attention.q_proj, rows=heads * layout.group),
                 "k_proj": padded(layout.attention.k_proj, rows=heads),
                 "v_proj": padded(layout.attention.v_proj, rows=heads),
                 "o_proj": padded(layout.attention.o_proj, cols=heads * layout.group),
                 "up_proj": padded(layout.mlp.up_proj, rows=more_channels),
                 "down_proj": padded(layout.mlp.down_proj, cols=more_channels)}
        if hasattr(layout.mlp, "gate_proj"):
            wider["gate_proj"] = padded(layout.mlp.gate_proj, rows=more_channels)
        if more_channels or more_groups:
            for name, linear in wider.items():
                parent = layout.attention if name in ATTENTION else layout.mlp
                swaps.append((parent, name, getattr(parent, name)))
                setattr(parent, name, linear)
    try:
        yield
    finally:
        for parent, name, old in reversed(swaps):
            setattr(parent, name, old)


def validate_structured(model: nn.Module, config: PruneConfig) -> None:
    """What can fail before a weight is touched: the family, and a fraction too large for the blocks."""
    for layout in layouts(model):
        uniform_widths(layout, config.sparsity)


def prune_structured(model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None = None,
                     cancel: threading.Event | None = None, model_name: str = "model",
                     steps: tuple[Step, ...] = ()) -> Iterator[Event]:
    """Prune the model's blocks structurally in place, yielding the engine's events (with BlockShrunk for each
    block); on a stop or a failure the dense linears are put back."""
    validate_structured(model, config)
    run = StructuredRun(model, config, calibration, cancel, steps)
    yield from drive(run, len(run.layouts), model_name)
