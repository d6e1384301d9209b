"""Before a run: about how long pruning will take and how much memory it adds, from a matmul measured here."""

from __future__ import annotations

import dataclasses
import functools
import time

import torch

from .engine import default_batch_size
from .methods import get_method

OVERHEAD = 1.25  # attention, element-wise work and masking on top of the linears' matmuls (measured on P1)


@functools.lru_cache(maxsize=8)
def matmul_rate(device: str, dtype: torch.dtype, n: int = 1024) -> float:
    """FLOP/s of a dense n x n matmul on the device, best of a few (cached per process)."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        a @ a
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


@dataclasses.dataclass
class Estimate:
    seconds: float
    extra_bytes: int  # on top of the loaded model, including the dense copy the app keeps when it fits

    def __str__(self) -> str:
        from .devices import format_bytes

        return f"about {self.seconds:.0f} s and {format_bytes(self.extra_bytes)} more memory"


def estimate(info, method: str, nsamples: int, seqlen: int, dense_copy: bool) -> Estimate:
    """Two block passes over nsamples x seqlen tokens for activation methods; masking alone otherwise."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[info.dtype]
    masking = 2e-8 * info.linear_parameters  # ~2 s for SmolLM2's 106M pruned weights on 2 cores
    extra = info.memory_bytes if dense_copy else info.linear_parameters * torch.finfo(dtype).bits // 8
    if not get_method(method).needs_activations:
        return Estimate(masking, extra)
    tokens = nsamples * seqlen
    flops = 2 * 2 * info.linear_parameters * tokens
    seconds = flops / matmul_rate(info.device, dtype) * OVERHEAD + masking
    batch = default_batch_size(torch.device(info.device), seqlen)
    activations = tokens * info.hidden_size * 4 + 8 * batch * seqlen * info.hidden_size * 4
    return Estimate(seconds, extra + activations)
