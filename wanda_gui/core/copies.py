"""A pruned model that shares with its dense original every tensor that pruning leaves untouched."""

from __future__ import annotations

import copy
import itertools
from typing import Iterable

from torch import nn


def pruning_copy(model: nn.Module, linears: Iterable[nn.Module]) -> nn.Module:
    """Deep-copy the model's structure and the given linears' weights; embeddings, norms, biases, the LM head (unless
    it is one of the linears) and every other linear stay the very same tensors. Side-by-side chat then costs the
    model once plus the pruned weights, instead of the model twice."""
    fresh = {id(linear.weight) for linear in linears}
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if id(t) not in fresh}
    return copy.deepcopy(model, memo)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights too)."""
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def shared_bytes(a: nn.Module, b: nn.Module) -> int:
    """Bytes of storage that two models hold in common."""
    ours = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in itertools.chain(a.parameters(), a.buffers())}
    theirs = {t.untyped_storage().data_ptr() for t in itertools.chain(b.parameters(), b.buffers())}
    return sum(n for ptr, n in ours.items() if ptr in theirs)

