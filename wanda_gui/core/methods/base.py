"""The one shape every pruning method has, and the whole-model hook points a method or an option can use."""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from ..masks import Pattern, Selection, select

if TYPE_CHECKING:
    from ..architecture import BlockCall
    from ..events import Event


@dataclasses.dataclass
class RunContext:
    """What a hook sees of a run. `sparsities` holds the target of each stage (blocks, then the LM head if
    pruned); the engine reads it per linear, so a hook before pruning may set per-block targets (OWL)."""

    model: nn.Module
    pattern: Pattern
    target: float  # the run's sparsity (each stage's own is in `sparsities`)
    blocks: nn.ModuleList
    stages: list[dict[str, nn.Module]]  # per stage (the blocks, then the LM head if pruned), its linears by name
    calibration: torch.Tensor | None  # (nsamples, seqlen) token ids
    hidden: torch.Tensor | None  # the current stage's inputs, (nsamples, seqlen, hidden); None without calibration
    calls: list["BlockCall"] | None  # how to replay each block
    batch_size: int
    device: torch.device
    sparsities: list[float]
    cancel: threading.Event | None = None
    target_note: str = ""  # a hook that sets `sparsities` says here how it chose them (shown with the targets)
    target_basis: list[float] | None = None  # and, per stage, the measure it chose them from (OWL: outlier ratio)


@dataclasses.dataclass
class BlockMasked:
    """A stage whose linears are all masked (and updated), before its pruned outputs are computed:
    ctx.hidden still holds its inputs."""

    index: int
    linears: dict[str, nn.Module]
    masks: dict[str, torch.Tensor]  # True where pruned, (C_out, C_in); kept when a hook overrides after_masking
    dense_weights: dict[str, torch.Tensor]  # each linear's weight before this stage was pruned, on the host (kept when
    # restore_on_abort is on or a hook overrides after_masking)
    statistics: dict[type, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)  # per statistic class
    # (the method's and each hook's `statistic`), per linear: collected from the stage's inputs before pruning
    dense_block: nn.Module | None = None  # a structured run: the block as it was (its linears had other shapes)


class Step:
    """Whole-model hook points around the block loop; an option (OWL, DSnoT, reconstruction) or the engine's caller
    (offload) overrides them. `statistic`: a class from core.statistics (or alike: add(x), result()) this hook needs
    of every pruned linear's input, collected in the same pass as the method's own and handed over in
    BlockMasked.statistics.

    An option is a Step registered in methods.OPTIONS: everything else (its CLI flag, its app checkbox, its sweep
    column, its refusals) is read from these attributes."""

    statistic: type | None = None
    key: str = ""  # an option's name: its --flag, its entry in PruneConfig.options, its column in a sweep
    label: str = ""  # how the page and the charts name it
    description: str = ""  # one line for the app and --help, citing its paper
    needs_activations: bool = False  # an option that does is refused with a method that reads no calibration data
    reads: str = ""  # what it reads of the activations, for that refusal: "<label> <reads>: choose a method..."
    unstructured_only: str = ""  # why it refuses N:M patterns ("" : it takes them)
    offload_refusal: str | None = None  # why it cannot run on a model read block by block from disk; None: it can
    torchrun_refusal: str | None = None  # why it cannot run split over torchrun processes; None: it can
    efforts: dict[str, tuple[str, dict]] = {}  # named settings, the first the default: (what it costs, the
    # constructor's arguments); the CLI's --<key>-effort, the app's choice and PruneConfig.efforts read them
    takes_structured: bool = False  # it works on a block whose linears were made smaller (core.structured)

    @classmethod
    def check(cls, pattern: Pattern) -> None:
        """Refuse, before a model is loaded, a pattern this option cannot serve (PruneConfig calls it when on)."""

    def extra_passes(self, nsamples: int, seqlen: int, width: int, device: torch.device) -> float:
        """For the time estimate: the forward passes over the calibration tokens through every block that this
        hook adds to the method's two (a backward counting two), at most, on `device`."""
        return 0.0

    def before_pruning(self, ctx: RunContext) -> Iterator[Event] | None:
        """Called once, the model still dense, after the first block's inputs are captured. A hook with work of its
        own may be a generator of events.Progress, passed on to the run's listeners."""

    def before_stage(self, ctx: RunContext, index: int) -> None:
        """Called as stage `index` begins, before its statistics are read (offload brings its weights in here)."""

    def after_masking(self, ctx: RunContext, block: BlockMasked) -> None:
        """Called after each stage's linears are masked, before the stage is re-run to feed the next one."""

    def after_stage(self, ctx: RunContext, index: int) -> None:
        """Called once stage `index` is pruned and its outputs computed: nothing reads its weights again."""


class Method(Step):
    """A pruning method: which statistic it needs per linear input (None: no calibration), and how it prunes
    one linear given that statistic. Linears fed the same tensor share one statistic and one `prepare`.
    Registered in methods.METHODS by `name`."""

    name: str = ""
    label: str = ""  # how the page names it
    description: str = ""  # one line for the app and --help, citing the paper
    score_label: str = ""  # what the LinearPruned score map shows
    statistic: type | None = None  # a class from core.statistics, or None
    # structured pruning (core.structured): the score of each input channel of o_proj / down_proj, from the weight
    # (C_out, C_in) and statistics.Moments of its input (None without calibration); None: the method cannot choose
    # whole channels. structured_only: it has no per-weight rule. compensates: the removed channels' mean input,
    # times their weights, is added as an output bias (FLAP)
    channel_score: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    structured_only: bool = False
    compensates: bool = False
    head_score_power: int = 1  # a head group's score: the sum of each channel's score to this power (FLAP: 2)

    @property
    def needs_activations(self) -> bool:
        return self.statistic is not None

    def takes(self, pattern: Pattern) -> bool:
        """Whether it can prune to this pattern: structured needs a channel score; a structured-only method takes
        nothing else."""
        return self.channel_score is not None if pattern.structured else not self.structured_only

    def prepare(self, stat: torch.Tensor | None) -> Any:
        """Work that depends only on the statistic, done once per shared input (SparseGPT: H's inverse)."""
        return stat

    def prune(self, weight: torch.Tensor, prepared: Any, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Prune (and possibly update) a (C_out, C_in) weight in place; return (score map, True where pruned)."""
        raise NotImplementedError


class ScoreMethod(Method):
    """A method that scores each weight and zeroes the lowest: no update of the others."""

    def __init__(self, name: str, label: str, description: str, score: Callable[..., torch.Tensor],
                 statistic: type | None, score_label: str,
                 channel_score: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None):
        self.name, self.label, self.description, self.score, self.statistic, self.score_label = (
            name, label, description, score, statistic, score_label)
        self.channel_score = channel_score

    def prune(self, weight, prepared, selection):
        score = self.score(weight, prepared)
        mask = select(score, selection)
        weight.masked_fill_(mask, 0)
        return score, mask
