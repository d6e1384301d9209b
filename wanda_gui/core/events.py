"""The typed event stream from the engine to whoever listens (the CLI's progress bar, the GUI's plots)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .explain import Explanation


@dataclasses.dataclass
class RunStarted:
    model: str
    method: str
    pattern: str
    target_sparsity: float
    blocks: list[list[str]]  # the linears to prune, by qualified name, per decoder block (then the LM head, if asked)
    total_linears: int
    nsamples: int
    seqlen: int
    batch_size: int
    score_label: str = ""  # what LinearPruned.score_map shows for this method, e.g. "|W| x ||X_j||"


@dataclasses.dataclass
class Progress:
    """Work a hook does outside the block loop (OWL's pass over the dense model), counted in its own steps."""

    what: str
    done: int
    total: int


@dataclasses.dataclass
class TargetsChosen:
    """Per-stage targets that differ from the run's one (OWL), and how they were chosen."""

    sparsities: list[float]  # per stage: the blocks, then the LM head if pruned
    note: str
    basis: list[float] | None  # per stage, the measure they were chosen from (OWL: outlier ratio)


@dataclasses.dataclass
class BlockStarted:
    index: int
    name: str
    linears: int
    target: float | None = None  # this stage's target sparsity (unstructured; N:M fixes its own)


@dataclasses.dataclass
class LinearPruned:
    block: int
    name: str
    shape: tuple[int, int]  # (C_out, C_in)
    sparsity: float
    score_map: np.ndarray  # float32, mean-pooled to at most 128 x 128
    mask_map: np.ndarray  # float32, fraction of weights kept in each pooled cell
    seconds: float
    done: int  # linears pruned so far in this run
    total: int
    explanation: Explanation | None = None  # with PruneConfig.explain and calibration: why Wanda differs from magnitude


@dataclasses.dataclass
class BlockFinished:
    index: int
    seconds: float
    sparsity: float
    peak_memory_bytes: int  # resident set size on CPU, max allocated on CUDA


@dataclasses.dataclass
class BlockShrunk:
    """A block made smaller by structured pruning: what it kept of its MLP channels and attention heads (whole
    key/value groups with their query heads), and its linears' weights before and after."""

    index: int
    kept_channels: int
    total_channels: int
    kept_heads: int  # query heads
    total_heads: int
    parameters_before: int
    parameters_after: int


@dataclasses.dataclass
class LayerSparsity:
    name: str
    block: int
    shape: tuple[int, int]
    sparsity: float


@dataclasses.dataclass
class PruneSummary:
    method: str
    pattern: str
    target_sparsity: float
    achieved_sparsity: float  # zeros / elements over every pruned linear
    by_type: dict[str, float]  # e.g. {"q_proj": 0.5, "down_proj": 0.5}
    layers: list[LayerSparsity]
    pruned_parameters: int
    settings: dict  # the PruneConfig as asked: include/exclude, prune_head, layerwise, batch size...
    seconds: float
    calibration_seconds: float
    peak_memory_bytes: int
    parameters_before: int = 0  # the whole model's (a structured run makes it smaller; zeros do not)
    parameters_after: int = 0
    structure: dict | None = None  # a structured run: widths, kept channels and heads per block, bias compensation


@dataclasses.dataclass
class RunFinished:
    summary: PruneSummary


@dataclasses.dataclass
class RunCancelled:
    reason: str
    restored: bool


@dataclasses.dataclass
class RunFailed:
    reason: str
    layer: str | None
    restored: bool
    detail: str = ""  # the traceback, for --debug


Event = RunStarted | Progress | TargetsChosen | BlockStarted | LinearPruned | BlockShrunk | BlockFinished | RunFinished | RunCancelled | RunFailed
