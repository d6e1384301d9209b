"""What a method measures at a linear's input over the calibration tokens: accumulated batch by batch, in fp32."""

from __future__ import annotations


import torch

from .distributed import merge, sum_across_ranks


class SquaredMean:
    """mean(x_j^2) over every token, per input feature (Wanda's ||X_j||^2 / tokens)."""

    def __init__(self, width: int, device: torch.device):
        self.sums = torch.zeros(width, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        self.sums += (flat * flat).sum(dim=0)  # 10x faster than linalg.vector_norm on CPU
        self.tokens += flat.shape[0]

    def result(self) -> torch.Tensor:
        return self.sums / max(1, self.tokens)

    def all_reduce(self) -> None:
        """Sum over torchrun ranks (core.distributed)."""
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.sums.device)
        sum_across_ranks(self.sums)
        self.tokens = int(sum_across_ranks(tokens).item())


class Moments:
    """mean(x_j), mean(x_j^2) and the variance of every input feature over every token, summed in float64 (a
    feature's variance is a small difference of large sums): FLAP's baseline input and fluctuation, Wanda's norm.
    result() is (3, width) float32: mean, squared mean, variance."""

    def __init__(self, width: int, device: torch.device):
        self.sums = torch.zeros(2, width, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()
        self.sums[0] += flat.sum(dim=0)
        self.sums[1] += (flat * flat).sum(dim=0)
        self.tokens += flat.shape[0]

    def result(self) -> torch.Tensor:
        mean, square = self.sums / max(1, self.tokens)
        return torch.stack([mean, square, (square - mean * mean).clamp_(min=0)]).float()

    def all_reduce(self) -> None:
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.sums.device)
        sum_across_ranks(self.sums)
        self.tokens = int(sum_across_ranks(tokens).item())


class Hessian:
    """H = (2 / nsamples) X^T X over every token of the calibration samples, as SparseGPT defines it: summed batch by
    batch (the reference rescales a running average before each sample: the same H to rounding, at a third of the
    time here). H is symmetric, so each batch adds only its upper triangle, in ROW_BLOCKS bands of rows from the
    diagonal on: 56% of the products, 0.67-0.70x the time of the full product at P1's widths on this CPU (the sum
    stays exact fp32; the lower triangle is filled once, in result())."""

    ROW_BLOCKS = 8

    def __init__(self, width: int, device: torch.device):
        self.sum = torch.zeros(width, width, dtype=torch.float32, device=device)  # the upper triangle is the sum
        self.nsamples = 0
        self.edges = [round(width * i / self.ROW_BLOCKS) for i in range(self.ROW_BLOCKS + 1)]

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        for a, b in zip(self.edges, self.edges[1:]):
            if b > a:
                self.sum[a:b, a:].addmm_(flat[:, a:b].t(), flat[:, a:])
        self.nsamples += x.reshape(-1, x.shape[-2], x.shape[-1]).shape[0] if x.dim() >= 3 else 1  # a 2-D input: one

    def result(self) -> torch.Tensor:
        return (self.sum.triu() + self.sum.triu(1).t()) * (2 / max(1, self.nsamples))

    def all_reduce(self) -> None:
        """Sum over torchrun ranks (core.distributed): the sums and the sample counts."""
        samples = torch.tensor([float(self.nsamples)], dtype=torch.float64, device=self.sum.device)
        sum_across_ranks(self.sum)
        self.nsamples = int(sum_across_ranks(samples).item())


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
