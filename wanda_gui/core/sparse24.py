"""2:4 sparse kernels on NVIDIA GPUs: a model's 2:4-pruned linears run as PyTorch's semi-structured sparse tensors
(cuSPARSELt, or CUTLASS) on CUDA devices of compute capability 8.0 or more, in fp16 or bf16. Everywhere else the
option is refused with the reason: no CPU runtime speeds up 2:4, and sparse matmul on a CPU is slower than dense.
Gains on a GPU are modest and shape-dependent, larger with more tokens per call than at batch-1 decoding."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .architecture import weight_out_in
from .masks import Pattern

MIN_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs with sparse tensor cores
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def refusal(device: torch.device, dtype: torch.dtype, pattern: Pattern | str) -> str | None:
    """Why a model on this device, in this dtype, pruned with this pattern cannot run on 2:4 sparse kernels; None
    when it can."""
    if str(pattern) != "2:4":
        return f"2:4 sparse kernels run 2:4 sparsity only, and this model was pruned {pattern}."
    if device.type != "cuda":
        return ("2:4 sparse kernels need an NVIDIA GPU (CUDA, compute capability 8.0+); this model runs on the CPU, "
                "where no runtime speeds 2:4 up (sparse matmul there is slower than dense).")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"2:4 sparse kernels need compute capability 8.0 or more (Ampere or newer); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}.")
    if dtype not in DTYPES:
        return (f"2:4 sparse kernels take fp16 or bf16 weights; this model is {str(dtype).removeprefix('torch.')}: "
                "load it in bf16.")
    return None


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs of every row."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


@contextlib.contextmanager
def sparse_kernels(linears: dict[str, nn.Module]) -> Iterator[list[str]]:
    """Within the block, each 2:4 linear's weight is a semi-structured sparse tensor, so its matmuls run on the
    sparse kernels; after it, the dense weights are back (evaluation and export read those). Yields the names of the
    linears that run sparse: a weight whose shape the kernels do not take stays dense."""
    converter = torch.sparse.to_sparse_semi_structured
    dense: dict[nn.Module, nn.Parameter] = {}
    try:
        for name, linear in linears.items():
            weight = weight_out_in(linear).detach()
            if weight.shape != linear.weight.shape or not is_two_four(weight):  # GPT-2's Conv1D: transposed
                continue
            try:
                sparse = converter(weight.contiguous())
            except (RuntimeError, ValueError):  # a shape below or off the kernels' tile
                continue
            dense[linear] = linear.weight
            linear.weight = nn.Parameter(sparse, requires_grad=False)
        yield [name for name, linear in linears.items() if linear in dense]
    finally:
        for linear, weight in dense.items():
            linear.weight = weight
