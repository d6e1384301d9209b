"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): after any mask, swap pruned and kept weights row by row
while that shrinks the row's expected reconstruction error, keeping each row's (or each N:M group's) count.

The expected error of row i is e_i = sum_j (W_dense_ij - W_ij) * xsum_j, xsum_j being input feature j summed over a
sample's tokens (averaged over samples), as in zyxxmu/DSnoT. Each cycle, where e_i > 0 the pruned weight with the
largest W_dense_ij * xsum_j / var_j grows back (the smallest where e_i <= 0), and a kept weight of the opposite effect
with the lowest Wanda score is pruned (unstructured), or the kept weight of lowest Wanda score in the regrown
weight's group (N:M); a row stops once |e_i| is within the threshold or a swap would flip its sign or fail to
shrink |e_i| (a guard the reference lacks for N:M, where its swaps could raise the error).
"""

from __future__ import annotations

import torch

from ..architecture import weight_out_in
from ..errors import UserError
from ..passes import Cancelled
from .base import BlockMasked, RunContext, Step

MAX_CYCLES, UPDATE_THRESHOLD, POW_OF_VAR = 50, 0.1, 1.0


class MeanVariance:
    """Per input feature: the mean over tokens, mean x^2 (Wanda's norm), the variance within each sample averaged
    over tokens (the reference's `var`), and the tokens per sample, accumulated in fp32 (float64 sums)."""

    def __init__(self, width: int, device: torch.device):
        self.sums = torch.zeros(3, width, dtype=torch.float64, device=device)  # x, x^2, per-sample variance x tokens
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)  # tokens, samples

    def add(self, x: torch.Tensor) -> None:
        samples = x.reshape(-1, x.shape[-2], x.shape[-1]).float() if x.dim() >= 3 else x.float()[None]
        flat = samples.reshape(-1, samples.shape[-1])
        self.sums[0] += flat.sum(0, dtype=torch.float64)
        self.sums[1] += (flat * flat).sum(0, dtype=torch.float64)
        self.sums[2] += (samples.var(dim=1, unbiased=False) * samples.shape[1]).sum(0, dtype=torch.float64)
        self.counts += torch.tensor([flat.shape[0], samples.shape[0]], dtype=torch.float64, device=self.counts.device)

    def result(self) -> dict[str, torch.Tensor]:
        tokens, samples = self.counts.clamp(min=1).tolist()
        return {"xsum": (self.sums[0] / samples).float(), "sq_mean": (self.sums[1] / tokens).float(),
                "var": (self.sums[2] / tokens).float()}

    def all_reduce(self) -> None:
        from ..distributed import sum_across_ranks

        sum_across_ranks(self.sums)
        sum_across_ranks(self.counts)


def row_errors(dense: torch.Tensor, weight: torch.Tensor, xsum: torch.Tensor) -> torch.Tensor:
    """Each row's expected reconstruction error: sum_j (W_dense - W)_ij * xsum_j."""
    return ((dense.float() - weight.float()) * xsum.unsqueeze(0)).sum(dim=1)


def check_dsnot(needs_activations: bool) -> None:
    if not needs_activations:
        raise UserError("DSnoT weighs swaps with the calibration inputs' mean and variance: choose a method that reads "
                        "them (wanda, sparsegpt, ria), or turn DSnoT off.")


@torch.no_grad()
def dsnot(weight: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, stats: dict[str, torch.Tensor],
          m: int = 0, cycles: int = MAX_CYCLES, threshold: float = UPDATE_THRESHOLD,
          pow_of_var: float = POW_OF_VAR) -> torch.Tensor:
    """Swap pruned and kept weights of a (C_out, C_in) weight in place (M > 0: within groups of M inputs); return
    the new mask (True where pruned). Regrown weights take their dense values."""
    rows = torch.arange(weight.shape[0], device=weight.device)
    xsum, var = stats["xsum"].to(weight.device), stats["var"].to(weight.device)
    norm = stats["sq_mean"].to(weight.device).sqrt()
    current, dense = weight.float(), dense.to(weight.device).float()
    mask = mask.clone()
    error = row_errors(dense, current, xsum)
    sign = torch.sign(error)
    grow_metric = dense * xsum  # what regrowing j removes from the error
    prune_metric = current * xsum  # what pruning a kept j adds to it
    # candidates to regrow: pruned weights, by grow_metric / var (ascending); kept ones pushed to the middle
    grow_key = torch.where(mask, grow_metric / var.clamp(min=1e-12).pow(pow_of_var), torch.zeros_like(grow_metric))
    grow_order = torch.sort(grow_key, dim=1, stable=True).indices
    grow_pointer = torch.stack([torch.zeros_like(rows), torch.full_like(rows, weight.shape[1] - 1)], 1)
    wanda = current.abs() * norm.unsqueeze(0)
    if not m:  # kept weights to prune: negative effects first by rising Wanda score, then positive ones by
        # falling score (the reference's reorder), pruned weights in between; one pointer from each end
        ascending = torch.sort(torch.where(mask, torch.inf, wanda), dim=1, stable=True).indices
        rank = torch.arange(weight.shape[1], device=weight.device, dtype=torch.float32).expand_as(current)
        key = torch.where(mask.gather(1, ascending), weight.shape[1] + 0.5,
                          torch.where(prune_metric.gather(1, ascending) < 0, rank, 2 * weight.shape[1] - rank))
        prune_order = ascending.gather(1, key.argsort(dim=1, stable=True))
        prune_pointer = grow_pointer.clone()
    active = torch.ones_like(error, dtype=torch.bool)
    for _ in range(cycles):
        if not active.any():
            break
        side = (error > 0).long()
        at = grow_pointer[rows, side]
        grow = grow_order[rows, at]
        grow_pointer[rows, side] = (at + torch.where(side == 1, -1, 1)).clamp(0, weight.shape[1] - 1)
        if m:
            start = grow - grow % m
            group = start[:, None] + torch.arange(m, device=weight.device)[None]
            candidate = torch.where(mask.gather(1, group), torch.inf, wanda.gather(1, group))
            prune = start + candidate.argmin(1)
            can = torch.isfinite(candidate.min(1).values)
        else:
            side_p = (error < 0).long()
            at_p = prune_pointer[rows, side_p]
            prune = prune_order[rows, at_p]
            prune_pointer[rows, side_p] = (at_p + torch.where(side_p == 1, -1, 1)).clamp(0, weight.shape[1] - 1)
            can = ~mask[rows, prune]
        after = error + prune_metric[rows, prune] - grow_metric[rows, grow]
        # the reference's conditions, plus a smaller |error| (its N:M swaps could raise it, same sign kept)
        active &= ((error.abs() > threshold) & (torch.sign(after) == sign) & (after.abs() < error.abs())
                   & mask[rows, grow] & can)
        idx = rows[active]
        mask[idx, prune[active]] = True
        mask[idx, grow[active]] = False
        current[idx, grow[active]] = dense[idx, grow[active]]
        current[idx, prune[active]] = 0
        wanda[idx, grow[active]] = torch.inf  # a regrown weight is not pruned again (the reference's inf)
        error = torch.where(active, after, error)
    weight.copy_(current.to(weight.dtype))
    return mask


class DSnoT(Step):
    statistic = MeanVariance

    def __init__(self, cycles: int = MAX_CYCLES, threshold: float = UPDATE_THRESHOLD, pow_of_var: float = POW_OF_VAR):
        self.cycles, self.threshold, self.pow_of_var = cycles, threshold, pow_of_var

    def after_masking(self, ctx: RunContext, block: BlockMasked) -> None:
        stats = block.statistics.get(MeanVariance, {})
        for name, linear in block.linears.items():
            if ctx.cancel is not None and ctx.cancel.is_set():
                raise Cancelled
            if name not in stats:
                continue
            dense = block.dense_weights[name]
            dense = dense.t() if weight_out_in(linear) is not linear.weight else dense
            block.masks[name] = dsnot(weight_out_in(linear), dense, block.masks[name], stats[name],
                                      ctx.config.pattern.m, self.cycles, self.threshold, self.pow_of_var)
