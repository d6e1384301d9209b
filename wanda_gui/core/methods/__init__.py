"""Every pruning method and option, registered once: the CLI's flags, the app's choices, the sweep's columns and the
refusals all loop over these two tables. A new method or option is one file and one entry here."""

from __future__ import annotations

from ..errors import UserError
from .base import BlockMasked, Method, RunContext, ScoreMethod, Step
from .dsnot import DSnoT
from .flap import FLAP_METHOD
from .owl import OWL
from .reconstruct import Reconstruct
from .ria import RIA
from .sparsegpt import SPARSEGPT
from .wanda import MAGNITUDE, WANDA

METHODS: dict[str, Method] = {m.name: m for m in (WANDA, MAGNITUDE, SPARSEGPT, RIA, FLAP_METHOD)}
OPTIONS: dict[str, type[Step]] = {o.key: o for o in (OWL, DSnoT, Reconstruct)}  # in the order they act


def get_method(name: str) -> Method:
    try:
        return METHODS[(name or "").strip().lower()]
    except KeyError:
        raise UserError(f"Unknown method {name!r}: use one of {', '.join(METHODS)}.") from None


def get_option(key: str) -> type[Step]:
    try:
        return OPTIONS[(key or "").strip().lower()]
    except KeyError:
        raise UserError(f"Unknown option {key!r}: use one of {', '.join(OPTIONS)}.") from None


def structured_methods() -> list[str]:
    return [name for name, method in METHODS.items() if method.channel_score is not None]


def methods_reading_activations() -> list[str]:
    return [name for name, method in METHODS.items() if method.needs_activations]


__all__ = ["METHODS", "OPTIONS", "BlockMasked", "Method", "RunContext", "ScoreMethod", "Step", "get_method",
           "get_option", "methods_reading_activations", "structured_methods"]
