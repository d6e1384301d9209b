"""The shape every method shares: the registry, and the hook points an option (OWL, DSnoT...) plugs into."""

import pytest
import torch

from conftest import tiny_model
from wanda_gui.core import events as ev
from wanda_gui.core.architecture import capture_block_inputs, find_blocks, weight_out_in
from wanda_gui.core.engine import PruneConfig, prune, run_to_end
from wanda_gui.core.errors import UserError
from wanda_gui.core.methods import METHODS, Step, get_method

CALIB = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(1))


def test_registry_names_every_method_and_refuses_unknown_ones():
    assert {"wanda", "magnitude", "sparsegpt"} <= set(METHODS)
    assert all(get_method(name.upper()) is m and m.description for name, m in METHODS.items())
    with pytest.raises(UserError, match="Unknown method 'obs': use one of wanda"):
        get_method("obs")


class Recorder(Step):
    """Sets block 1's target before pruning; records what each after_masking sees."""

    def __init__(self):
        self.seen = []

    def before_pruning(self, ctx):
        self.first_inputs = ctx.hidden.clone()
        ctx.sparsities[1] = 0.25

    def after_masking(self, ctx, block):
        self.seen.append((block.index, {n: weight_out_in(m).clone() for n, m in block.linears.items()},
                          dict(block.masks), dict(block.dense_weights), ctx.hidden.clone()))


def test_hooks_see_the_dense_model_then_each_masked_block_and_can_set_block_targets():
    model, dense = tiny_model("llama"), tiny_model("llama")
    recorder = Recorder()
    events = list(prune(model, PruneConfig(restore_on_abort=False), CALIB, steps=(recorder,)))
    assert isinstance(events[-1], ev.RunFinished)
    _, blocks = find_blocks(dense)
    hidden, _ = capture_block_inputs(dense, blocks, CALIB, 6, torch.device("cpu"))
    assert torch.equal(recorder.first_inputs, hidden)
    assert [s[0] for s in recorder.seen] == [0, 1]
    assert torch.equal(recorder.seen[0][4], hidden)  # block 0's inputs: pass 2 has not run yet
    dense_linears = dict(dense.named_modules())
    for index, weights, masks, dense_weights, _ in recorder.seen:
        for name, w in weights.items():
            assert torch.equal(w == 0, masks[name])
            assert torch.equal(dense_weights[name], dense_linears[name].weight)  # kept for hooks, restore off
            assert (masks[name].sum(dim=1) == int(w.shape[1] * (0.25 if index == 1 else 0.5))).all()
    by_block = {e.index: e.sparsity for e in events if isinstance(e, ev.BlockFinished)}
    assert by_block[0] == pytest.approx(0.5, abs=1e-6) and by_block[1] == pytest.approx(0.25, abs=0.01)


def test_without_hooks_or_restore_no_dense_copy_is_kept(monkeypatch):
    copies = []
    real = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(k.get("copy")) or real(self, *a, **k))
    run_to_end(prune(tiny_model("llama"), PruneConfig(method="magnitude", restore_on_abort=False), None))
    assert True not in copies
