"""One user's working state in the app: the dense model, its pruned copy, the run's maps, and what was measured.

No Gradio here: the callbacks in ui.py translate between this and components.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..core import events as ev
from ..core.errors import UserError
from ..core.explain import Explanation

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
    source: str | list[str]
    nsamples: int
    seqlen: int
    seed: int
    folder: Path  # results.csv, results.json and chart.html, in the app's private files folder
    rows: list[dict] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> list[dict]:
        return [row for row in self.rows if row["key"] in self.specs]


class Workspace:
    """One session's state: the dense model it shares read-only with every session that loaded the same one, and
    its own pruned copy, which shares with the dense model every tensor pruning leaves untouched.

    When even the pruned linears' copy does not fit in free memory and no other session shares the dense model,
    it is pruned in place instead (the engine restores it on Stop) and the dense column says so.
    """

    def __init__(self, pool=None):
        from .sessions import ModelPool

        self.pool = pool if pool is not None else ModelPool()
        self.cancel = threading.Event()
        self.stop_chat = threading.Event()
        self._work = threading.Lock()  # one run (load, prune, evaluate, export) at a time per session
        self.activity: str | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        if getattr(self, "comparison", None) is not None:  # its files go with it
            shutil.rmtree(self.comparison.folder, ignore_errors=True)
        self.loaded = None  # core.models.LoadedModel: the shared dense model (or this session's own when in place)
        self.pruned: torch.nn.Module | None = None
        self.dense_kept = True
        self.summary: ev.PruneSummary | None = None
        self.run: dict | None = None  # what was asked for: method, pattern, calibration...
        self.run_id = 0  # counts finished runs, so the page can tell whose results it shows
        self.maps: dict[str, LayerMaps] = {}
        self.perplexity: dict = {}
        self._dense_perplexity: dict = {}
        self.generation: dict = {}
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
             trust_remote_code: bool = False, progress=None):
        import time

        from ..core.models import load_model
        from .sessions import model_key

        started = time.perf_counter()
        key = model_key(source, revision, device, dtype, token, trust_remote_code)
        with self.doing("loading a model"):
            self._reset()
            self.pool.release(self)
            loaded = self.pool.acquire(self, key, lambda: load_model(source, device, dtype, revision or None, token or None,
                                                                     trust_remote_code, progress=progress))
            self.loaded = loaded
            self.timings = {"load": time.perf_counter() - started}
        return loaded

    def require_model(self):
        if self.loaded is None:
            raise UserError("Load a model first (step 1)." if not self.closed else
                            "This session was closed and its models freed; reload the page and load a model.")
        return self.loaded

    def require_pruned(self) -> torch.nn.Module:
        if self.pruned is None:
            raise UserError("Prune the model first (step 2).")
        return self.pruned

    @property
    def dense_model(self) -> torch.nn.Module | None:
        return self.loaded.model if self.loaded is not None and self.dense_kept else None

    def copy_bytes(self, config) -> int:
        """What the pruned copy costs: the weights of the linears pruning will change."""
        from ..core.engine import select_linears

        _, plan = select_linears(self.require_model().model, config)
        return sum(m.weight.numel() * m.weight.element_size() for linears in plan for m in linears.values())

    def copy_fits(self, config) -> bool:
        from ..core.estimate import free_memory

        return free_memory(self.require_model().info.device) > self.copy_bytes(config) * HEADROOM

    # -- pruning
    def prune(self, config, calibration_source, nsamples: int, seqlen: int, seed: int) -> Iterator[ev.Event]:
        """Draw calibration, prune a copy of the dense model's linears (or the model itself when no copy fits and no
        other session shares it), yield events."""
        with self.doing("pruning"):
            yield from self._prune(config, calibration_source, nsamples, seqlen, seed)

    def _prune(self, config, calibration_source, nsamples, seqlen, seed) -> Iterator[ev.Event]:
        from ..core.calibration import calibration_windows
        from ..core.copies import pruning_copy
        from ..core.engine import prune, select_linears, validate
        from ..core.methods import get_method

        loaded = self.require_model()
        if not self.dense_kept:
            raise UserError("The model was pruned in place (no room for a copy); reload it before pruning again.")
        validate(loaded.model, config)
        self.check_memory(config, nsamples, seqlen)
        windows, calibration = None, None
        if get_method(config.method).needs_activations:
            windows, calibration = calibration_windows(loaded.tokenizer, calibration_source, nsamples, seqlen, seed,
                                                       loaded.info.context_length)
        self.pruned, self.summary, self.maps, self.perplexity, self.generation = None, None, {}, {}, {}
        self.cancel.clear()
        in_place = not self.copy_fits(config)
        if in_place and not self.pool.take_private(self, loaded):
            raise UserError("Not enough free memory for this session's pruned copy, and the dense model is shared with "
                            "other sessions, so it cannot be pruned in place. Try again when the server is less busy.")
        if in_place:
            model = loaded.model
        else:
            _, plan = select_linears(loaded.model, config)
            model = pruning_copy(loaded.model, [m for linears in plan for m in linears.values()])
        config = dataclasses.replace(config, restore_on_abort=in_place)
        self.run = {"method": config.method, "pattern": str(config.pattern), "sparsity": config.sparsity,
                    "calibration": calibration, "in_place": in_place}
        for event in prune(model, config, windows, self.cancel, loaded.name):
            if isinstance(event, ev.LinearPruned):
                self.maps[event.name] = LayerMaps(event.block, event.shape, event.sparsity, event.score_map, event.mask_map,
                                                  event.explanation)
            elif isinstance(event, ev.RunFinished):
                self.summary = event.summary
                self.pruned = model
                self.dense_kept = not in_place
                self.run_id += 1
                self.timings["calibration_and_pruning"] = event.summary.seconds
            yield event

    def drop_pruned(self) -> None:
        """Let the pruned copy and everything measured on it go (the dense model stays)."""
        from .sessions import release_memory

        self.pruned, self.summary, self.maps, self.perplexity, self.generation, self.run = None, None, {}, {}, {}, None
        release_memory()

    # -- comparing
    def compare(self, specs: list, calibration_source, nsamples: int, seqlen: int, seed: int, eval_nwindows: int,
                folder: Path) -> Iterator:
        """core.sweep's runs, one pruned copy at a time, each freed once measured; yields its events. The session's
        own pruned model is let go first, so that no more than one copy beside the dense model is ever held."""
        with self.doing("comparing methods"):
            yield from self._compare(specs, calibration_source, nsamples, seqlen, seed, eval_nwindows, folder)

    def _compare(self, specs, calibration_source, nsamples, seqlen, seed, eval_nwindows, folder) -> Iterator:
        from ..core import sweep
        from ..core.calibration import calibration_windows
        from ..core.engine import validate

        loaded = self.require_model()
        if not self.dense_kept:
            raise UserError("The model was pruned in place (no room for a copy); reload it before comparing.")
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
                                     eval_seqlen):
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
        """Refuse up front, with the numbers, a run that cannot fit in free memory even when pruning in place."""
        from ..core.estimate import check_fits

        check_fits(self.require_model().info, config.method, nsamples, seqlen, dense_copy=True,
                   batch_size=config.batch_size, hint="lower the samples or the sequence length")

    def stop(self) -> None:
        self.cancel.set()
        self.stop_chat.set()

    # -- results
    def evaluate(self, nwindows: int, progress=None) -> dict:
        """Dense (memoised per window setting, it never changes) and pruned perplexity on PROTOCOL's windows
        (512 tokens, or the model's context when shorter). progress(done, total) counts windows over both models."""
        from ..core.evaluate import perplexity

        with self.doing("measuring perplexity"):
            loaded = self.require_model()
            pruned = self.require_pruned()
            run_id = self.run_id
            seqlen = min(512, loaded.info.context_length or 512)
            key = (seqlen, nwindows)
            todo = [("pruned", pruned)]
            if self.dense_model is not None and key not in self._dense_perplexity:
                todo.insert(0, ("dense", self.dense_model))
            results, done = {}, 0
            self.cancel.clear()
            for name, model in todo:
                def step(i, _total, offset=done):
                    if progress is not None:
                        progress(offset + i, nwindows * len(todo))
                results[name] = perplexity(model, loaded.tokenizer, seqlen=seqlen, nwindows=nwindows,
                                           cancel=self.cancel, progress=step)
                done += nwindows
            if "dense" in results:
                self._dense_perplexity[key] = results["dense"]
            if run_id != self.run_id:
                raise UserError("A new run finished while measuring; measure again.")
            self.perplexity = {"pruned": results["pruned"]}
            if key in self._dense_perplexity:
                self.perplexity["dense"] = self._dense_perplexity[key]
            return self.perplexity

    def record_generation(self, column: str, tokens_per_second: float) -> None:
        """The last measured generation speed of a chat column, for the report."""
        self.generation[column] = round(tokens_per_second, 2)

    def report(self) -> dict:
        from ..core.export import make_report

        loaded = self.require_model()
        if self.summary is None:
            raise UserError("Prune the model first (step 2).")
        ppl = {k: v.__dict__ for k, v in self.perplexity.items()} or None
        return make_report(loaded.info, self.summary, self.run.get("calibration"), dict(self.timings), ppl,
                           dict(self.generation) or None)

    def export(self, folder: Path, overwrite: bool, overwrite_control: str) -> Path:
        from ..core.export import export_model

        with self.doing("exporting"):
            loaded = self.require_model()
            pruned = self.require_pruned()
            return export_model(pruned, loaded.tokenizer, folder, self.report(), overwrite, source=loaded.path,
                                overwrite_control=overwrite_control)
