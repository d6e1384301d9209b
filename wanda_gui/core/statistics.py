"""What a method measures at a linear's input over the calibration samples: accumulated batch by batch, in fp32, in
the reference implementations' own arithmetic."""

from __future__ import annotations

import math

import torch

from .distributed import merge, sum_across_ranks


class SquaredMean:
    """Wanda's input statistic to the bit as the reference accumulates it (its scaler_row): per input feature, the
    squared norm over one calibration sample's tokens, averaged over the samples as a running mean, sample by
    sample. A batched sum of squares rounds differently, and the near-ties its last bit flipped moved Wanda 4:8 on
    P1 by 1.1% (50%: 50.685 instead of the reference's 50.641, which this gives to the last digit)."""

    def __init__(self, width: int, device: torch.device):
        self.mean = torch.zeros(width, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        samples = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.unsqueeze(0)  # (samples, tokens, width)
        # One kernel for every sample's norms: the same sums, bit for bit, as the reference's one call per sample.
        for squared in torch.linalg.vector_norm(samples.float(), dim=1) ** 2:
            self.mean *= self.nsamples / (self.nsamples + 1)
            self.nsamples += 1
            self.mean += squared / self.nsamples

    def result(self) -> torch.Tensor:
        return self.mean

    def all_reduce(self) -> None:
        """The average over every rank's samples, each rank's mean weighed by its sample count."""
        samples = torch.tensor([float(self.nsamples)], dtype=torch.float64, device=self.mean.device)
        self.mean *= self.nsamples
        sum_across_ranks(self.mean)
        self.nsamples = int(sum_across_ranks(samples).item())
        self.mean /= max(1, self.nsamples)


class Hessian:
    """H = (2 / nsamples) X^T X, as SparseGPT's reference accumulates it, to the bit: a running average rescaled
    before each sample, one sample at a time (a batched product rounds differently, and SparseGPT's updates turn
    one ulp into other masks a few blocks on)."""

    def __init__(self, width: int, device: torch.device):
        self.H = torch.zeros(width, width, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        for sample in (x if x.dim() == 3 else x.unsqueeze(0)):  # one sample at a time, in the reference's arithmetic
            self.H *= self.nsamples / (self.nsamples + 1)
            self.nsamples += 1
            inp = math.sqrt(2 / self.nsamples) * sample.reshape(-1, sample.shape[-1]).t().float()
            self.H += inp.matmul(inp.t())

    def result(self) -> torch.Tensor:
        return self.H

    def all_reduce(self) -> None:
        """The average over every rank's samples, each rank's H weighed by its sample count."""
        samples = torch.tensor([float(self.nsamples)], dtype=torch.float64, device=self.H.device)
        self.H *= self.nsamples
        sum_across_ranks(self.H)
        self.nsamples = int(sum_across_ranks(samples).item())
        self.H /= max(1, self.nsamples)


class Several:
    """Several statistics of the same inputs from one pass: make(kinds) gives a class the passes can use."""

    kinds: tuple[type, ...] = ()

    def __init__(self, width: int, device: torch.device):
        self.parts = [kind(width, device) for kind in self.kinds]

    @classmethod
    def of(cls, kinds: tuple[type, ...]) -> type:
        return type("Several", (cls,), {"kinds": tuple(kinds)})

    def add(self, x: torch.Tensor) -> None:
        for part in self.parts:
            part.add(x)

    def result(self) -> dict[type, torch.Tensor]:
        return {kind: part.result() for kind, part in zip(self.kinds, self.parts)}

    def all_reduce(self) -> None:
        for part in self.parts:
            merge(part)
