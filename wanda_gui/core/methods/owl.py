"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): blocks whose Wanda scores hold more outliers keep
more of their weights. A first pass over the still-dense model measures each block's outlier ratio (as luuyin/OWL's
prune_wanda_outlier: the Wanda scores of all the block's linears pooled, the share above M x their pooled mean);
block sparsities then spread around the target by that ratio, within +-lambda, their mean weighted by each block's
pruned weights exactly the target."""

from __future__ import annotations

import torch

from ..architecture import weight_out_in
from ..errors import UserError
from ..events import Progress
from ..passes import Cancelled, collect_input_stats, run_block
from ..statistics import SquaredMean
from .base import RunContext, Step
from .wanda import wanda_score

LAMBDA, M = 0.08, 5.0  # the reference's settings for LLaMA (its README's scripts)


def owl_sparsities(outlier_ratios: list[float], sizes: list[int], target: float, lam: float = LAMBDA) -> list[float]:
    """Per-block sparsities: the reference's allocation, then one shift so that the size-weighted mean is the target.

    The reference scales the ratios to [0, 2 lambda] and centres them on the target density (more outliers, higher
    density). Its plain mean is then the target, but a block can land up to 2 lambda away when the ratios are skewed;
    the paper asks for [target - lambda, target + lambda]. So every sparsity is clamped to that range (and to [0, 1)),
    with one common shift c solved exactly so that sum(size x clamp(s + c)) / sum(size) = target. Where nothing
    clamps and the sizes are equal, c is 0: the reference's values unchanged.
    """
    if len(outlier_ratios) != len(sizes) or not sizes:
        raise ValueError("one outlier ratio and one size per block, at least one block")
    if any(n <= 0 for n in sizes) or lam < 0:
        raise ValueError("sizes must be positive and lambda non-negative")
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    weights = torch.tensor(sizes, dtype=torch.float64)
    weights /= weights.sum()
    spread = ratios.max() - ratios.min()
    if spread <= 0 or lam == 0:
        return [target] * len(sizes)
    scaled = (ratios - ratios.min()) * (1 / spread * lam * 2)
    density = scaled - scaled.mean() + (1 - target)
    reference = 1 - density
    low, high = max(target - lam, 0.0), min(target + lam, 1 - 1e-6)

    def mean_at(shift: float) -> float:
        return float((weights * (reference + shift).clamp(low, high)).sum())

    # mean_at rises piecewise linearly from `low` to `high` as the shift grows; its kinks are where a block meets a bound
    kinks = torch.cat([low - reference, high - reference]).unique().tolist()
    shift = kinks[-1]
    for left, right in zip(kinks, kinks[1:]):
        if mean_at(right) >= target:
            free = ((reference + (left + right) / 2 > low) & (reference + (left + right) / 2 < high))
            slope = float(weights[free].sum())
            shift = left + (target - mean_at(left)) / slope if slope > 0 else left
            break
    return (reference + shift).clamp(low, high).tolist()


@torch.no_grad()
def outlier_ratio(weights: list[torch.Tensor], input_sq_means: list[torch.Tensor], m: float) -> float:
    """Percent of a block's Wanda scores above m x their mean, pooled over its linears (the reference's
    check_outlier_mean on the concatenated scores). Two sweeps over the scores instead of one concatenation: a
    large block's scores never sit in memory all at once."""
    total = sum(float(wanda_score(w, s).sum(dtype=torch.float64)) for w, s in zip(weights, input_sq_means))
    count = sum(w.numel() for w in weights)
    threshold = total / count * m
    above = sum(int((wanda_score(w, s) > threshold).sum()) for w, s in zip(weights, input_sq_means))
    return above / count * 100


class OWL(Step):
    """Sets ctx.sparsities per block from a pass over the dense model on a copy of the calibration inputs."""

    key, label = "owl", "OWL"
    description = ("OWL (Yin et al. 2024): per-block sparsities from each block's share of outlier scores (lambda "
                   "0.08, M 5), their size-weighted mean the target; unstructured only")
    needs_activations = True
    reads = "measures outliers in calibration activations (Wanda's |W| x input norm)"
    unstructured_only = "chooses a sparsity per block"
    offload_refusal = ("OWL measures every block of the dense model before pruning starts, which offloading would "
                       "read twice: run OWL on the model loaded whole (without offload).")

    def __init__(self, lam: float = LAMBDA, m: float = M):
        if not 0 <= lam < 1:
            raise UserError(f"OWL's lambda (how far a block's sparsity may move from the target) must be in [0, 1), "
                            f"e.g. {LAMBDA}; got {lam!r}.")
        if not m > 0:
            raise UserError(f"OWL's M (a score is an outlier above M x the block's mean score) must be positive, "
                            f"e.g. {M:g}; got {m!r}.")
        self.lam, self.m = lam, m

    def before_pruning(self, ctx: RunContext):
        hidden = ctx.hidden.clone()  # the dense model's own hidden states; the run's stay as they are
        blocks = len(ctx.blocks)
        ratios, sizes = [0.0] * blocks, [0] * blocks
        for i, block in enumerate(ctx.blocks):
            if ctx.cancel is not None and ctx.cancel.is_set():
                raise Cancelled
            linears = ctx.stages[i]
            if linears:
                stats = collect_input_stats(block, linears, hidden, ctx.calls[i], ctx.batch_size, ctx.cancel,
                                            SquaredMean)
                weights = [weight_out_in(linear) for linear in linears.values()]
                ratios[i] = outlier_ratio(weights, [stats[name] for name in linears], self.m)
                sizes[i] = sum(w.numel() for w in weights)
                del stats, weights
            if i < blocks - 1:
                run_block(block, hidden, ctx.calls[i], ctx.batch_size, ctx.cancel)
            yield Progress("OWL: measuring outliers", i + 1, blocks)
        del hidden
        chosen = [i for i in range(blocks) if sizes[i]]
        targets = owl_sparsities([ratios[i] for i in chosen], [sizes[i] for i in chosen], ctx.target,
                                 self.lam)
        for i, target in zip(chosen, targets):
            ctx.sparsities[i] = target
        ctx.target_note = (f"OWL (lambda {self.lam:g}, M {self.m:g}): block sparsities {min(targets):.1%} to "
                           f"{max(targets):.1%} by each block's share of Wanda scores above M x its mean "
                           f"({min(ratios[i] for i in chosen):.2f}% to {max(ratios[i] for i in chosen):.2f}%); "
                           "more outliers, fewer weights pruned; weighted mean = the target")
        ctx.target_basis = ratios + [0.0] * (len(ctx.sparsities) - blocks)  # the LM head keeps the run's target
