"""Pruning methods by name: each one small object (methods/base.py says its shape), one file per family."""

from __future__ import annotations

from ..errors import UserError
from .base import BlockMasked, Method, RunContext, ScoreMethod, Step
from .dsnot import DSnoT
from .owl import OWL
from .reconstruct import Reconstruct
from .ria import RIA, ria_score
from .sparsegpt import SPARSEGPT
from .wanda import MAGNITUDE, WANDA, magnitude_score, wanda_score

METHODS: dict[str, Method] = {m.name: m for m in (WANDA, MAGNITUDE, SPARSEGPT, RIA)}
OPTIONS: dict[str, type[Step]] = {"owl": OWL, "dsnot": DSnoT, "reconstruct": Reconstruct}  # PruneConfig's boolean field -> its step, in the order they act


def option_steps(config) -> tuple[Step, ...]:
    """The whole-model steps a PruneConfig's options ask for, fresh for each run."""
    return tuple(step() for name, step in OPTIONS.items() if getattr(config, name))


def get_method(name: str) -> Method:
    try:
        return METHODS[(name or "").strip().lower()]
    except KeyError:
        raise UserError(f"Unknown method {name!r}: use one of {', '.join(METHODS)}.") from None


__all__ = ["METHODS", "OPTIONS", "OWL", "DSnoT", "Reconstruct", "BlockMasked", "Method", "RunContext", "ScoreMethod", "Step", "get_method",
           "magnitude_score", "option_steps", "ria_score", "wanda_score"]
