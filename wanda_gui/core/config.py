"""What a pruning run is asked to do, checked before any model is loaded, so the CLI and the app fail early."""

from __future__ import annotations

import dataclasses

import torch

from .errors import UserError
from .masks import Pattern, Selection, check_sparsity
from .methods import OPTIONS, Method, Step, get_method, get_option, methods_reading_activations, structured_methods

# how a structured run spreads the removal over the blocks: what each gives up, for --help and the app
WIDTHS = {
    "uniform": "every block keeps the same number of MLP channels and attention heads: exports load anywhere, "
               "but a block that matters more loses as much as one that matters less",
    "adaptive": "FLAP's standardised scores ranked across all blocks and modules choose each block's widths: "
                "better quality, but one more pass over the dense model first, and the export is padded with zeros "
                "to the widest block (every runtime reads it, the file is not smaller than the widest block's)",
}


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
    widths: str = "uniform"  # structured pattern only: a key of WIDTHS

    def __post_init__(self):
        """Parse and check what needs no model."""
        if isinstance(self.pattern, str):
            self.pattern = Pattern.parse(self.pattern)
        method = get_method(self.method)
        self.method = method.name
        self.sparsity = check_sparsity(self.sparsity)
        chosen = {get_option(key).key for key in ((self.options,) if isinstance(self.options, str) else self.options)}
        self.options = tuple(key for key in OPTIONS if key in chosen)
        self.refuse_structured(method)
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

    def refuse_structured(self, method: Method) -> None:
        """What the structured pattern cannot combine with, and what only it takes, each in one line."""
        if self.widths not in WIDTHS:
            raise UserError(f"Widths must be one of {', '.join(WIDTHS)}; got {self.widths!r}.")
        if not self.pattern.structured:
            if method.structured_only:
                raise UserError(f"{method.label} removes whole channels and heads: use it with the structured pattern, "
                                f"or choose another method for {self.pattern} sparsity.")
            if self.widths != "uniform":
                raise UserError("Adaptive widths spread a structured run over the blocks: use them with the structured "
                                "pattern.")
            return
        if method.channel_score is None:
            raise UserError(f"{method.label} scores single weights and cannot remove whole channels and heads: with the "
                            f"structured pattern use {', '.join(structured_methods())}.")
        for option in self.option_classes:
            if not option.takes_structured:
                raise UserError(f"{option.label} works on single weights and does not apply to the structured pattern: "
                                "turn it off.")
        refused = {"layer-wide comparison": self.layerwise, "Wanda's α-variant": self.wanda_variant,
                   "include/exclude patterns": self.include or self.exclude, "pruning the LM head": self.prune_head}
        for what, asked in refused.items():
            if asked:
                raise UserError(f"The structured pattern removes channels and heads from every decoder block alike; "
                                f"{what} does not apply to it.")
        if self.sparsity == 0:
            raise UserError("A structured run needs a fraction above 0 of the decoder linears' weights to remove.")

    @property
    def option_classes(self) -> list[type[Step]]:
        return [OPTIONS[key] for key in self.options]

    def refuse_offloaded(self) -> None:
        """What cannot run on a model read block by block from disk, refused before anything is loaded."""
        if self.pattern.structured:
            raise UserError("Structured pruning changes the blocks' shapes, which a block-by-block export lays out "
                            "before the run: run it on the model loaded whole (without offload).")
        for option in self.option_classes:
            if option.offload_refusal:
                raise UserError(option.offload_refusal)

    def refuse_split(self) -> None:
        """What cannot run split over torchrun processes (each holding its share of the calibration windows)."""
        if self.pattern.structured:
            raise UserError("Structured pruning runs in one process for now: run it without torchrun.")
        for option in self.option_classes:
            if option.torchrun_refusal:
                raise UserError(option.torchrun_refusal)

    def steps(self) -> tuple[Step, ...]:
        """The options' steps, fresh for each run (they keep per-run state)."""
        return option_steps(self.options, self.efforts)

    def selection(self, sparsity: float) -> Selection:
        """What a method reads of this run for a stage pruned to `sparsity`."""
        return Selection(sparsity, self.pattern, self.layerwise, self.wanda_variant)


def recipe(name: str) -> dict:
    """A run named as the sweep's keys and the benchmarks name it, METHOD[+OPTION[=EFFORT]...] (e.g.
    alps+reconstruct=thorough), as PruneConfig's method, options and efforts."""
    method, *options = name.split("+")
    return {"method": method, "options": tuple(o.split("=")[0] for o in options),
            "efforts": dict(o.split("=", 1) for o in options if "=" in o)}


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


def option_steps(options: tuple[str, ...], efforts: dict[str, str]) -> tuple[Step, ...]:
    """The chosen options' steps, each with its effort's settings (chosen_efforts)."""
    efforts = chosen_efforts(options, efforts)
    return tuple(OPTIONS[key](**OPTIONS[key].efforts[efforts[key]][1]) if key in efforts else OPTIONS[key]()
                 for key in options)
