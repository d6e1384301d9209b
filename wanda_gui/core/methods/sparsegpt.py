"""SparseGPT (Frantar & Alistarh 2023) as the Wanda paper's reference code runs it: OBS pruning with updates.

Per linear: H = (2/n) X^T X of its inputs; dead inputs (H_jj = 0) get H_jj = 1 and zero weights; 1% of the mean
diagonal as damping; U = the upper Cholesky factor of H^-1. Columns go left to right in blocks of 128: the mask is
chosen per block (unstructured: the lowest fraction of w^2 / U_jj^2 over the whole block; N:M: per group of M, as
the group is reached), and each pruned column's error is spread over the columns to its right.

The reference's rules, in faster arithmetic (the same results to rounding; P1's perplexities within 2% of the check
values): H summed batch by batch, only its upper triangle (statistics.Hessian), U from one factorisation, and the
column loop two operations a column on rows stored contiguously.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..errors import UserError
from ..masks import Pattern
from ..statistics import Hessian
from .base import Method

BLOCKSIZE = 128
PERCDAMP = 0.01


@dataclasses.dataclass
class InverseHessian:
    upper: torch.Tensor  # U with U^T U = (H + damp I)^-1
    dead: torch.Tensor  # inputs that were always zero


def inverse_hessian(H: torch.Tensor, percdamp: float = PERCDAMP) -> InverseHessian:
    """The reference's preparation of H (on a copy: linears sharing an input share H), and U from one Cholesky
    factorisation: with P reversing rows and columns, P H P = M M^T gives U = P M^-1 P (U^T U = H^-1). The reference
    goes cholesky, cholesky_inverse, cholesky, the same U to rounding, but torch's cholesky_inverse took 6 s for a
    1536-wide H on this CPU (the route here: 0.25 s)."""
    H = H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * H.diagonal().mean())
    M, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info.item():
        raise UserError("SparseGPT's input Hessian is not positive definite even after damping: use more "
                        "calibration samples or a wider precision (fp32).")
    eye = torch.eye(len(M), dtype=M.dtype, device=M.device)
    return InverseHessian(torch.linalg.solve_triangular(M, eye, upper=False).flip(0, 1), dead)


def block_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's unstructured rule: within a block of columns, prune every w^2/d^2 up to and including
    the value at sorted position int(numel * sparsity)."""
    saliency = W1 ** 2 / d.unsqueeze(0) ** 2
    if sparsity == 0:
        return saliency, torch.zeros_like(saliency, dtype=torch.bool)
    flat = saliency.flatten()
    threshold = flat.kthvalue(int(flat.numel() * sparsity) + 1).values  # == sort(flat)[int(numel * sparsity)]
    return saliency, saliency <= threshold


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """The column loop is thousands of small ops: on CPU one thread runs it 5-7x faster than a pool that meets
    at a barrier after every op (576 x 1536 layer, 2 cores: 0.8 s vs 4.6 s)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hinv: InverseHessian, sparsity: float, pattern: Pattern,
                    blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and update a (C_out, C_in) weight in place; return (w^2/U_jj^2 when each column was selected,
    True where pruned)."""
    if pattern.nm:  # whole N:M groups per block (the reference's 128 for 2:4 and 4:8)
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    W = weight.float().clone()
    W[:, hinv.dead] = 0
    score = torch.empty_like(W)
    mask = torch.zeros_like(W, dtype=torch.bool)
    with one_cpu_thread(W.device):
        prune_columns(W, hinv.upper, score, mask, sparsity, pattern, blocksize)
    weight.copy_(W)
    return score, mask


def prune_columns(W: torch.Tensor, U: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, sparsity: float,
                  pattern: Pattern, blocksize: int) -> None:
    """The reference's loop over column blocks and their columns, filling W (updated), score and mask in place.

    Within a block the columns are held as rows (T, contiguous): column i's error, its pruned entries over U_ii, is
    one product, and spreading it over the block's later columns one outer product. Pruned entries are zeroed once
    the block is done (no column is read after its turn); the columns beyond the block take the block's errors in
    one matrix product, as the reference's lazy update does."""
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        U1 = U[i1:i2, i1:i2]
        d1 = U1.diagonal()
        T = W[:, i1:i2].t().contiguous()  # (columns of the block, rows)
        errors = torch.empty_like(T)
        if pattern.nm:
            scale = torch.zeros_like(T)  # 1 / U_ii where pruned, set group by group as the loop reaches it
        else:
            score[:, i1:i2], mask[:, i1:i2] = block_mask(W[:, i1:i2], d1, sparsity)
            scale = mask[:, i1:i2].t() / d1.unsqueeze(1)
        for i in range(i2 - i1):
            if pattern.nm and i % pattern.m == 0:
                group = T[i:i + pattern.m] ** 2 / d1[i:i + pattern.m].unsqueeze(1) ** 2
                pruned = torch.zeros_like(group, dtype=torch.bool).scatter_(
                    0, group.topk(pattern.m - pattern.n, dim=0, largest=False).indices, True)
                score[:, i1 + i:i1 + i + pattern.m], mask[:, i1 + i:i1 + i + pattern.m] = group.t(), pruned.t()
                scale[i:i + pattern.m] = pruned / d1[i:i + pattern.m].unsqueeze(1)
            torch.mul(T[i], scale[i], out=errors[i])
            T[i:].addr_(U1[i, i:], errors[i], alpha=-1)
        W[:, i1:i2] = T.t()
        W[:, i1:i2].masked_fill_(mask[:, i1:i2], 0)
        W[:, i2:].addmm_(errors.t(), U[i1:i2, i2:], alpha=-1)


class SparseGPT(Method):
    name = "sparsegpt"
    label = "SparseGPT"
    description = "SparseGPT: prunes by w^2/[H^-1]_jj^2 and updates the kept weights to compensate (Frantar & Alistarh 2023)"
    score_label = "w^2 / [H^-1]_jj^2 when the column was selected"
    statistic = Hessian

    def prepare(self, stat):
        return inverse_hessian(stat)

    def prune(self, weight, prepared, selection):
        return sparsegpt_prune(weight, prepared, selection.sparsity, selection.pattern)


SPARSEGPT = SparseGPT()
