"""Wanda and its baseline, magnitude: a score per weight, compared within each output row (or the whole layer)."""

from __future__ import annotations

import torch

from ..statistics import SquaredMean
from .base import ScoreMethod


def wanda_score(weight: torch.Tensor, input_sq_mean: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: the weight's magnitude times the RMS of the input feature it multiplies."""
    return weight.float().abs().mul_(input_sq_mean.sqrt().unsqueeze(0))


def magnitude_score(weight: torch.Tensor, input_sq_mean: torch.Tensor | None = None) -> torch.Tensor:
    """|W_ij| alone: the classic baseline, blind to activations."""
    return weight.float().abs()


def alpha_mask(score: torch.Tensor, sparsity: float, tolerance: float = 0.001) -> torch.Tensor:
    """Wanda's α-variant (the reference's use_variant): prune, in every row, the lowest scores whose cumulative
    sum stays within α of the row's total, with α bisected (from 0.4 in [0, 0.8]) until the layer's sparsity is
    within `tolerance` of the target. Rows then differ in sparsity."""
    ordered = torch.sort(score, dim=-1, stable=True).values
    cumulative, totals = ordered.cumsum(dim=1), score.sum(dim=1, keepdim=True)

    def given(alpha: float) -> tuple[torch.Tensor, float]:
        count = (cumulative <= totals * alpha).sum(dim=1, keepdim=True)
        mask = score <= ordered.gather(1, (count - 1).clamp_(min=0))  # the reference fails on an empty row
        return mask, float(mask.float().mean())

    alpha, low, high = 0.4, 0.0, 0.8
    mask, current = given(alpha)
    while abs(current - sparsity) > tolerance and high - low >= tolerance:
        if current > sparsity:
            alpha, high = (alpha + low) / 2, alpha
        else:
            alpha, low = (alpha + high) / 2, alpha
        mask, current = given(alpha)
    return mask


class Wanda(ScoreMethod):
    """Wanda, with the reference's α-variant when PruneConfig.wanda_variant is set."""

    def select(self, score, sparsity, config):
        if config.wanda_variant:
            return alpha_mask(score, sparsity)
        return super().select(score, sparsity, config)


WANDA = Wanda("wanda", "Wanda: |W| x input-feature norm, per output row (Sun et al. 2023)", wanda_score,
              SquaredMean, "|W| x ||X_j||")
MAGNITUDE = ScoreMethod("magnitude", "Magnitude: |W| only, per output row or layer-wide", magnitude_score, None, "|W|")
