"""Pruning methods: a score per weight, compared within each output row (or the whole layer)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .errors import UserError


def wanda_score(weight: torch.Tensor, input_sq_mean: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: the weight's magnitude times the RMS of the input feature it multiplies."""
    return weight.float().abs().mul_(input_sq_mean.sqrt().unsqueeze(0))


def magnitude_score(weight: torch.Tensor, input_sq_mean: torch.Tensor | None = None) -> torch.Tensor:
    """|W_ij| alone: the classic baseline, blind to activations."""
    return weight.float().abs()


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    needs_activations: bool
    score: Callable[..., torch.Tensor]
    description: str


METHODS = {
    "wanda": Method("wanda", True, wanda_score, "Wanda: |W| x input-feature norm, per output row (Sun et al. 2023)"),
    "magnitude": Method("magnitude", False, magnitude_score, "Magnitude: |W| only, per output row or layer-wide"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[(name or "").strip().lower()]
    except KeyError:
        raise UserError(f"Unknown method {name!r}: use one of {', '.join(METHODS)}.") from None
