"""The run services the CLI, the app and the sweep share: whether a model is held whole or read block by block from
disk, a prune in memory (in place or on a copy that shares what pruning leaves untouched) or offloaded, and an event
stream drained into its summary or an error."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Generator, Iterable, Iterator

import torch
from torch import nn

from . import distributed, models
from .calibration import calibration_text, check_seqlen, check_text_files, text_file_sources, windows_from_text
from .config import PruneConfig
from .copies import pruning_copy
from .devices import resolve_device, resolve_dtype
from .engine import prune, select_linears, validate
from .errors import UserError
from .estimate import check_eval_fits, check_fits, evaluation_parts, memory_parts
from .evaluate import Perplexity, perplexity
from .events import Event, PruneSummary, RunCancelled, RunFailed, RunFinished
from .export import StreamedWeights, check_target, export_into, export_model, make_report, write_rest
from .memory import format_bytes, free_bytes, release_memory, resident_bytes
from .methods import get_method
from .models import LoadedModel
from .offload import Checkpoint, LazyModel, Offload
from .passes import Cancelled
from .speed import count_parameters, measure_speed
from .zeroshot import TaskProgress, TaskSpec, ZeroShot

MEMORY_MODES = {"memory": "In memory", "offload": "On disk, block by block",
                "auto": "Automatic: on disk if it does not fit"}


class RunError(UserError):
    """A run that failed: the reason for the user, where it failed, and the traceback for --debug."""

    def __init__(self, event: RunFailed):
        super().__init__(event.reason)
        self.layer, self.detail, self.restored = event.layer, event.detail, event.restored


def outcome(events: Iterable[Event], show: Callable[[Event], object] = lambda event: event) -> Generator:
    """Pass a run's events on, each as show(event) (None: not passed on); return its summary (`summary = yield from
    outcome(events)`), raise Cancelled when it was stopped and RunError when it failed."""
    for event in events:
        if isinstance(event, RunFinished):
            return event.summary
        if isinstance(event, RunCancelled):
            raise Cancelled(event.reason)
        if isinstance(event, RunFailed):
            raise RunError(event)
        shown = show(event)
        if shown is not None:
            yield shown
    raise UserError("Pruning did not finish.")


def drain(events: Iterable[Event], on_event: Callable[[Event], None] | None = None) -> PruneSummary:
    """Run to the end, showing each event to on_event; the summary, or the error outcome() raises."""
    stream = outcome(events)
    while True:
        try:
            event = next(stream)
        except StopIteration as end:
            return end.value
        if on_event is not None:
            on_event(event)


def pruned_copy(model: nn.Module, config: PruneConfig) -> nn.Module:
    """A copy of the model to prune: the linears the config selects are copied, every other tensor is shared."""
    _, stages = select_linears(model, config)
    return pruning_copy(model, [linear for linears in stages for linear in linears.values()])


def prune_offloaded(lazy: LazyModel, config: PruneConfig, windows: torch.Tensor | None, folder: Path,
                    cancel=None, model_name: str = "model") -> Iterator[Event]:
    """A model kept on disk, pruned block by block: each block read from its checkpoint, pruned, written into
    folder's safetensors (save_pretrained's layout) and released; what lies outside the blocks is written once the
    run has finished, before RunFinished is passed on. The source on disk is never changed, so nothing is kept to
    restore."""
    config = dataclasses.replace(config, restore_on_abort=False)
    config.refuse_offloaded()
    try:
        with StreamedWeights(folder, lazy.specs()) as weights:
            for event in prune(lazy.model, config, windows, cancel, model_name, steps=(Offload(lazy, weights.write),),
                               bounded=True):
                if isinstance(event, RunFinished):
                    weights.write(lazy.resident_tensors())
                    weights.finish()
                yield event
    finally:
        lazy.release_loaded_blocks()  # the block a stopped or failed run was in


@dataclasses.dataclass
class MemoryNeed:
    """What a model and a run need, held whole or read block by block, on top of what the process holds besides
    the model (Python, torch, transformers, the tokenizer): the plan compares these peaks with a limit."""

    process: int  # the process now, without the model's weights (on a GPU: nothing, the host's memory is apart)
    model: int  # every weight, held whole
    resident: int  # what lies outside the blocks (held either way)
    block: int  # the largest block
    run: dict[str, int]  # the run's own parts (calibration activations, scoring...)
    transient: int  # the largest copy made while a tensor is read in
    whole_only: dict[str, int] = dataclasses.field(default_factory=dict)  # held only with the model whole (the
    # app's pruned copy of the linears; offloaded, the pruned blocks go to disk)

    @classmethod
    def of(cls, lazy: LazyModel, model_bytes: int, run: dict[str, int],
           whole_only: dict[str, int] | None = None) -> "MemoryNeed":
        """Sized from a model opened with empty blocks (its resident part read in, counted in the process now)."""
        resident = lazy.resident_bytes()
        process = max(0, resident_bytes() - resident) if lazy.device.type == "cpu" else 0
        return cls(process, model_bytes, resident, lazy.block_bytes(), dict(run), lazy.largest_read_copy(),
                   dict(whole_only or {}))

    @property
    def whole(self) -> int:
        return self.process + self.model + sum(self.run.values()) + sum(self.whole_only.values()) + self.transient

    @property
    def by_block(self) -> int:
        """One block at a time: each is released before the next is read, and a bounded run hands freed memory back
        to the OS at once (engine.prune's `bounded`)."""
        return self.process + self.resident + self.block + sum(self.run.values()) + self.transient

    def parts(self, offloaded: bool) -> str:
        held = (f"what lies outside the blocks {format_bytes(self.resident)} + a block {format_bytes(self.block)}"
                if offloaded else f"the model {format_bytes(self.model)}")
        run = "".join(f" + {name} {format_bytes(n)}"
                      for name, n in {**self.run, **({} if offloaded else self.whole_only)}.items() if n)
        reads = f" + reading {format_bytes(self.transient)}" if self.transient else ""
        return f"this process {format_bytes(self.process)} + {held}{run}{reads}"


def decide_offload(need: MemoryNeed, mode: str, budget: int | None, device: str, budget_name: str,
                   choices: str) -> bool:
    """Whether to keep the model on disk: as `mode` asks ('memory', 'offload', 'auto': on disk when it does not fit
    whole). The limit is the budget (the process's peak, as the kernel counts it), else what the process holds now
    plus what is free. Refuses, with the numbers, what cannot fit; `budget_name` and `choices` name the controls
    that change it (the CLI's flags, the app's fields)."""
    if mode not in MEMORY_MODES:
        raise UserError(f"Memory must be one of {', '.join(MEMORY_MODES)}; got {mode!r}.")
    cpu = torch.device(device).type == "cpu"
    limit = budget if budget is not None else (need.process + need.resident if cpu else 0) + free_bytes(device)
    said = f"{budget_name} is {format_bytes(limit)}" if budget is not None else f"{format_bytes(limit)} is available"
    offload = mode == "offload" or (mode == "auto" and need.whole > limit)
    if not offload and need.whole > limit:
        raise UserError(f"Held whole, this run needs about {format_bytes(need.whole)} on {device} "
                        f"({need.parts(False)}) but {said}: {choices}.")
    if offload and need.by_block > limit:
        raise UserError(f"Even block by block this run needs about {format_bytes(need.by_block)} on {device} "
                        f"({need.parts(True)}) but {said}: raise it, or lower the samples or the sequence length.")
    return offload


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and where it runs: 'builtin', a folder or a hub id, a device and a dtype."""

    source: str = "builtin"
    revision: str | None = None
    token: str | None = None
    trust_remote_code: bool = False
    device: str = "cpu"
    dtype: str | None = None  # None: fp32 on CPU, bf16 on CUDA

    def check(self) -> None:
        """Device and dtype, before anything is loaded."""
        resolve_dtype(self.dtype, resolve_device(self.device))

    def load(self, offload: bool = False, progress=None) -> LoadedModel:
        return models.load_model(self.source, self.device, self.dtype, self.revision, self.token,
                                 self.trust_remote_code, progress=progress, offload=offload)

    @property
    def folder(self) -> Path | None:
        """The local folder it names, if it is one (an export must stay out of it)."""
        path = Path(self.source.strip()).expanduser()
        return path if self.source.strip() != models.BUILTIN and path.is_dir() else None


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    """Which text calibrates and how the windows are drawn from it (PROTOCOL.md)."""

    source: str | tuple[str, ...] = "builtin"  # 'builtin', 'hf:NAME[:CONFIG]', or text files
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0

    def check(self) -> None:
        check_text_files(text_file_sources(list(self.source) if isinstance(self.source, tuple) else self.source))

    def text(self) -> tuple[str, str]:
        """(text, a label for reports): read before the model, so that a bad source costs no load."""
        return calibration_text(list(self.source) if isinstance(self.source, tuple) else self.source)

    def windows(self, loaded: LoadedModel, text: tuple[str, str]) -> tuple[torch.Tensor, dict]:
        check_seqlen(self.seqlen, loaded.info.context_length)
        return windows_from_text(loaded.tokenizer, *text, self.nsamples, self.seqlen, self.seed,
                                 loaded.info.context_length)


@dataclasses.dataclass
class PruneJob:
    """A whole headless run: load, calibrate, prune, measure, export."""

    model: ModelSource
    config: PruneConfig
    calibration: CalibrationSpec
    out: Path
    overwrite: bool = False
    eval_windows: int | None = None  # perplexity dense and pruned on this many windows of calibration.seqlen
    memory: str = "memory"  # a key of MEMORY_MODES
    budget: int | None = None  # the process's peak (RAM on CPU, the GPU's memory on CUDA)
    tasks: TaskSpec | None = None  # zero-shot accuracy dense and pruned on these tasks
    speed: bool = False  # prefill and generation speed, dense and pruned (core.speed)

    @property
    def needs_activations(self) -> bool:
        return get_method(self.config.method).needs_activations

    def check(self) -> None:
        """Everything that needs no model, before the model is loaded."""
        self.model.check()
        self.calibration.check()
        check_target(self.out, self.overwrite, self.model.folder)
        if self.memory == "offload":
            self.refuse_offloaded()
        if distributed.launched_by_torchrun():
            if not self.needs_activations:
                raise UserError(f"{self.config.method} reads no calibration data: there is nothing to share among "
                                "torchrun processes; run it in one process.")
            self.config.refuse_split()
            if self.memory != "memory" or self.budget is not None:
                raise UserError("--offload and --max-memory run in one process for now: drop them, or torchrun.")

    def refuse_offloaded(self) -> None:
        """What cannot run on a model read block by block from disk."""
        self.config.refuse_offloaded()
        if self.tasks is not None:
            raise UserError("Zero-shot tasks run every example through the whole model, which this run keeps on disk "
                            "block by block: drop --tasks, or --offload (or raise --max-memory).")
        if self.speed:
            raise UserError("--speed measures a model held whole; this run keeps it on disk block by block, where "
                            "every token would read every block (it would time the disk): drop --speed, or "
                            "--offload (or raise --max-memory).")

    def run_parts(self, loaded: LoadedModel) -> dict[str, int]:
        """What the run needs beside the model: pruning's parts, or measuring's when that is more."""
        c = self.calibration
        parts = memory_parts(loaded.info, self.config.method, c.nsamples, c.seqlen, dense_copy=False,
                             batch_size=self.config.batch_size)
        if self.eval_windows:
            evaluation = evaluation_parts(loaded.info, vocab_size(loaded.model), c.seqlen)
            if loaded.lazy is not None:  # an offloaded evaluation holds every window's hidden states
                evaluation["hidden states"] = self.eval_windows * c.seqlen * loaded.info.hidden_size * 4
            parts = max(parts, evaluation, key=lambda p: sum(p.values()))
        return parts

    def open_model(self, progress=None) -> LoadedModel:
        """The model whole, or with empty blocks for a block-by-block run: as asked, or as the budget decides."""
        if self.memory == "memory" and self.budget is None:
            return self.model.load(progress=progress)
        sized = self.model.load(offload=True, progress=progress)
        need = MemoryNeed.of(sized.lazy, sized.info.memory_bytes, self.run_parts(sized))
        if decide_offload(need, "auto" if self.memory == "memory" else self.memory, self.budget, sized.info.device,
                          "--max-memory", "raise --max-memory, or add --offload"):
            self.refuse_offloaded()
            return sized
        del sized, need
        release_memory()
        return self.model.load(progress=progress)


def vocab_size(model: nn.Module) -> int:
    """Width of the logits, which a perplexity batch holds several times over."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size


def prune_and_export(job: PruneJob, on_event: Callable[[Event], None] | None = None, progress=None,
                     log: Callable[[str], None] = lambda line: None,
                     on_task: Callable[[str, TaskProgress], None] | None = None) -> dict:
    """The headless run, start to end; the report (with the export's folder), or {} on a torchrun rank that
    exports nothing. Under torchrun each rank calibrates on its share of the windows; rank 0 measures and exports.
    on_task(which model, where): zero-shot progress, which is "dense" or "pruned"."""
    job.check()
    text = job.calibration.text() if job.needs_activations else None
    tasks = prepare_tasks(job.tasks) if job.tasks is not None else None  # every rank alike, so all fail alike
    if distributed.launched_by_torchrun():
        job.model = dataclasses.replace(job.model, device=distributed.start(job.model.device))
    started = time.perf_counter()
    loaded = job.open_model(progress)
    timings = {"load": time.perf_counter() - started}
    validate(loaded.model, job.config)
    c = job.calibration
    check_fits(loaded.info, job.config.method, c.nsamples, c.seqlen, batch_size=job.config.batch_size,
               hint="lower --nsamples or --seqlen")
    if job.eval_windows:
        check_seqlen(c.seqlen, loaded.info.context_length)
        check_eval_fits(loaded.info, vocab_size(loaded.model), c.seqlen, hint="lower --seqlen")
    windows, calibration = job.calibration.windows(loaded, text) if text is not None else (None, None)
    if loaded.lazy is not None:
        return export_offloaded(job, loaded, windows, calibration, timings, on_event, log)
    return export_in_memory(job, loaded, windows, calibration, timings, on_event, log, tasks, on_task)


def measure(job: PruneJob, loaded: LoadedModel, name: str, log, lazy: LazyModel | None = None) -> Perplexity:
    result = perplexity(loaded.model if lazy is None else lazy.model, loaded.tokenizer, seqlen=job.calibration.seqlen,
                        nwindows=job.eval_windows, lazy=lazy)
    log(f"{name} perplexity {result}")
    return result


def prepare_tasks(spec: TaskSpec):
    """The tasks found and their datasets read, before the model loads (a missing dataset then costs no load)."""
    from . import harness  # lm_eval only when tasks are asked for (see core.zeroshot's docstring)

    return harness.PreparedTasks(spec)


def list_tasks(folder: Path | None) -> list[str]:
    """Every task name --tasks takes: the folder's own, then lm-evaluation-harness's catalogue."""
    from . import harness  # lm_eval only when tasks are asked for (see core.zeroshot's docstring)

    return harness.list_tasks(folder)


def measure_tasks(tasks, loaded: LoadedModel, name: str, log, on_task) -> ZeroShot:
    result = tasks.evaluate(loaded.model, loaded.tokenizer,
                            progress=(lambda where: on_task(name, where)) if on_task is not None else None)
    log(f"{name} zero-shot mean accuracy {result.mean_acc:.2%} over {len(result.tasks)} tasks")
    return result


def export_in_memory(job, loaded, windows, calibration, timings, on_event, log, tasks=None, on_task=None) -> dict:
    lead = distributed.rank() == 0
    ppl, zero_shot, speed = {}, {}, {}
    counts = {"dense": count_parameters(loaded.model)} if lead else {}
    if job.eval_windows and lead:
        ppl["dense"] = measure(job, loaded, "dense", log)
    if job.speed and lead:
        speed["dense"] = measure_speed_of(loaded, "dense", log)
    if tasks is not None and lead:
        zero_shot["dense"] = measure_tasks(tasks, loaded, "dense", log, on_task)
    share = windows if windows is None else distributed.shard(windows)
    shares = distributed.gather(0 if share is None else len(share))
    config = dataclasses.replace(job.config, restore_on_abort=False)  # a stopped headless run saves nothing
    summary = drain(prune(loaded.model, config, share, model_name=loaded.name, bounded=job.budget is not None), on_event)
    if not lead:
        return {}
    if job.eval_windows:
        ppl["pruned"] = measure(job, loaded, "pruned", log)
        timings["evaluation"] = ppl["dense"].seconds + ppl["pruned"].seconds
    if tasks is not None:
        zero_shot["pruned"] = measure_tasks(tasks, loaded, "pruned", log, on_task)
        timings["zero_shot"] = zero_shot["dense"].seconds + zero_shot["pruned"].seconds
    if job.speed:
        speed["pruned"] = measure_speed_of(loaded, "pruned", log)
    counts["pruned"] = count_parameters(loaded.model)
    if distributed.active():
        calibration = {**calibration, "processes": distributed.world_size(), "samples_per_process": shares}
    report = make_report(loaded.info, summary, calibration, timings, {k: v.__dict__ for k, v in ppl.items()} or None,
                         zero_shot={k: v.as_dict() for k, v in zero_shot.items()} or None, counts=counts,
                         speed=speed or None)
    report["export"] = str(export_model(loaded.model, loaded.tokenizer, job.out, report, job.overwrite,
                                        source=loaded.path))
    return report


def measure_speed_of(loaded: LoadedModel, name: str, log) -> dict:
    """Prefill and generation speed, one model at a time: the CLI prunes in place, so the dense model is measured
    before pruning and the pruned one after, on the same device and prompt."""
    result = measure_speed(loaded.model, loaded.tokenizer, loaded.info.device)
    log(f"{name} speed: prefill {result['prefill_tokens_per_second']:.1f} tokens/s, generation "
        f"{result['generation_tokens_per_second']:.1f} tokens/s")
    return result


def export_offloaded(job, loaded, windows, calibration, timings, on_event, log) -> dict:
    """Block by block: each block read, pruned, written into the export's shards and released; perplexity (asked
    for) measured block by block too, the pruned one from the shards just written."""
    lazy, ppl = loaded.lazy, {}
    with export_into(job.out, job.overwrite, loaded.path) as folder:
        if job.eval_windows:
            ppl["dense"] = measure(job, loaded, "dense", log, lazy)
        summary = drain(prune_offloaded(lazy, job.config, windows, folder, model_name=loaded.name), on_event)
        if job.eval_windows:
            lazy.checkpoint = Checkpoint(folder)
            ppl["pruned"] = measure(job, loaded, "pruned", log, lazy)
            timings["evaluation"] = ppl["dense"].seconds + ppl["pruned"].seconds
        report = make_report(loaded.info, summary, calibration, timings, {k: v.__dict__ for k, v in ppl.items()} or None)
        report["offload"] = {"block_bytes": lazy.block_bytes(), "resident_bytes": lazy.resident_bytes(),
                             "max_memory": job.budget}
        write_rest(lazy.model, loaded.tokenizer, folder, report)
    report["export"] = str(Path(job.out).absolute())
    return report
