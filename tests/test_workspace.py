"""The app's per-session state: dense copy kept when it fits, pruning in place (and saying so) when it does not."""

import copy

import pytest
import torch

from test_engine import checksum
from wanda_gui.app import workspace as workspace_module
from wanda_gui.app.workspace import Workspace
from wanda_gui.core import events as ev
from wanda_gui.core.engine import PruneConfig
from wanda_gui.core.errors import UserError


def run(ws, text_file, **config):
    return list(ws.prune(PruneConfig(**config), str(text_file), 4, 32, 0))


def test_pruning_works_on_a_copy_and_leaves_dense_untouched(tiny_model_dir, text_file):
    ws = Workspace()
    ws.load(str(tiny_model_dir), "cpu", None)
    before = checksum(ws.loaded.model)
    events = run(ws, text_file)
    assert isinstance(events[-1], ev.RunFinished)
    assert checksum(ws.loaded.model) == before and ws.dense_model is ws.loaded.model
    assert ws.pruned is not ws.loaded.model and (ws.pruned.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    assert len(ws.maps) == 14 and ws.report()["calibration"]["source"] == "file:calib.txt"


def test_without_room_for_a_copy_it_prunes_in_place_and_says_so(tiny_model_dir, text_file, monkeypatch):
    monkeypatch.setattr(workspace_module, "free_memory", lambda device: 0)
    ws = Workspace()
    ws.load(str(tiny_model_dir), "cpu", None)
    before = checksum(ws.loaded.model)

    stream = ws.prune(PruneConfig(), str(text_file), 4, 32, 0)
    for event in stream:
        if isinstance(event, ev.LinearPruned):
            ws.cancel.set()
    assert isinstance(event, ev.RunCancelled) and event.restored
    assert checksum(ws.loaded.model) == before and ws.pruned is None

    run(ws, text_file)
    assert ws.pruned is ws.loaded.model and not ws.dense_kept and ws.dense_model is None
    with pytest.raises(UserError, match="reload it"):
        run(ws, text_file)


def test_a_session_copy_starts_empty(tiny_model_dir):
    ws = Workspace()
    ws.load(str(tiny_model_dir), "cpu", None)
    fresh = copy.deepcopy(ws)
    assert fresh.loaded is None and ws.loaded is not None


def test_actions_before_their_step_are_explained():
    ws = Workspace()
    with pytest.raises(UserError, match="Load a model first"):
        list(ws.prune(PruneConfig(), "builtin", 4, 32, 0))
    with pytest.raises(UserError, match="Load a model first"):
        ws.export("/tmp/x", False)
