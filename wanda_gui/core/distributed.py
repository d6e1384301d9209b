"""Data-parallel calibration under torchrun: each rank runs its share of the calibration windows through the
blocks, the statistics are summed across ranks, and every rank then computes the same masks from the same sums.

Nothing here runs unless the process was started by torchrun (WORLD_SIZE > 1) and `start()` was called.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import UserError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def start(device: str) -> str:
    """Join the torchrun group (gloo on CPU, NCCL on CUDA); return this rank's device (cuda -> cuda:LOCAL_RANK)."""
    if not dist.is_available():
        raise UserError("This torch build has no torch.distributed: run without torchrun.")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device.startswith("cuda")
    if on_cuda:
        if device != "cuda":
            raise UserError(f"Under torchrun each rank takes the GPU of its local rank: pass --device cuda, not {device}.")
        if local >= torch.cuda.device_count():
            raise UserError(f"Local rank {local} has no GPU: this node has {torch.cuda.device_count()}; lower "
                            "--nproc-per-node.")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: every world_size-th from its rank on."""
    if not active():
        return windows
    if len(windows) < world_size():
        raise UserError(f"{len(windows)} calibration samples cannot be shared by {world_size()} processes: use at least "
                        f"--nsamples {world_size()}.")
    return windows[rank()::world_size()]


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum in place over every rank (identical result on all of them)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def merge(statistic) -> None:
    """Make a statistic hold what all ranks accumulated; each rank must call this in the same order."""
    if not active():
        return
    if not hasattr(statistic, "all_reduce"):
        raise UserError(f"{type(statistic).__name__} cannot be combined across torchrun processes: run this method "
                        "or option in a single process.")
    statistic.all_reduce()


def gather(value: int) -> list[int]:
    """Every rank's value, in rank order (one value when not under torchrun)."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
