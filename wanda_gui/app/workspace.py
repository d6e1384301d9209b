"""One user's working state in the app: the dense model, its pruned copy, the run's maps, and what was measured.

No Gradio here: the callbacks in ui.py translate between this and components.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..core import events as ev
from ..core import sweep
from ..core.calibration import HubDataset, calibration_windows
from ..core.config import PruneConfig
from ..core.engine import prune, select_linears, validate
from ..core.errors import UserError
from ..core.estimate import memory_parts, refuse_if_over
from ..core.evaluate import perplexity
from ..core.explain import Explanation
from ..core.export import export_into, export_model, make_report, write_rest
from ..core.memory import free_bytes, parse_bytes, release_memory, resident_bytes
from ..core.methods import get_method
from ..core import models
from ..core.offload import open_lazy
from ..core.speed import count_parameters, export_bytes, measure_speeds
from ..core.runs import MEMORY_MODES, MemoryNeed, decide_offload, prepare_tasks, prune_offloaded, pruned_copy
from ..core.zeroshot import TaskSpec, ZeroShot
from .pool import ModelPool, model_key
from .tempfolders import private_folder

HEADROOM = 1.15  # the pruned linears' copy must fit with this margin (allocator slack, activations)


@dataclasses.dataclass
class LayerMaps:
    block: int
    shape: tuple[int, int]
    sparsity: float
    score_map: np.ndarray
    mask_map: np.ndarray
    explanation: Explanation | None = None  # input norms and Wanda vs magnitude, when the run read activations


@dataclasses.dataclass
class Comparison:
    """A Compare run: the runs asked for, the rows finished so far (the dense one first), and the calibration they
    used, so that any finished run can be pruned again, identically, into the session's model."""

    specs: dict  # run key -> core.sweep.RunSpec
    source: str | list[str] | HubDataset
    nsamples: int
    seqlen: int
    seed: int
    folder: Path  # results.csv, results.json and chart.html, in the app's private files folder
    rows: list[dict] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> list[dict]:
        return [row for row in self.rows if row["key"] in self.specs]


_pruned_root: Path | None = None


def pruned_root() -> Path:
    """This process's folder (0700) for the pruned weights of models kept on disk; removed at exit. Not the folder
    the app serves files from: nobody downloads a session's weights but through its own export."""
    global _pruned_root
    if _pruned_root is None:
        _pruned_root = private_folder("pruned-")
    return _pruned_root


def disk_model(dense, folder: Path, trust_remote_code: bool, on_demand: bool = True):
    """A model whose blocks stay in `folder` (a LazyModel sharing everything outside the blocks with `dense`, the
    lazy dense model). on_demand: for chat, it reads each block as generation reaches it (its own hooks, so it
    never disturbs a run or an evaluation loading `dense`'s blocks); else the LazyModel, for a block-by-block
    evaluation."""
    lazy = open_lazy(folder, dense.model.config, dense.device, dense.dtype, trust_remote_code)
    lazy.share_resident(dense)
    return lazy.read_blocks_on_demand() if on_demand else lazy


def refuse_on_disk(config: PruneConfig) -> None:
    """What a run on a model kept on disk cannot do, in the app's words."""
    if config.prune_head:
        raise UserError("The LM head stays in memory, shared by the dense and the pruned model, when the model is "
                        "read block by block from disk: untick 'Also prune the LM head', or load the model whole.")
    config.refuse_offloaded()


