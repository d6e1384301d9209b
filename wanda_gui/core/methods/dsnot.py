"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training", ICLR): after any method's mask, swap pruned and kept
weights row by row while that shrinks the row's expected reconstruction error; each row keeps its number of pruned
weights, each N:M group its N.

It follows zyxxmu/DSnoT (lib/prune.py, prune_DSnoT; lib/layerwrapper.py for the statistics), with its defaults:
- row i's expected error e_i = sum_j (W_dense - W)_ij * xsum_j, xsum_j being input feature j summed over a sample's
  tokens, averaged over samples (the reference's sum_metric_row): the mean of what row i's output lost per sample;
- regrow: of the row's pruned weights, the one with the largest W_dense_ij * xsum_j / var_j^pow where e_i > 0, the
  most negative where e_i < 0 (var_j: feature j's variance within a sample; one sorted list walked from both ends);
- prune, unstructured: of the weights the method kept, the lowest Wanda score |W_ij| * ||X_j|| among those whose
  effect W_ij * xsum_j has the sign opposite to e_i's; N:M: the lowest Wanda score among the kept weights of the
  regrown weight's group of M (a group's regrown weights are not pruned again);
- a row stops once |e_i| <= threshold, after max_cycles, when it runs out of candidates, and (N:M only, the
  reference's sign constraint) at a swap that would flip e_i's sign; unstructured, e_i may change sign (the
  reference's default, whose --without_same_sign flag is always on).
Where the reference would make a swap that leaves |e_i| no smaller (an overshoot past -e_i, or an N:M group whose
weakest kept weight weighs more than the regrown one), this makes none: the regrow candidate is passed over and the
row tries its next one. So no row's expected error ever grows.

Two choices where the reference cannot guide: the pruning side always ranks by Wanda's score (the reference ranks
N:M groups by the initial method's score, which an option running after the method does not see); and the error and
the regrown values are measured against the weights before the method touched them. After SparseGPT, whose update
changed the kept weights, e then also holds what that update did to the row's mean output, and a regrown weight
takes its dense value: the reference's choice (it regrows the original weights, SparseGPT's update never applied),
the one value that removes exactly that weight's term from e, and SparseGPT's in-loop values of pruned weights are
never kept.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..architecture import out_in, weight_out_in
from ..distributed import sum_across_ranks
from ..errors import UserError
from ..passes import Cancelled
from .base import BlockMasked, RunContext, Step

MAX_CYCLES = 50  # the reference's --max_cycle_time
UPDATE_THRESHOLD = 0.1  # its --update_threshold: |e| below it is left alone (e sums over a sample's tokens)
POW_OF_VAR_REGROWING = 1.0  # its --pow_of_var_regrowing
SMALLEST_VARIANCE = 1e-12  # a feature constant within every sample would divide by zero


class Moments(NamedTuple):
    """What DSnoT reads of one linear's input, per input feature."""

    xsum: torch.Tensor  # summed over a sample's tokens, averaged over samples
    sq_mean: torch.Tensor  # mean x^2 over all tokens: Wanda's ||X_j||^2 / tokens
    var: torch.Tensor  # variance over each sample's tokens, averaged over all tokens


class MeanVariance:
    """Per input feature, accumulated in fp32 batch by batch: the sums behind Moments. A sample is one sequence
    (the reference feeds one per batch and takes the variance within it); a 2-D input counts as one sample."""

    def __init__(self, width: int, device: torch.device):
        self.sums = torch.zeros(3, width, dtype=torch.float32, device=device)  # x, x^2, within-sample variance
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)  # tokens, samples

    def add(self, x: torch.Tensor) -> None:
        samples = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x[None]
        var, mean = torch.var_mean(samples.float(), dim=1, correction=0)  # (samples, width) each
        tokens = samples.shape[1]
        self.sums += torch.stack([mean, var + mean * mean, var]).sum(dim=1) * tokens
        self.counts += torch.tensor([samples.shape[0] * tokens, samples.shape[0]], dtype=torch.float64,
                                    device=self.counts.device)

    def result(self) -> Moments:
        tokens, samples = self.counts.clamp(min=1).tolist()
        return Moments(self.sums[0] / samples, self.sums[1] / tokens, self.sums[2] / tokens)

    def all_reduce(self) -> None:
        """Sum over torchrun ranks (core.distributed)."""
        sum_across_ranks(self.sums)
        sum_across_ranks(self.counts)


def row_errors(dense: torch.Tensor, weight: torch.Tensor, xsum: torch.Tensor) -> torch.Tensor:
    """Each row's expected reconstruction error e_i = sum_j (W_dense - W)_ij * xsum_j (signed; DSnoT shrinks |e_i|)."""
    return (dense.float() - weight.float()) @ xsum.float()


@torch.no_grad()
def dsnot(weight: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, moments: Moments, m: int = 0,
          max_cycles: int = MAX_CYCLES, threshold: float = UPDATE_THRESHOLD,
          pow_of_var: float = POW_OF_VAR_REGROWING) -> torch.Tensor:
    """Swap pruned and kept weights of a (C_out, C_in) weight in place, rows in parallel (m > 0: within N:M groups of
    m inputs), as the module docstring says; return the new mask (True where pruned). Regrown weights take their
    values in `dense`, the weight before pruning.

    A row tries at most one candidate per cycle from each ranking, so only the max_cycles best of each are found
    (topk, not a full sort). Lists and pointers are indexed by side: 1 where e > 0, 0 where e < 0."""
    device = weight.device
    rows, width = weight.shape
    index = torch.arange(rows, device=device)
    xsum, var = moments.xsum.to(device).float(), moments.var.to(device).float()
    dense = dense.to(device)
    current = weight.float()
    error = row_errors(dense, current, xsum)
    grow_effect = dense.float() * xsum  # regrowing j takes this off e
    prune_effect = current * xsum  # pruning a kept j adds this to e
    wanda = current.abs() * moments.sq_mean.to(device).float().sqrt()
    mask = mask.to(device).clone()
    k = min(max_cycles, width)

    def best(key: torch.Tensor, largest: bool) -> torch.return_types.topk:
        return key.topk(k, dim=1, largest=largest)

    grow_key = torch.where(mask, grow_effect / var.clamp(min=SMALLEST_VARIANCE).pow(pow_of_var), 0)
    down, up = best(grow_key, False), best(grow_key, True)  # e < 0: the most negative first; e > 0: the largest
    grow_list = torch.stack([down.indices, up.indices], 1)  # (rows, side, k)
    grow_ok = torch.stack([down.values < 0, up.values > 0], 1)
    if m:
        taken = mask.clone()  # pruned, or regrown: not a pruning candidate in its group
    else:  # e > 0: kept weights of negative effect by rising Wanda score; e < 0: of positive effect
        kept = ~mask
        positive = best(torch.where(kept & (prune_effect > 0), wanda, torch.inf), False)
        negative = best(torch.where(kept & (prune_effect < 0), wanda, torch.inf), False)
        prune_list = torch.stack([positive.indices, negative.indices], 1)
        prune_ok = torch.stack([positive.values, negative.values], 1).isfinite()
        prune_at = torch.zeros(rows, 2, dtype=torch.long, device=device)
    grow_at = torch.zeros(rows, 2, dtype=torch.long, device=device)

    active = error.abs() > threshold
    for _ in range(max_cycles):
        if not active.any():
            break
        side = (error > 0).long()
        at = grow_at[index, side]
        grow = grow_list[index, side, at.clamp(max=k - 1)]
        g_valid = grow_ok[index, side, at.clamp(max=k - 1)] & (at < k)
        if m:
            start = grow - grow % m
            group = start[:, None] + torch.arange(m, device=device)
            weakest = torch.where(taken.gather(1, group), torch.inf, wanda.gather(1, group)).min(dim=1)
            prune, p_valid = start + weakest.indices, weakest.values.isfinite()
        else:
            p_at = prune_at[index, side]
            prune = prune_list[index, side, p_at.clamp(max=k - 1)]
            p_valid = prune_ok[index, side, p_at.clamp(max=k - 1)] & (p_at < k)
        after = error - grow_effect[index, grow] + prune_effect[index, prune]
        # N:M: the reference's sign constraint stops the row; unstructured, e may change sign
        keeps_going = torch.sign(after) == torch.sign(error) if m else p_valid
        swap = active & g_valid & p_valid & keeps_going & (after.abs() < error.abs())
        active &= g_valid & keeps_going  # out of candidates on the side e needs (only a swap changes the side)
        grow_at[index, side] += 1  # a candidate is tried once: swapped, or passed over
        swapped, grow, prune = index[swap], grow[swap], prune[swap]
        mask[swapped, grow] = False
        mask[swapped, prune] = True
        weight[swapped, grow] = dense[swapped, grow]
        weight[swapped, prune] = 0
        if m:
            taken[swapped, prune] = True
        else:
            prune_at[swapped, side[swap]] += 1
        error = torch.where(swap, after, error)
        active &= error.abs() > threshold
    return mask


class DSnoT(Step):
    """The option: after each stage's masks, DSnoT on every linear of the stage with the reference's settings."""

    key, label = "dsnot", "DSnoT"
    description = ("DSnoT (Zhang et al. 2024): after masking, swap pruned and kept weights of each row while that "
                   "shrinks its expected reconstruction error; counts per row or N:M group kept")
    needs_activations = True
    reads = "weighs swaps with the calibration inputs' mean and variance"
    statistic = MeanVariance

    def __init__(self, max_cycles: int = MAX_CYCLES, threshold: float = UPDATE_THRESHOLD,
                 pow_of_var: float = POW_OF_VAR_REGROWING):
        if not isinstance(max_cycles, int) or max_cycles < 0:
            raise UserError(f"DSnoT's cycles must be a whole number, 0 or more; got {max_cycles!r}.")
        if not threshold >= 0 or not pow_of_var >= 0:
            raise UserError(f"DSnoT's threshold and variance power must be 0 or more; got {threshold!r} and "
                            f"{pow_of_var!r}.")
        self.max_cycles, self.threshold, self.pow_of_var = max_cycles, threshold, pow_of_var

    def after_masking(self, ctx: RunContext, block: BlockMasked) -> None:
        moments = block.statistics[MeanVariance]
        for name, linear in block.linears.items():
            if ctx.cancel is not None and ctx.cancel.is_set():
                raise Cancelled
            block.masks[name] = dsnot(weight_out_in(linear), out_in(linear, block.dense_weights[name]),
                                      block.masks[name], moments[name], ctx.pattern.m, self.max_cycles,
                                      self.threshold, self.pow_of_var)
