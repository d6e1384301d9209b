"""Which weights to zero, given a score per weight: unstructured per row, layer-wide, or N:M."""

from __future__ import annotations

import dataclasses
import re

import torch

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Unstructured (n = m = 0) or N:M (keep at most n of every m consecutive inputs of a row)."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        text = (text or "").strip().lower()
        if text in ("", "unstructured", "none"):
            return cls()
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if not match:
            raise UserError(f"Unknown pattern {text!r}: use 'unstructured' or N:M such as 2:4 or 4:8.")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise UserError(f"Pattern {n}:{m} is invalid: N:M needs 0 < N < M (2:4 keeps 2 of every 4).")
        return cls(n, m)

    def sparsity(self, target: float) -> float:
        """The sparsity this pattern actually produces."""
        return 1 - self.n / self.m if self.structured else target


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise UserError(f"Sparsity must be in [0, 1), e.g. 0.5 for 50%; got {sparsity!r}.")
    return float(sparsity)


def lowest_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k lowest scores of every row, ties going to the lower index (as a stable ascending sort).

    Finds each row's k-th smallest score with an unsorted topk (several times faster than a full sort), then
    settles ties at that threshold by position.
    """
    rows, cols = score.shape
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(score, dtype=torch.bool)
    threshold = score.topk(k, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    below = score < threshold
    at = score == threshold
    room = k - below.sum(dim=1, keepdim=True)
    if bool((at.sum(dim=1, keepdim=True) == room).all()):  # no surplus ties (the usual case): skip the cumsum
        return below | at
    return below | (at & (at.cumsum(dim=1) <= room))


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune int(C_in * sparsity) lowest scores of every output row (the Wanda comparison group)."""
    return lowest_per_row(score, int(score.shape[1] * sparsity))


def layerwise_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(numel * sparsity) lowest scores of the whole layer (classic magnitude pruning)."""
    flat = score.reshape(1, -1)
    return lowest_per_row(flat, int(flat.shape[1] * sparsity)).view_as(score)


def nm_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """In every group of M consecutive inputs of a row, prune all but the N highest scores."""
    rows, cols = score.shape
    if cols % pattern.m:
        raise UserError(f"Pattern {pattern} needs the input width to be a multiple of {pattern.m}; a layer has {cols} inputs.")
    groups = score.reshape(rows, cols // pattern.m, pattern.m)
    order = groups.argsort(dim=-1, stable=True)[..., : pattern.m - pattern.n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.view(rows, cols)


def select(score: torch.Tensor, sparsity: float, pattern: Pattern, layerwise: bool = False) -> torch.Tensor:
    """True where a weight is pruned."""
    if pattern.structured:
        return nm_mask(score, pattern)
    return layerwise_mask(score, sparsity) if layerwise else unstructured_mask(score, sparsity)
