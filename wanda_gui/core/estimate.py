"""Before a run: about how long pruning will take and how much memory it adds, and a refusal of a run that cannot fit.

The memory model counts what the engine really allocates (see engine.prune): the hidden states of every calibration
window (twice while they are first gathered), one batch's block activations (linear outputs, attention scores),
what tokenizing the calibration text leaves allocated (CPU), the score and selection temporaries of the largest
linear with the run's bookkeeping, and the second copy of the pruned linears that the app's pruned model (or the engine's restore copy) holds. The time model is the linears' and attention's FLOPs at
a matmul rate measured here, scaled by what P1 measured on top of them (element-wise work, masking).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import psutil
import torch

from .config import default_batch_size
from .errors import UserError
from .memory import format_bytes, free_bytes
from .methods import Step, get_method

# P1 (SmolLM2, 64 x 512, 2 cores) took 55 s: the linears' matmuls 34.2 s at the measured rate, attention 17% and
# element-wise work 16% of the run, masking 2.7 s (README). Per FLOP at the matmul rate, that is:
LINEAR_OVERHEAD = 1.26  # the linears' matmuls plus the norms, activations, residuals and hooks around them
ATTENTION_OVERHEAD = 1.65  # attention's matmuls run slower than the linears' (smaller, batched per head)
# SparseGPT builds Hessians (about half the linears' FLOPs again, as their upper triangles) and updates column by
# column: P1 took 91.5 s for it against Wanda's 67.0 s in the same run (benchmarks/p1-cpu-2026-12-07.json).
METHOD_TIME_FACTOR = {"sparsegpt": 1.37, "alps": 1.37}
# ALPS then solves each linear alone, whatever the calibration size: some 30-40 ADMM iterations and 10 of conjugate
# gradients, each a product of the weight with an inputs x inputs matrix, plus the projections.
# Counted as this many products of 2 x weights x hidden size FLOPs at the measured rate: fitted to ALPS's 2.23x
# (2:4) and 2.49x (50%) Wanda's time on P1 in the same run.
SOLVER_PRODUCTS = {"alps": 180}
STEP_PASS_OVERHEAD = 1.0  # an option's pass (reconstruction's Adam steps, refit) against one of the method's
MASKING_SECONDS_PER_WEIGHT = 2.5e-8  # scoring and row selection: ~2.7 s for SmolLM2's 106M weights on 2 cores
SELECTION_BYTES_PER_WEIGHT = 4 + 1 + 4 + 8  # fp32 score, bool mask, top-k values and int64 indices
TOKENIZING_BYTES = 96 * 1024 ** 2  # tokenizing in 100k-character pieces: fitted to benchmarks/estimate_check.py
RUN_BYTES = 12 * 1024 ** 2  # events, pooled maps and allocator arenas of any run (magnitude measured 21-37 MiB)
HEAD_DIM = 64  # attention heads are guessed from the width (ModelInfo has no head count): 576 / 64 = SmolLM2's 9
EVAL_BATCH = 4  # evaluate.perplexity's default windows per forward


@functools.lru_cache(maxsize=8)
def matmul_rate(device: str, dtype: torch.dtype, tokens: int = 1024, width: int = 576) -> float:
    """FLOP/s of a matmul shaped like a block's (a batch of tokens through a width x 4*width linear), best of a few,
    measured on the device (cached per process)."""
    dev = torch.device(device)
    x = torch.randn(tokens, width, device=dev, dtype=dtype)
    w = torch.randn(width, 4 * width, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(8):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        x @ w
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * tokens * width * 4 * width / best


def cpu_times() -> tuple:
    """A reading for other_cpu_share: the whole CPU's times, this process's, and the clock."""
    return psutil.cpu_times(), psutil.Process().cpu_times(), time.monotonic()


def other_cpu_share(since: tuple) -> float:
    """The share (0..1) of the CPU's cores that other work used since a cpu_times() reading, this process's own
    excluded."""
    (system, own, started), (system_now, own_now, now) = since, cpu_times()
    busy = (sum(system_now) - system_now.idle - getattr(system_now, "iowait", 0.0)) - \
        (sum(system) - system.idle - getattr(system, "iowait", 0.0))
    mine = (own_now.user + own_now.system) - (own.user + own.system)
    return min(1.0, max(0.0, (busy - mine) / (max(now - started, 1e-9) * (psutil.cpu_count() or 1))))


def other_cpu_use(interval: float = 0.3) -> float:
    """The share (0..1) of the CPU's cores that other work used over a short look, this process's own excluded."""
    since = cpu_times()
    time.sleep(interval)
    return other_cpu_share(since)


MOST_BUSY = 0.9  # beyond this share taken by others, the estimate says "at least" ten times the idle time


@dataclasses.dataclass
class Estimate:
    seconds: float  # on an idle device
    parts: dict[str, int]  # bytes on top of the loaded model, by what holds them
    busy: float = 0.0  # the share of the CPU other work took when the estimate was made

    @property
    def extra_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def seconds_now(self) -> float:
        """As long as the run takes if other work keeps its share of the cores: the run gets the rest."""
        return self.seconds / (1 - min(self.busy, MOST_BUSY))

    def breakdown(self) -> str:
        return describe(self.parts)

    def __str__(self) -> str:
        memory = f"{format_bytes(self.extra_bytes)} more memory"
        if self.busy < 0.1:
            return f"about {self.seconds:.0f} s (an idle CPU) and {memory}"
        return (f"about {self.seconds_now:.0f} s while other work takes {self.busy:.0%} of the CPU ({self.seconds:.0f} s "
                f"on an idle one) and {memory}")


def describe(parts: dict[str, int]) -> str:
    """'calibration activations 75.5 MiB + scoring 16.4 MiB': the non-zero parts."""
    return " + ".join(f"{name} {format_bytes(n)}" for name, n in parts.items() if n)


def _element_bytes(info) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}.get(info.dtype, 4)


def _torch_dtype(info) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(info.dtype, torch.float32)


def selection_bytes(info) -> int:
    """Scoring one linear: an fp32 score, the mask and top-k temporaries, for a linear twice the average size."""
    largest = 2 * info.linear_parameters // max(1, info.linears)
    return largest * SELECTION_BYTES_PER_WEIGHT


def block_activation_bytes(info, seqlen: int, batch: int) -> int:
    """One batch through one block: every linear's output (about the block's weights / width per token), the
    norms, residuals and fp32 statistics (6 x width), and the attention scores (batch x heads x seqlen^2, fp32)."""
    per_token = info.linear_parameters // max(1, info.blocks) // max(1, info.hidden_size) + 6 * info.hidden_size
    heads = max(1, info.hidden_size // HEAD_DIM)
    return batch * seqlen * per_token * 4 + batch * heads * seqlen * seqlen * 4


def memory_parts(info, method: str, nsamples: int, seqlen: int, dense_copy: bool,
                 batch_size: int | None = None) -> dict[str, int]:
    """Bytes a pruning run adds to the loaded model, by what holds them."""
    parts = {}
    if get_method(method).needs_activations:
        batch = batch_size or default_batch_size(torch.device(info.device), seqlen)
        hidden = nsamples * seqlen * info.hidden_size * _element_bytes(info)
        parts["calibration activations"] = hidden
        # gathered batch by batch, then concatenated (the hidden states twice), or one batch through a block
        parts["working memory"] = max(hidden, block_activation_bytes(info, seqlen, batch))
        if torch.device(info.device).type == "cpu":  # the tokenizer's threads keep what they allocated
            parts["tokenizing"] = TOKENIZING_BYTES
    parts["scoring"] = selection_bytes(info) + RUN_BYTES
    parts["pruned copy"] = info.linear_parameters * _element_bytes(info) if dense_copy else 0
    return parts


def prune_seconds(info, method: str, nsamples: int, seqlen: int, steps: tuple[Step, ...] = ()) -> float:
    """Two block passes over nsamples x seqlen tokens (linears and attention) for activation methods, a layer solver's
    work (ALPS), plus masking, plus the passes the options' steps add (Step.extra_passes: block reconstruction's, per
    its setting)."""
    masking = MASKING_SECONDS_PER_WEIGHT * info.linear_parameters
    if not get_method(method).needs_activations:
        return masking
    tokens = nsamples * seqlen
    linear_flops = 2 * info.linear_parameters * tokens
    attention_flops = 2 * 2 * info.blocks * info.hidden_size * seqlen * tokens  # QK^T and AV
    batch_tokens = default_batch_size(torch.device(info.device), seqlen) * seqlen
    rate = matmul_rate(info.device, _torch_dtype(info), batch_tokens, info.hidden_size)
    one_pass = (LINEAR_OVERHEAD * linear_flops + ATTENTION_OVERHEAD * attention_flops) / rate
    name = get_method(method).name
    solver = SOLVER_PRODUCTS.get(name, 0) * 2 * info.linear_parameters * info.hidden_size / rate
    factor = METHOD_TIME_FACTOR.get(name, 1.0)
    extra = sum(step.extra_passes(nsamples, seqlen, info.hidden_size, torch.device(info.device)) for step in steps)
    return factor * 2 * one_pass + STEP_PASS_OVERHEAD * extra * one_pass + solver + masking


def estimate(info, method: str, nsamples: int, seqlen: int, dense_copy: bool, batch_size: int | None = None,
             busy: float = 0.0, steps: tuple[Step, ...] = ()) -> Estimate:
    """Time and memory of a pruning run; dense_copy: a second copy of the pruned linears is held (the app's pruned
    model beside the dense one, or the engine's restore copy); busy: the share of the CPU other work takes now;
    steps: the options' steps (PruneConfig.steps()), whose passes the time counts."""
    return Estimate(prune_seconds(info, method, nsamples, seqlen, steps),
                    memory_parts(info, method, nsamples, seqlen, dense_copy, batch_size), busy)


def refuse_if_over(parts: dict[str, int], device: str, free_now: int | None, hint: str) -> None:
    """UserError with the numbers when the parts add up to more than is free on the device."""
    need = sum(parts.values())
    free = free_bytes(device) if free_now is None else free_now
    if need > free:
        raise UserError(f"This run needs about {format_bytes(need)} ({describe(parts)}) but {format_bytes(free)} is free on "
                        f"{device}; {hint}.")


def check_fits(info, method: str, nsamples: int, seqlen: int, dense_copy: bool = False, batch_size: int | None = None,
               free_now: int | None = None, hint: str = "lower the number of samples or the sequence length") -> dict[str, int]:
    """Refuse up front, with the numbers, a pruning run whose memory exceeds what is free on the model's device;
    return the bytes it needs, by part."""
    parts = memory_parts(info, method, nsamples, seqlen, dense_copy, batch_size)  # no matmul timed: instant
    refuse_if_over(parts, info.device, free_now, hint)
    return parts


def evaluation_parts(info, vocab_size: int, seqlen: int, batch_size: int = EVAL_BATCH) -> dict[str, int]:
    """Perplexity: one batch's logits three times at once (model output, the shifted fp32 copy, log-softmax)."""
    logits = batch_size * seqlen * vocab_size * 4
    return {"logits": 3 * logits, "block activations": block_activation_bytes(info, seqlen, batch_size)}


def check_eval_fits(info, vocab_size: int, seqlen: int, batch_size: int = EVAL_BATCH, free_now: int | None = None,
                    hint: str = "lower the sequence length") -> None:
    """Refuse up front, with the numbers, a perplexity measurement whose batch exceeds what is free."""
    refuse_if_over(evaluation_parts(info, vocab_size, seqlen, batch_size), info.device, free_now, hint)
