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


def wanda_channel_score(weight: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """Wanda-sp (as FLAP's reference runs it): |W_ij| x ||X_j|| averaged over the output rows, per input channel."""
    return weight.float().abs().mul_(moments[1].sqrt().unsqueeze(0)).mean(dim=0)


def magnitude_channel_score(weight: torch.Tensor, moments: torch.Tensor | None = None) -> torch.Tensor:
    """The l2 norm of each input channel's weight column (FLAP's reference magnitude-sp)."""
    return weight.float().norm(dim=0)


WANDA = ScoreMethod("wanda", "Wanda", "Wanda: |W| x input-feature norm, per output row (Sun et al. 2023)", wanda_score,
                    SquaredMean, "|W| x ||X_j||", wanda_channel_score)
MAGNITUDE = ScoreMethod("magnitude", "Magnitude", "Magnitude: |W| only, per output row or layer-wide", magnitude_score,
                        None, "|W|", magnitude_channel_score)
