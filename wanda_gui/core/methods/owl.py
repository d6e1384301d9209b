"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): blocks whose Wanda scores hold more outliers keep
more of their weights. A first pass over the still-dense model measures each block's outlier ratio (the share of
its scores above M x their mean, as luuyin/OWL's check_outlier_mean); block sparsities then spread around the target
in proportion to it, within +-lambda, their mean weighted by each block's pruned weights exactly the target."""

from __future__ import annotations

import torch

from ..architecture import weight_out_in
from ..errors import UserError
from ..events import Progress
from ..masks import Pattern
from ..passes import collect_input_stats, run_block
from ..statistics import SquaredMean
from .base import RunContext, Step
from .wanda import wanda_score

LAMBDA, M = 0.08, 5.0


def check_owl(pattern: Pattern, needs_activations: bool) -> None:
    if pattern.structured:
        raise UserError(f"OWL chooses a sparsity per block, but {pattern} fixes every row's sparsity: use the "
                        "unstructured pattern with OWL, or turn OWL off.")
    if not needs_activations:
        raise UserError("OWL measures outliers in calibration activations: choose a method that reads them "
                        "(wanda, sparsegpt, ria), or turn OWL off.")


def owl_sparsities(outlier_ratios: list[float], sizes: list[int], target: float, lam: float = LAMBDA) -> list[float]:
    """The reference's allocation (ratios scaled to [0, 2 lambda], centred on the target density), then shifted so
    the size-weighted mean is exactly the target, every block staying within target +- lambda and [0, 1)."""
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    spread = ratios.max() - ratios.min()
    if spread <= 0:
        return [target] * len(outlier_ratios)
    scaled = (ratios - ratios.min()) / spread * lam * 2
    density = scaled - scaled.mean() + (1 - target)
    sparsity = 1 - density
    low, high = max(target - lam, 0.0), min(target + lam, 1 - 1e-6)
    weights = sizes_t / sizes_t.sum()
    for _ in range(100):  # shift, clamp, repeat: the clamped blocks push the weighted mean back to the target
        sparsity = (sparsity + (target - (weights * sparsity).sum())).clamp(low, high)
        if abs(float((weights * sparsity).sum()) - target) < 1e-12:
            break
    else:
        free = (sparsity > low) & (sparsity < high)
        sparsity[free] += (target - (weights * sparsity).sum()) / weights[free].sum()
    return sparsity.tolist()


@torch.no_grad()
def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Percent of the scores above m x their mean, pooled over a block's linears (check_outlier_mean)."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > flat.mean() * m).sum()) / flat.numel() * 100


class OWL(Step):
    def __init__(self, lam: float = LAMBDA, m: float = M):
        self.lam, self.m = lam, m

    def before_pruning(self, ctx: RunContext):
        if ctx.hidden is None:
            raise UserError("OWL measures outliers in calibration activations: choose a method that reads them.")
        hidden = ctx.hidden.clone()  # the dense model's own hidden states; the run's stay as they are
        ratios, sizes = [], []
        for i, block in enumerate(ctx.blocks):
            linears = ctx.plan[i]
            with torch.inference_mode():
                stats = collect_input_stats(block, linears, hidden, ctx.calls[i], ctx.batch_size, ctx.cancel,
                                            SquaredMean)
                scores = [wanda_score(weight_out_in(linear), stats[name]) for name, linear in linears.items()]
                ratios.append(outlier_ratio(scores, self.m) if scores else 0.0)
                sizes.append(sum(s.numel() for s in scores))
                del scores, stats
                if i < len(ctx.blocks) - 1:
                    run_block(block, hidden, ctx.calls[i], ctx.batch_size, ctx.cancel)
            yield Progress("OWL: measuring outliers", i + 1, len(ctx.blocks))
        del hidden
        chosen = [i for i, s in enumerate(sizes) if s]
        targets = owl_sparsities([ratios[i] for i in chosen], [sizes[i] for i in chosen], ctx.config.sparsity, self.lam)
        for i, target in zip(chosen, targets):
            ctx.sparsities[i] = target
        ctx.target_note = (f"OWL (lambda {self.lam:g}, M {self.m:g}): blocks whose scores hold more outliers "
                           "keep more weights")
        ctx.target_basis = ratios + [0.0] * (len(ctx.sparsities) - len(ratios))
