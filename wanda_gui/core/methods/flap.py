"""FLAP (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning"; CASIA-IVA-Lab/FLAP): an input channel
of o_proj / down_proj matters as much as its input fluctuates over the calibration tokens, times its weight column's
squared norm (WIFV); what the removed channels carried on average comes back as an output bias. Structured only:
core.structured chooses the channels and heads and shrinks the linears."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..statistics import Moments
from .base import Method


def flap_channel_score(weight: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """WIFV: the variance of input channel j over every calibration token x sum_i W_ij^2."""
    return moments[2] * weight.float().pow(2).sum(dim=0)


class FLAP(Method):
    name, label = "flap", "FLAP"
    description = ("FLAP: removes whole channels and heads whose inputs fluctuate least (variance x squared weight "
                   "column), their mean input added back as a bias; structured pattern only (An et al. 2024)")
    score_label = "Var(X_j) x ||W_:,j||^2"
    statistic = Moments
    structured_only = True
    compensates = True
    head_score_power = 2  # the reference squares the attention's WIFV
    channel_score = staticmethod(flap_channel_score)

    def prune(self, weight, prepared, selection):
        raise UserError("FLAP removes whole channels and heads: use it with the structured pattern.")


FLAP_METHOD = FLAP()
