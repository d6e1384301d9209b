"""Block reconstruction: once a block's masks are fixed, a few epochs of Adam on its kept weights bring the pruned
block's outputs back towards the dense block's on the same calibration inputs, the masks held (the regional
optimisation of Wanda++, Yang et al. 2025). It works after any method; no weight outside the block moves."""

from __future__ import annotations

import torch
from torch import nn

from transformers.pytorch_utils import Conv1D

from ..architecture import BlockCall
from ..passes import Cancelled
from .base import BlockMasked, RunContext, Step


def detached(value):
    """A copy of what the model passes a block, usable by autograd (the capture ran in inference mode)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v) for v in value)
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value


def stored_like(linear: nn.Module, out_in: torch.Tensor) -> torch.Tensor:
    """A (C_out, C_in) tensor laid out as the linear stores its weight (GPT-2's Conv1D keeps it transposed)."""
    return (out_in.t() if isinstance(linear, Conv1D) else out_in).to(linear.weight.device)


def block_outputs(block: nn.Module, call: BlockCall, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([call(block, hidden[s:s + batch_size]).float() for s in range(0, len(hidden), batch_size)])


class Reconstruct(Step):
    def __init__(self, epochs: int = 2, lr: float = 2e-5, batch_size: int = 4):
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.errors: list[tuple[float, float]] = []  # per block: output MSE against dense, before and after

    def after_masking(self, ctx: RunContext, block: BlockMasked) -> None:
        if block.index >= len(ctx.blocks) or not block.linears or ctx.hidden is None:
            return  # the LM head has no block to replay
        module, linears = ctx.blocks[block.index], block.linears
        with torch.inference_mode(False):
            call = BlockCall(detached(ctx.calls[block.index].args), detached(ctx.calls[block.index].kwargs),
                             ctx.calls[block.index].hidden_as_kwarg)
            hidden = ctx.hidden.clone()
            self.errors.append(self.fit(module, call, hidden, linears, block, ctx))

    def fit(self, module, call, hidden, linears, block, ctx) -> tuple[float, float]:
        dtype = next(module.parameters()).dtype
        flags = {p: p.requires_grad for p in module.parameters()}
        pruned = {name: linear.weight.detach().clone() for name, linear in linears.items()}
        with torch.no_grad():  # the dense block's outputs on the same inputs are the targets
            for name, linear in linears.items():
                linear.weight.copy_(block.dense_weights[name])  # stored as the weight is (Conv1D: transposed)
            targets = block_outputs(module, call, hidden, self.batch_size)
            for name, linear in linears.items():
                linear.weight.copy_(pruned[name])
        del pruned
        keep = {linear: stored_like(linear, ~block.masks[name]) for name, linear in linears.items()}
        module.float()  # fp32 while optimising; bf16/fp16 weights round-trip exactly
        for p in module.parameters():
            p.requires_grad_(False)
        weights = [linear.weight for linear in linears.values()]
        for w in weights:
            w.requires_grad_(True)
        optimizer = torch.optim.Adam(weights, lr=self.lr)
        generator = torch.Generator().manual_seed(0)
        before = self.error(module, call, hidden, targets)
        try:
            with torch.enable_grad():
                for _ in range(self.epochs):
                    order = torch.randperm(len(hidden), generator=generator)
                    for start in range(0, len(hidden), self.batch_size):
                        if ctx.cancel is not None and ctx.cancel.is_set():
                            raise Cancelled
                        rows = order[start:start + self.batch_size]
                        out = call(module, hidden[rows].float())
                        loss = torch.nn.functional.mse_loss(out.float(), targets[rows])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        with torch.no_grad():
                            for linear, k in keep.items():
                                linear.weight.mul_(k)
        finally:
            del optimizer
            for p, flag in flags.items():
                p.requires_grad_(flag)
            module.to(dtype)
        return before, self.error(module, call, hidden, targets)

    def error(self, module, call, hidden, targets) -> float:
        outputs = block_outputs(module, call, hidden.to(next(module.parameters()).dtype), self.batch_size)
        return float(torch.nn.functional.mse_loss(outputs, targets))