class Workspace:
    """One session's state: the dense model it shares read-only with every session that loaded the same one, and
    its own pruned copy, which shares with the dense model every tensor pruning leaves untouched.

    When even the pruned linears' copy does not fit in free memory and no other session shares the dense model,
    it is pruned in place instead (the engine restores it on Stop) and the dense column says so.

    Offloaded (a model bigger than memory), both models stay on disk: the dense one in its own checkpoint, the
    pruned one written block by block into a private folder as it is pruned. Only what lies outside the blocks is
    held, once for both; chat reads each block from disk as a token passes through it.
    """

    def __init__(self, pool: ModelPool):
        self.pool = pool
        self.cancel = threading.Event()
        self.stop_chat = threading.Event()
        self._work = threading.Lock()  # one run (load, prune, evaluate, export) at a time per session
        self.activity: str | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        if getattr(self, "comparison", None) is not None:  # its files go with it
            shutil.rmtree(self.comparison.folder, ignore_errors=True)
        if getattr(self, "pruned_folder", None) is not None:
            shutil.rmtree(self.pruned_folder, ignore_errors=True)
        self.loaded = None  # core.models.LoadedModel: the shared dense model (or this session's own when in place)
        self.budget: int | None = None  # the memory budget asked for at load, in bytes
        self.trust_remote_code = False
        self.dense_view: torch.nn.Module | None = None  # offloaded: the dense model for chat, read block by block
        self.pruned: torch.nn.Module | None = None
        self.pruned_lazy = None  # offloaded: the pruned model on disk (core.offload.LazyModel), for evaluation
        self.pruned_folder: Path | None = None  # offloaded: where the pruned weights were written
        self.dense_kept = True
        self.summary: ev.PruneSummary | None = None
        self.run: dict | None = None  # what was asked for: method, pattern, calibration...
        self.run_id = 0  # counts finished runs, so the page can tell whose results it shows
        self.maps: dict[str, LayerMaps] = {}
        self.perplexity: dict = {}
        self._dense_perplexity: dict = {}
        self.zero_shot: dict[str, ZeroShot] = {}
        self.generation: dict = {}
        self.dense_counts: dict | None = None  # the dense model's parameters (core.speed.count_parameters)
        self.counts: dict | None = None  # {"dense": ..., "pruned": ...}, for a model held in memory
        self.speed: dict = {}  # {"dense": ..., "pruned": ...}, measured in one call (core.speed.measure_speeds)
        self.exported: int | None = None  # bytes of the last export's safetensors
        self.timings: dict = {}
        self.comparison: Comparison | None = None

    @property
    def busy(self) -> bool:
        return self.activity is not None

    def check_idle(self) -> None:
        activity = self.activity
        if activity is not None:
            raise UserError(f"This session is {activity}; wait for it to finish or stop it first.")

    @contextlib.contextmanager
    def doing(self, activity: str):
        """Mark the session busy with one activity; a second one is refused in words instead of queued silently."""
        if not self._work.acquire(blocking=False):
            self.check_idle()
            raise UserError("This session is busy with another step; try again in a moment.")  # it just ended
        self.activity = activity
        try:
            yield
        finally:
            self.activity = None
            self._work.release()

    def close(self) -> None:
        """The session ended: stop its runs and free its models."""
        self.closed = True
        self.stop()
        with self._work:  # a stopped run ends within a second or so
            self._reset()
            self.pool.release(self)

    # -- model
    def load(self, source: str, device: str, dtype: str | None, revision: str | None = None, token: str | None = None,
             trust_remote_code: bool = False, progress=None, memory: str = "memory", budget: str | None = None,
             hub_only: bool = False):
        """memory: a key of MEMORY_MODES; budget: the most the app's process may hold ('3GiB'), or None for
        whatever is free; hub_only: the source is a hub id, never a path (core.models.resolve_source)."""
        if memory not in MEMORY_MODES:
            raise UserError(f"Memory must be one of {', '.join(MEMORY_MODES)}; got {memory!r}.")
        budget_bytes = parse_bytes(budget) if (budget or "").strip() else None
        started = time.perf_counter()
        key = model_key(source, revision, device, dtype, token, trust_remote_code)
        load = functools.partial(models.load_model, source, device, dtype, revision or None, token or None,
                                 trust_remote_code, progress=progress, hub_only=hub_only)
        with self.doing("loading a model"):
            self._reset()
            self.pool.release(self)
            sized = None
            if memory != "memory" or budget_bytes is not None:  # opened with empty blocks: its size, nothing more
                try:
                    sized = load(offload=True)
                except UserError:  # not readable block by block (no safetensors): Automatic loads it whole
                    if memory != "auto":
                        raise
            if sized is not None and self.plan_offload(sized, memory, budget_bytes):
                loaded = self.pool.acquire(self, (*key, "offload"), lambda: sized)
                self.dense_view = disk_model(loaded.lazy, loaded.path, trust_remote_code)
            else:
                del sized
                loaded = self.pool.acquire(self, key, load)
            self.loaded, self.budget, self.trust_remote_code = loaded, budget_bytes, trust_remote_code
            self.timings = {"load": time.perf_counter() - started}
        return loaded

    @staticmethod
    def plan_offload(sized, memory: str, budget: int | None) -> bool:
        """Whether to keep the model on disk: as asked, or (auto) when the dense model and its pruned linears' copy
        do not fit in the budget (or in what is free). Refuses, with the numbers, what cannot fit either way."""
        lazy, info = sized.lazy, sized.info
        copy = {"its pruned linears' copy": info.linear_parameters * lazy.model.dtype.itemsize}
        return decide_offload(MemoryNeed.of(lazy, info.memory_bytes, {}, whole_only=copy), memory, budget,
                              info.device, "the budget", "choose Memory 'On disk, block by block' or 'Automatic', "
                              "or raise the budget")

    def require_model(self):
        if self.loaded is None:
            raise UserError("Load a model first (step 1)." if not self.closed else
                            "This session was closed and its models freed; reload the page and load a model.")
        return self.loaded

    def pruned_linears(self) -> dict[str, torch.nn.Module]:
        """The pruned model's pruned linears, by name (the run's layers)."""
        modules = dict(self.require_pruned().named_modules())
        return {layer.name: modules[layer.name] for layer in self.summary.layers if layer.name in modules}

    def require_pruned(self) -> torch.nn.Module:
        if self.pruned is None:
            raise UserError("Prune the model first (step 2).")
        return self.pruned

    @property
    def offloaded(self) -> bool:
        return self.loaded is not None and self.loaded.lazy is not None

    @property
    def dense_model(self) -> torch.nn.Module | None:
        """The dense model to chat with: the loaded one, or (offloaded) the one that reads its blocks from disk."""
        if self.loaded is None or not self.dense_kept:
            return None
        return self.dense_view if self.offloaded else self.loaded.model

    def copy_bytes(self, config) -> int:
        """What the pruned copy costs: the weights of the linears pruning will change."""
        _, plan = select_linears(self.require_model().model, config)
        return sum(m.weight.numel() * m.weight.element_size() for linears in plan for m in linears.values())

    def copy_fits(self, config) -> bool:
        return self.room() > self.copy_bytes(config) * HEADROOM

    def room(self) -> int:
        """What may still be allocated on the model's device: what is free, and under the budget asked for at load
        (the most the process may hold), what the process can still take."""
        device = self.require_model().info.device
        free = free_bytes(device)
        if self.budget is not None:
            held = resident_bytes() if torch.device(device).type == "cpu" else torch.cuda.memory_allocated(device)
            free = min(free, max(0, self.budget - held))
        return free

    # -- pruning
    def prune(self, config, calibration_source, nsamples: int, seqlen: int, seed: int) -> Iterator[ev.Event]:
        """Draw calibration, prune a copy of the dense model's linears (or the model itself when no copy fits and no
        other session shares it), yield events."""
        with self.doing("pruning"):
            yield from self._prune(config, calibration_source, nsamples, seqlen, seed)

    def _prune(self, config, calibration_source, nsamples, seqlen, seed) -> Iterator[ev.Event]:
        loaded = self.require_model()
        if not self.dense_kept:
            raise UserError("The model was pruned in place (no room for a copy); reload it before pruning again.")
        validate(loaded.model, config)
        if self.offloaded:
            refuse_on_disk(config)
        self.check_memory(config, nsamples, seqlen)
        windows, calibration = None, None
        if get_method(config.method).needs_activations:
            windows, calibration = calibration_windows(loaded.tokenizer, calibration_source, nsamples, seqlen, seed,
                                                       loaded.info.context_length)
        self.drop_pruned()
        self.cancel.clear()
        self.run = {"method": config.method, "pattern": str(config.pattern), "sparsity": config.sparsity,
                    "calibration": calibration, "in_place": False, "offload": self.offloaded}
        if self.offloaded:
            yield from self._prune_on_disk(config, windows)
            return
        in_place = not self.copy_fits(config)
        if in_place and not self.pool.take_private(self, loaded):
            raise UserError("Not enough free memory for this session's pruned copy, and the dense model is shared with "
                            "other sessions, so it cannot be pruned in place. Try again when the server is less busy.")
        if self.dense_counts is None:  # counted before pruning: a model pruned in place is not dense after
            self.dense_counts = count_parameters(loaded.model)
        model = loaded.model if in_place else pruned_copy(loaded.model, config)
        config = dataclasses.replace(config, restore_on_abort=in_place)
        self.run["in_place"] = in_place
        for event in prune(model, config, windows, self.cancel, loaded.name, bounded=self.budget is not None):
            if isinstance(event, ev.RunFinished):
                self.pruned = model
                self.dense_kept = not in_place
                self.counts = {"dense": self.dense_counts, "pruned": count_parameters(model)}
            self._record(event)
            yield event

    def _prune_on_disk(self, config, windows) -> Iterator[ev.Event]:
        """The offloaded run: each block read from the dense checkpoint, pruned, written into a private folder and
        released; the pruned model is then read from that folder, block by block, for chat and evaluation."""
        loaded = self.loaded
        lazy = loaded.lazy
        folder = Path(tempfile.mkdtemp(dir=pruned_root()))
        try:
            for event in prune_offloaded(lazy, config, windows, folder, self.cancel, loaded.name):
                if isinstance(event, ev.RunFinished):
                    self.pruned_lazy = disk_model(lazy, folder, self.trust_remote_code, on_demand=False)
                    self.pruned, self.pruned_folder = disk_model(lazy, folder, self.trust_remote_code), folder
                self._record(event)
                yield event
        finally:
            if self.pruned_folder != folder:  # stopped or failed: nothing of it is kept
                shutil.rmtree(folder, ignore_errors=True)

    def _record(self, event: ev.Event) -> None:
        """What the page shows of a run: each linear's maps as it is pruned, the summary at the end."""
        if isinstance(event, ev.LinearPruned):
            self.maps[event.name] = LayerMaps(event.block, event.shape, event.sparsity, event.score_map, event.mask_map,
                                              event.explanation)
        elif isinstance(event, ev.RunFinished):
            self.summary = event.summary
            self.run_id += 1
            self.timings["calibration_and_pruning"] = event.summary.seconds

    def drop_pruned(self) -> None:
        """Let the pruned copy (or its folder on disk) and everything measured on it go (the dense model stays)."""
        self.pruned, self.summary, self.maps, self.perplexity, self.generation, self.run = None, None, {}, {}, {}, None
        self.zero_shot, self.counts, self.speed, self.exported = {}, None, {}, None
        self.pruned_lazy = None
        if self.pruned_folder is not None:
            shutil.rmtree(self.pruned_folder, ignore_errors=True)
            self.pruned_folder = None
        release_memory()

    # -- comparing
    def compare(self, specs: list, calibration_source, nsamples: int, seqlen: int, seed: int, eval_nwindows: int,
                folder: Path, speed: bool = False) -> Iterator:
        """core.sweep's runs, one pruned copy at a time, each freed once measured; yields its events. The session's
        own pruned model is let go first, so that no more than one copy beside the dense model is ever held."""
        with self.doing("comparing methods"):
            yield from self._compare(specs, calibration_source, nsamples, seqlen, seed, eval_nwindows, folder, speed)

    def _compare(self, specs, calibration_source, nsamples, seqlen, seed, eval_nwindows, folder, speed) -> Iterator:
        loaded = self.require_model()
        if not self.dense_kept:
            raise UserError("The model was pruned in place (no room for a copy); reload it before comparing.")
        if self.offloaded:
            raise UserError("Compare prunes a copy of the model for each run in memory, and this model was loaded "
                            "block by block from disk: prune one setting at a time in step 2, or load it whole.")
        for spec in specs:  # every run must fit this model and the memory before the first one starts
            validate(loaded.model, spec.config())
        for spec in {spec.method: spec for spec in specs}.values():
            self.check_memory(spec.config(), nsamples, seqlen)
        if not self.copy_fits(specs[0].config()):
            raise UserError("Compare prunes a copy of the model's linears for each run, and there is not enough free "
                            "memory for one. Prune in step 2 instead (it can prune in place), or free memory.")
        windows, calibration = calibration_windows(loaded.tokenizer, calibration_source, nsamples, seqlen, seed,
                                                   loaded.info.context_length)
        if self.comparison is not None:
            shutil.rmtree(self.comparison.folder, ignore_errors=True)
            self.comparison = None
        self.drop_pruned()
        self.cancel.clear()
        comparison = self.comparison = Comparison({s.key: s for s in specs}, calibration_source, nsamples, seqlen, seed,
                                                  Path(folder))
        eval_seqlen = min(512, loaded.info.context_length or 512)
        for event in sweep.run_sweep(loaded, specs, windows, calibration, eval_nwindows, folder, self.cancel,
                                     eval_seqlen, speed):
            if isinstance(event, (sweep.DenseMeasured, sweep.RunDone)):
                comparison.rows.append(event.row)
            yield event

    def take(self, key: str) -> Iterator[ev.Event]:
        """Prune a finished Compare run again, with its calibration windows, into the session's pruned model (for
        chat and export): the same setting on the same windows gives the same masks."""
        comparison = self.comparison
        if comparison is None or key not in {row["key"] for row in comparison.finished}:
            raise UserError("Pick a finished run of the comparison first (step 7).")
        config = dataclasses.replace(comparison.specs[key].config(), explain=True)
        yield from self.prune(config, comparison.source, comparison.nsamples, comparison.seqlen, comparison.seed)

    def check_memory(self, config, nsamples: int, seqlen: int) -> None:
        """Refuse up front, with the numbers, a run that cannot fit in what may still be allocated (room()) even when
        pruning in place; offloaded, with a block in memory and no copy."""
        loaded = self.require_model()
        info = loaded.info
        parts = memory_parts(info, config.method, nsamples, seqlen, dense_copy=not self.offloaded,
                             batch_size=config.batch_size)
        if self.offloaded:
            parts["a block"] = loaded.lazy.block_bytes()
        refuse_if_over(parts, info.device, self.room(), "lower the samples or the sequence length")

    def stop(self) -> None:
        self.cancel.set()
        self.stop_chat.set()

    # -- results
    def evaluate(self, nwindows: int, progress=None) -> dict:
        """Dense (memoised per window setting, it never changes) and pruned perplexity on PROTOCOL's windows
        (512 tokens, or the model's context when shorter). progress(done, total) counts windows over both models."""
        with self.doing("measuring perplexity"):
            loaded = self.require_model()
            pruned = self.require_pruned()
            run_id = self.run_id
            seqlen = min(512, loaded.info.context_length or 512)
            key = (seqlen, nwindows)
            lazy = loaded.lazy  # offloaded: both are evaluated block by block, from disk
            todo = [("pruned", pruned, self.pruned_lazy)]
            if self.dense_model is not None and key not in self._dense_perplexity:
                todo.insert(0, ("dense", lazy.model if lazy is not None else loaded.model, lazy))
            results, done = {}, 0
            self.cancel.clear()
            for name, model, on_disk in todo:
                def step(i, _total, offset=done):
                    if progress is not None:
                        progress(offset + i, nwindows * len(todo))
                results[name] = perplexity(model, loaded.tokenizer, seqlen=seqlen, nwindows=nwindows,
                                           cancel=self.cancel, progress=step, lazy=on_disk)
                done += nwindows
            if "dense" in results:
                self._dense_perplexity[key] = results["dense"]
            if run_id != self.run_id:
                raise UserError("A new run finished while measuring; measure again.")
            self.perplexity = {"pruned": results["pruned"]}
            if key in self._dense_perplexity:
                self.perplexity["dense"] = self._dense_perplexity[key]
            return self.perplexity

    def measure_zero_shot(self, spec: TaskSpec, progress=None) -> dict[str, ZeroShot]:
        """Dense (when kept) and pruned zero-shot accuracy on the spec's tasks, one task at a time; progress(model,
        where). Both are measured each time: a tasks folder's YAMLs may have been edited in between."""
        with self.doing("measuring zero-shot accuracy"):
            loaded = self.require_model()
            pruned = self.require_pruned()
            if self.offloaded:
                raise UserError("Zero-shot tasks run every example through the whole model, and this one was loaded "
                                "block by block from disk (each batch would read every block): load it whole.")
            run_id = self.run_id
            tasks = prepare_tasks(spec)  # datasets read (or refused in words) before any model pass
            models = {"dense": self.dense_model, "pruned": pruned}
            self.cancel.clear()
            results = {name: tasks.evaluate(model, loaded.tokenizer, cancel=self.cancel,
                                            progress=(lambda where, name=name: progress(name, where)) if progress
                                            else None)
                       for name, model in models.items() if model is not None}
            if run_id != self.run_id:
                raise UserError("A new run finished while measuring; measure again.")
            self.zero_shot = results
            return results

    def measure_speed(self, progress=None) -> dict:
        """Prefill and generation speed of the dense and the pruned model on their device, in one call taking turns
        (core.speed.measure_speeds); progress(generations done, total)."""
        with self.doing("measuring speed"):
            loaded = self.require_model()
            pruned = self.require_pruned()
            if self.offloaded:
                raise UserError("Speed is measured on a model held in memory; this one is read block by block from "
                                "disk, so every token would read every block (it would time the disk): load it whole.")
            if self.dense_model is None:
                raise UserError("The dense model was not kept (it was pruned in place, for lack of memory), so there "
                                "is nothing to measure the pruned one against: reload the model to compare them.")
            run_id = self.run_id
            measured = measure_speeds({"dense": self.dense_model, "pruned": pruned}, loaded.tokenizer,
                                      loaded.info.device, progress=progress)
            if run_id != self.run_id:
                raise UserError("A new run finished while measuring; measure again.")
            self.speed = measured
            return measured

    def record_generation(self, column: str, tokens_per_second: float) -> None:
        """The last measured generation speed of a chat column, for the report."""
        self.generation[column] = round(tokens_per_second, 2)

    def report(self) -> dict:
        loaded = self.require_model()
        if self.summary is None:
            raise UserError("Prune the model first (step 2).")
        ppl = {k: v.__dict__ for k, v in self.perplexity.items()} or None
        report = make_report(loaded.info, self.summary, self.run.get("calibration"), dict(self.timings), ppl,
                             dict(self.generation) or None,
                             {k: v.as_dict() for k, v in self.zero_shot.items()} or None, self.counts,
                             self.speed or None)
        if self.exported is not None:
            report["export_bytes"] = self.exported
        if self.offloaded:  # as the CLI's --offload reports it
            report["offload"] = {"block_bytes": loaded.lazy.block_bytes(), "resident_bytes": loaded.lazy.resident_bytes(),
                                 "max_memory": self.budget}
        return report

    def export(self, folder: Path, overwrite: bool, overwrite_control: str, list_contents: bool = True) -> Path:
        """list_contents: a refusal of a foreign folder may name its files (core.export.check_target)."""
        with self.doing("exporting"):
            loaded = self.require_model()
            pruned = self.require_pruned()
            if not self.offloaded:
                out = export_model(pruned, loaded.tokenizer, folder, self.report(), overwrite, source=loaded.path,
                                   overwrite_control=overwrite_control, list_contents=list_contents)
                self.exported = export_bytes(out)
                return out
            with export_into(folder, overwrite, loaded.path, overwrite_control=overwrite_control,
                             list_contents=list_contents) as target:
                for weights in self.pruned_folder.iterdir():  # written block by block as the run went
                    try:
                        os.link(weights, target / weights.name)
                    except OSError:  # another file system
                        shutil.copyfile(weights, target / weights.name)
                write_rest(self.pruned_lazy.model, loaded.tokenizer, target, self.report())
            self.exported = export_bytes(folder)
            return Path(folder).absolute()
