"""Why Wanda works, shown on the layer being pruned: a few input features carry huge activations, so the same
weights ranked by |W| x ||X_j|| (Wanda) and by |W| alone (magnitude) lose different positions."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .masks import Selection, select

OUTLIER_FACTOR = 5.0  # a feature is an outlier when its norm exceeds this many times the layer's median norm


@dataclasses.dataclass
class Explanation:
    input_norms: np.ndarray  # float32 (C_in,): the RMS of each input feature over the calibration tokens
    outliers: np.ndarray  # int64 indices of the features above OUTLIER_FACTOR x the median norm
    differing: float  # share of positions that Wanda's and magnitude's masks treat differently
    difference_map: np.ndarray  # float32, pooled like the score map: share of differing positions per cell


@torch.no_grad()
def explain(weight: torch.Tensor, input_sq_mean: torch.Tensor, selection: Selection, pool) -> Explanation:
    """Compare the masks Wanda and magnitude would choose on these weights (before this linear is pruned), both
    per row as Wanda compares."""
    norms = input_sq_mean.float().sqrt()
    magnitude = weight.float().abs()
    wanda = magnitude * norms.unsqueeze(0)
    per_row = Selection(selection.sparsity, selection.pattern)
    differ = select(wanda, per_row) ^ select(magnitude, per_row)
    median = norms.median()
    outliers = torch.nonzero(norms > OUTLIER_FACTOR * median).flatten() if median > 0 else torch.empty(0, dtype=torch.long)
    return Explanation(norms.cpu().numpy(), outliers.cpu().numpy(), float(differ.float().mean()), pool(differ))
