"""What a pruning run is asked to do, checked before any model is loaded, so the CLI and the app fail early."""

from __future__ import annotations

import dataclasses

import torch

from .errors import UserError
from .masks import Pattern, Selection, check_sparsity
from .methods import OPTIONS, Method, Step, get_method, get_option, methods_reading_activations


def default_batch_size(device: torch.device, seqlen: int) -> int:
    """About 1k tokens a forward on CPU (measured on SmolLM2 blocks, 2 cores: batch 2 at seqlen 512 beat 4, 8 and
    12 by 2-8%, the activations staying in cache); GPUs want far more tokens per call."""
    tokens = 32768 if device.type == "cuda" else 1024
    return max(1, tokens // max(1, seqlen))


@dataclasses.dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: Pattern = dataclasses.field(default_factory=Pattern)
    layerwise: bool = False  # magnitude only: one threshold for the whole layer (the reference's variant)
    include: tuple[str, ...] = ()  # fnmatch patterns on qualified linear names; empty = every block linear
    exclude: tuple[str, ...] = ()
    prune_head: bool = False  # also the LM head (and so the input embeddings, when the two are tied)
    batch_size: int | None = None  # None: about 1k tokens a batch on CPU, 32k on CUDA
    restore_on_abort: bool = True  # keep a dense copy of each pruned weight until the run ends
    wanda_variant: bool = False  # Wanda only: the reference's α-variant (per-layer target, rows differ)
    explain: bool = False  # attach to each LinearPruned its input norms and how Wanda's mask differs from magnitude's
    options: tuple[str, ...] = ()  # keys of methods.OPTIONS, kept in the order they act
    efforts: dict[str, str] = dataclasses.field(default_factory=dict)  # an option's named setting (Step.efforts) by
    # its key; every chosen option that has settings gets its first unless one is named

    def __post_init__(self):
        """Parse and check what needs no model."""
        if isinstance(self.pattern, str):
            self.pattern = Pattern.parse(self.pattern)
        method = get_method(self.method)
        self.method = method.name
        self.sparsity = check_sparsity(self.sparsity)
        chosen = {get_option(key).key for key in ((self.options,) if isinstance(self.options, str) else self.options)}
        self.options = tuple(key for key in OPTIONS if key in chosen)
        if self.layerwise and self.method != "magnitude":
            raise UserError(f"Layer-wide comparison is a magnitude-pruning option; {self.method} has its own "
                            "comparison groups (output rows, or SparseGPT's column blocks).")
        if self.layerwise and self.pattern.nm:
            raise UserError("Layer-wide comparison does not apply to N:M patterns, which work within groups of a row.")
        if self.wanda_variant and (self.method != "wanda" or self.pattern.nm):
            raise UserError("The α-variant is a Wanda option for unstructured sparsity; choose method wanda and "
                            "pattern unstructured, or turn the variant off.")
        for option in self.option_classes:
            refuse_without_activations(option, method)
            if option.unstructured_only and self.pattern.nm:
                raise UserError(f"{option.label} {option.unstructured_only}, but {self.pattern} fixes every row's "
                                f"sparsity: use the unstructured pattern with {option.label}, or turn it off.")
            option.check(self.pattern)
        self.efforts = chosen_efforts(self.options, self.efforts)
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"Batch size must be at least 1; got {self.batch_size}.")

    @property
    def option_classes(self) -> list[type[Step]]:
        return [OPTIONS[key] for key in self.options]

    def refuse_offloaded(self) -> None:
        """What cannot run on a model read block by block from disk, refused before anything is loaded."""
        for option in self.option_classes:
            if option.offload_refusal:
                raise UserError(option.offload_refusal)

    def refuse_split(self) -> None:
        """What cannot run split over torchrun processes (each holding its share of the calibration windows)."""
        for option in self.option_classes:
            if option.torchrun_refusal:
                raise UserError(option.torchrun_refusal)

    def steps(self) -> tuple[Step, ...]:
        """The options' steps, fresh for each run (they keep per-run state)."""
        return tuple(option(**option.efforts[self.efforts[option.key]][1]) if option.efforts else option()
                     for option in self.option_classes)

    def selection(self, sparsity: float) -> Selection:
        """What a method reads of this run for a stage pruned to `sparsity`."""
        return Selection(sparsity, self.pattern, self.layerwise, self.wanda_variant)


def refuse_without_activations(option: type[Step], method: Method) -> None:
    if option.needs_activations and not method.needs_activations:
        raise UserError(f"{option.label} {option.reads}: choose a method that reads them "
                        f"({', '.join(methods_reading_activations())}), or turn {option.label} off.")


def chosen_efforts(options: tuple[str, ...], efforts: dict[str, str]) -> dict[str, str]:
    """Each chosen option's setting: the one named, else its first; a setting of an option that is off, or a name
    the option does not have, refused."""
    for key, effort in efforts.items():
        option = get_option(key)
        if option.key not in options:
            raise UserError(f"An effort for {option.label} needs {option.label} on: turn it on, or leave the effort out.")
        if effort not in option.efforts:
            raise UserError(f"{option.label} has no effort {effort!r}: use one of {', '.join(option.efforts) or 'none'}.")
    return {key: efforts.get(key, next(iter(OPTIONS[key].efforts))) for key in options if OPTIONS[key].efforts}
