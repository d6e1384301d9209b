"""The app's per-session state: dense models shared read-only between sessions, pruned copies that share every
untouched tensor, pruning in place (and saying so) when no copy fits, sessions capped and freed when they close."""

import gc
import threading
import weakref

import pytest

from test_engine import checksum
from wanda_gui.app.pool import ModelPool
from wanda_gui.app.sessions import Sessions
from wanda_gui.app.workspace import Workspace
from wanda_gui.core import events as ev
from wanda_gui.core.copies import shared_bytes, tensor_bytes
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.errors import UserError


def run(ws, text_file, **config):
    return list(ws.prune(PruneConfig(**config), str(text_file), 4, 32, 0))


def test_pruning_works_on_a_copy_that_shares_every_untouched_tensor(tiny_model_dir, text_file):
    ws = Workspace(ModelPool())
    ws.load(str(tiny_model_dir), "cpu", None)
    dense = ws.loaded.model
    before = checksum(dense)
    events = run(ws, text_file, exclude=("*.o_proj",))
    assert isinstance(events[-1], ev.RunFinished)
    assert checksum(dense) == before and ws.dense_model is dense
    pruned = ws.pruned
    assert pruned is not dense and (pruned.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    # Shared: embeddings, norms, the LM head, and the linears that were not pruned. Not shared: the pruned linears.
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight",
                 "model.layers.0.self_attn.o_proj.weight"):
        assert pruned.get_parameter(name).data_ptr() == dense.get_parameter(name).data_ptr(), name
    assert pruned.lm_head.weight.data_ptr() == dense.lm_head.weight.data_ptr()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert pruned.get_parameter(name).data_ptr() != dense.get_parameter(name).data_ptr(), name
    pruned_bytes = sum(4 * m.weight.numel() for b in pruned.model.layers for n, m in b.named_modules()
                       if n.endswith("_proj") and not n.endswith("o_proj"))
    assert tensor_bytes(pruned) - shared_bytes(pruned, dense) == pruned_bytes
    assert len(ws.maps) == 12 and ws.report()["calibration"]["source"] == "file:calib.txt"


def test_without_room_for_a_copy_it_prunes_in_place_and_says_so(tiny_model_dir, text_file, monkeypatch):
    monkeypatch.setattr(Workspace, "copy_fits", lambda self, config: False)
    ws = Workspace(ModelPool())
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


def test_a_shared_dense_model_is_never_pruned_in_place(tiny_model_dir, text_file, monkeypatch):
    monkeypatch.setattr(Workspace, "copy_fits", lambda self, config: False)
    pool = ModelPool()
    a, b = Workspace(pool), Workspace(pool)
    a.load(str(tiny_model_dir), "cpu", None)
    b.load(str(tiny_model_dir), "cpu", None)
    before = checksum(a.loaded.model)
    with pytest.raises(UserError, match="shared with other sessions"):
        run(a, text_file)
    assert checksum(b.loaded.model) == before and a.pruned is None


def test_sessions_share_one_dense_model_and_free_it_when_the_last_closes(tiny_model_dir, text_file):
    pool = ModelPool(max_sessions=2)
    a, b, c = Workspace(pool), Workspace(pool), Workspace(pool)
    a.load(str(tiny_model_dir), "cpu", None)
    b.load(str(tiny_model_dir), "cpu", None)
    assert a.loaded is b.loaded and pool.holders(a.loaded) == 2
    with pytest.raises(UserError, match="busy.*2 sessions"):
        c.load(str(tiny_model_dir), "cpu", None)
    assert c.loaded is None
    # The same folder in another dtype is another model.
    b.load(str(tiny_model_dir), "cpu", "bf16")
    assert b.loaded is not a.loaded and pool.holders(a.loaded) == 1

    run(a, text_file)
    dense, pruned = weakref.ref(a.loaded.model), weakref.ref(a.pruned)
    a.close()
    b.close()
    gc.collect()
    assert dense() is None and pruned() is None and pool.sessions_holding() == 0
    c.load(str(tiny_model_dir), "cpu", None)  # room again
    assert c.loaded is not None


def test_two_sessions_loading_at_once_load_the_model_once(tiny_model_dir, monkeypatch):
    from wanda_gui.core import models

    calls = []
    real = models.load_model

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", counted)
    pool = ModelPool()
    workspaces = [Workspace(pool) for _ in range(3)]
    threads = [threading.Thread(target=ws.load, args=(str(tiny_model_dir), "cpu", None)) for ws in workspaces]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(ws.loaded) for ws in workspaces}) == 1


def test_a_closed_session_is_gone_from_the_table_and_an_idle_one_is_reaped(tiny_model_dir):
    pool = ModelPool()
    sessions = Sessions(pool, idle_seconds=0)
    ws = sessions.get("tab-1")
    ws.load(str(tiny_model_dir), "cpu", None)
    assert sessions.get("tab-1") is ws and pool.sessions_holding() == 1
    sessions.close_idle()
    assert len(sessions) == 0 and pool.sessions_holding() == 0 and ws.loaded is None
    with pytest.raises(UserError, match="session was closed"):
        ws.require_model()


def test_one_activity_at_a_time_per_session(tiny_model_dir, text_file):
    ws = Workspace(ModelPool())
    ws.load(str(tiny_model_dir), "cpu", None)
    stream = ws.prune(PruneConfig(), str(text_file), 4, 32, 0)
    next(stream)  # the run has started
    with pytest.raises(UserError, match="is pruning"):
        ws.load(str(tiny_model_dir), "cpu", None)
    stream.close()
    assert not ws.busy


def test_actions_before_their_step_are_explained():
    ws = Workspace(ModelPool())
    with pytest.raises(UserError, match="Load a model first"):
        list(ws.prune(PruneConfig(), "builtin", 4, 32, 0))
    with pytest.raises(UserError, match="Load a model first"):
        ws.export("/tmp/x", False, "--overwrite")
