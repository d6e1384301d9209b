"""Where a decoder LM keeps its blocks and linears, discovered from the model itself, and how to replay a block."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .distributed import merge
from .errors import UserError

LINEAR_TYPES = (nn.Linear, Conv1D)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of same-class modules, each holding linears, with the most parameters."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not find_linears(module[0]):
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = (name, module), params
    if best is None:
        raise UserError(f"Cannot find decoder blocks in {type(model).__name__}: no list of repeated blocks with linear layers.")
    return best


def find_linears(module: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear and GPT-2 style Conv1D inside a module, by qualified name, in definition order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LINEAR_TYPES)}


def out_in(linear: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped as the linear's weight, as a (C_out, C_in) view, or back: GPT-2's Conv1D stores its weight
    transposed, and the swap is its own inverse."""
    return tensor.t() if isinstance(linear, Conv1D) else tensor


def weight_out_in(linear: nn.Module) -> torch.Tensor:
    """The weight as a (C_out, C_in) view."""
    return out_in(linear, linear.weight)


class StopForward(Exception):
    """Raised from a stubbed block or a hook to end a forward early: nothing after that point is needed."""


@dataclasses.dataclass
class BlockCall:
    """What the model passes a block besides its hidden states: replayed verbatim."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(*self.args, hidden_states=hidden, **self.kwargs) if self.hidden_as_kwarg else block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(args[1:], dict(kwargs), False)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), BlockCall((), kwargs, True)


@contextlib.contextmanager
def stubbed(blocks: nn.ModuleList, make_forward: Callable[[int], Callable]) -> Iterator[None]:
    """Temporarily replace each block's forward (an instance attribute, so the block's own attributes such as
    `attention_type` stay readable by the model's loop)."""
    for i, block in enumerate(blocks):
        block.forward = make_forward(i)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def ending_with(blocks: nn.ModuleList, final: list[torch.Tensor]):
    """The model's own forward with every block skipped, the last one returning final[0]: the outputs of the real
    blocks, computed elsewhere (block by block). What the model does after its blocks (final norm, head) runs as is."""
    def stub(index: int):
        def forward(*args, **kwargs):
            return final[0] if index == len(blocks) - 1 else _split(args, kwargs)[0]
        return forward

    return stubbed(blocks, stub)


def _forward_until_stop(model: nn.Module, ids: torch.Tensor, device: torch.device) -> None:
    try:
        model(input_ids=ids.to(device), use_cache=False)
    except StopForward:
        pass


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> tuple[torch.Tensor, list[BlockCall]]:
    """Run the model's own forward with every block stubbed out, recording the first block's hidden input
    for all samples and the exact extra arguments the model passes each block (position embeddings, masks...).

    The arguments are recorded from a one-sample forward, so they broadcast over any batch of equal-length,
    unpadded windows; blocks whose arguments differ (sliding-window or local/global layers) get their own.
    """
    calls: list[BlockCall | None] = [None] * len(blocks)
    hidden: list[torch.Tensor] = []
    recording = True

    def stub(index: int):
        def forward(*args, **kwargs):
            h, call = _split(args, kwargs)
            if recording:
                calls[index] = call
                if index == len(blocks) - 1:
                    raise StopForward
                return h
            hidden.append(h)
            raise StopForward
        return forward

    with stubbed(blocks, stub):
        _forward_until_stop(model, input_ids[:1], device)
        recording = False
        for start in range(0, len(input_ids), batch_size):
            _forward_until_stop(model, input_ids[start:start + batch_size], device)
    if any(c is None for c in calls):
        raise UserError(f"{type(model).__name__} did not call all of its {len(blocks)} decoder blocks in its forward.")
    return torch.cat(hidden), calls


def find_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The LM head (output embeddings) by qualified name, when it is a linear layer."""
    head = model.get_output_embeddings()
    if not isinstance(head, LINEAR_TYPES):
        return None
    return next(name for name, m in model.named_modules() if m is head), head


@torch.inference_mode()
def head_input_stat(model: nn.Module, blocks: nn.ModuleList, head: nn.Module, input_ids: torch.Tensor,
                    final_hidden: torch.Tensor, batch_size: int, device: torch.device, stat) -> torch.Tensor:
    """A statistic (core.statistics: add(x) per batch, result()) of the LM head's input over all tokens, given
    the last block's (pruned) outputs.

    The model's own forward runs with the blocks stubbed (the last returns final_hidden), so whatever it does
    between the blocks and the head (final norm, projections) is applied exactly; the head's matmul is skipped.
    """
    batch: list[torch.Tensor] = []

    def pre(module, args):
        stat.add(args[0])
        raise StopForward

    handle = head.register_forward_pre_hook(pre)
    try:
        with ending_with(blocks, batch):
            for start in range(0, len(input_ids), batch_size):
                batch[:] = [final_hidden[start:start + batch_size]]
                _forward_until_stop(model, input_ids[start:start + batch_size], device)
    finally:
        handle.remove()
    merge(stat)
    return stat.result()
