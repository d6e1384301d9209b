"""RIA, Relative Importance and Activations (Zhang et al. 2024, Plug-and-Play): a weight's share of its row's and
of its column's total magnitude, times the input feature's norm to the power a = 0.5; compared per row (or N:M group).
"""

from __future__ import annotations

import torch

from ..statistics import SquaredMean
from .base import ScoreMethod

POWER = 0.5


def ria_score(weight: torch.Tensor, input_sq_mean: torch.Tensor, power: float = POWER) -> torch.Tensor:
    """(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||^a, with ||X_j|| the feature's RMS (as in Wanda's
    score here: a constant factor away from its l2 norm, so the same order within every row)."""
    magnitude = weight.float().abs()
    relative = magnitude / magnitude.sum(dim=1, keepdim=True) + magnitude / magnitude.sum(dim=0, keepdim=True)
    return relative.mul_(input_sq_mean.sqrt().pow(power).unsqueeze(0))


RIA = ScoreMethod("ria", "RIA", "RIA: |W| relative to its row and column totals x input-feature norm^0.5, per row "
                  "(Zhang et al. 2024, Plug-and-Play)", ria_score, SquaredMean, "RIA: relative |W| x ||X_j||^0.5")
