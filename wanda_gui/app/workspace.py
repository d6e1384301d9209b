"""One user's working state in the app: the dense model, its pruned copy, the run's maps, and what was measured.

No Gradio here: the callbacks in ui.py translate between this and components.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import torch

from ..core import events as ev
from ..core.errors import UserError

HEADROOM = 1.15  # a dense copy must fit with this margin (allocator slack, activations)


@dataclasses.dataclass
class LayerMaps:
    block: int
    shape: tuple[int, int]
    sparsity: float
    score_map: np.ndarray
    mask_map: np.ndarray


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


class Workspace:
    """Holds the dense model and, once pruned, a pruned deep copy, so both can answer side by side.

    When the copy does not fit in free memory, the model is pruned in place instead (the engine restores it on
    Stop) and the dense column says so: dense chat then needs a reload.
    """

    def __init__(self):
        self.loaded = None  # core.models.LoadedModel, always the dense weights unless dense_kept is False
        self.pruned: torch.nn.Module | None = None
        self.dense_kept = True
        self.summary: ev.PruneSummary | None = None
        self.run: dict | None = None  # what was asked for: method, pattern, calibration...
        self.maps: dict[str, LayerMaps] = {}
        self.perplexity: dict = {}
        self._dense_perplexity: dict = {}
        self.timings: dict = {}
        self.cancel = threading.Event()
        self.stop_chat = threading.Event()

    def __deepcopy__(self, memo):
        """Gradio deep-copies each session's initial state: a workspace (models, events) starts anew instead."""
        return Workspace()

    # -- model
    def load(self, source: str, device: str, dtype: str | None, revision: str | None = None, token: str | None = None,
             trust_remote_code: bool = False, progress=None):
        import time

        from ..core.models import load_model

        started = time.perf_counter()
        loaded = load_model(source, device, dtype, revision or None, token or None, trust_remote_code, progress=progress)
        self.__init__()
        self.loaded = loaded
        self.timings = {"load": time.perf_counter() - started}
        return loaded

    def require_model(self):
        if self.loaded is None:
            raise UserError("Load a model first (step 1).")
        return self.loaded

    def require_pruned(self) -> torch.nn.Module:
        if self.pruned is None:
            raise UserError("Prune the model first (step 2).")
        return self.pruned

    @property
    def dense_model(self) -> torch.nn.Module | None:
        return self.loaded.model if self.loaded is not None and self.dense_kept else None

    def copy_fits(self) -> bool:
        loaded = self.require_model()
        return free_memory(torch.device(loaded.info.device)) > loaded.info.memory_bytes * HEADROOM

    # -- pruning
    def prune(self, config, calibration_source, nsamples: int, seqlen: int, seed: int) -> Iterator[ev.Event]:
        """Draw calibration, prune a copy of the dense model (or the model itself when no copy fits), yield events."""
        from ..core.calibration import calibration_windows
        from ..core.engine import prune, validate
        from ..core.methods import get_method

        loaded = self.require_model()
        if not self.dense_kept:
            raise UserError("The model was pruned in place (no room for a dense copy); reload it before pruning again.")
        validate(loaded.model, config)
        windows, calibration = None, None
        if get_method(config.method).needs_activations:
            windows, calibration = calibration_windows(loaded.tokenizer, calibration_source, nsamples, seqlen, seed,
                                                       loaded.info.context_length)
        self.pruned, self.summary, self.maps, self.perplexity = None, None, {}, {}
        self.cancel.clear()
        in_place = not self.copy_fits()
        model = loaded.model if in_place else copy.deepcopy(loaded.model)
        config = dataclasses.replace(config, restore_on_abort=in_place)
        self.run = {"method": config.method, "pattern": str(config.pattern), "sparsity": config.sparsity,
                    "calibration": calibration, "in_place": in_place}
        for event in prune(model, config, windows, self.cancel, loaded.name):
            if isinstance(event, ev.LinearPruned):
                self.maps[event.name] = LayerMaps(event.block, event.shape, event.sparsity, event.score_map, event.mask_map)
            elif isinstance(event, ev.RunFinished):
                self.summary = event.summary
                self.pruned = model
                self.dense_kept = not in_place
                self.timings["calibration_and_pruning"] = event.summary.seconds
            yield event

    def stop(self) -> None:
        self.cancel.set()
        self.stop_chat.set()

    # -- results
    def evaluate(self, nwindows: int) -> dict:
        """Dense (memoised per window setting, it never changes) and pruned perplexity on PROTOCOL's windows
        (512 tokens, or the model's context when shorter)."""
        from ..core.evaluate import perplexity

        loaded = self.require_model()
        pruned = self.require_pruned()
        seqlen = min(512, loaded.info.context_length or 512)
        key = (seqlen, nwindows)
        if self.dense_model is not None and key not in self._dense_perplexity:
            self._dense_perplexity[key] = perplexity(self.dense_model, loaded.tokenizer, seqlen=seqlen, nwindows=nwindows)
        self.perplexity = {"pruned": perplexity(pruned, loaded.tokenizer, seqlen=seqlen, nwindows=nwindows)}
        if key in self._dense_perplexity:
            self.perplexity["dense"] = self._dense_perplexity[key]
        return self.perplexity

    def report(self) -> dict:
        from ..core.export import make_report

        loaded = self.require_model()
        if self.summary is None:
            raise UserError("Prune the model first (step 2).")
        ppl = {k: v.__dict__ for k, v in self.perplexity.items()} or None
        return make_report(loaded.info, self.summary, self.run.get("calibration"), dict(self.timings), ppl)

    def export(self, folder: str, overwrite: bool) -> Path:
        from ..core.export import export_model

        loaded = self.require_model()
        pruned = self.require_pruned()
        if not (folder or "").strip():
            raise UserError("Give a folder to export to.")
        return export_model(pruned, loaded.tokenizer, folder.strip(), self.report(), overwrite, source=loaded.path)
