"""The shape every method shares: the registry, and the hook points an option (OWL, DSnoT...) plugs into."""

import pytest
import torch

from conftest import tiny_model
from wanda_gui.core import events as ev
from wanda_gui.core.architecture import capture_block_inputs, find_blocks, weight_out_in
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.runs import drain
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
    drain(prune(tiny_model("llama"), PruneConfig(method="magnitude", restore_on_abort=False), None))
    assert True not in copies


def wanda_like_score(rows=256, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    norms = torch.rand(cols, generator=g) * 2
    norms[:5] *= 30  # a few outlier features
    return torch.randn(rows, cols, generator=g).abs() * norms


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_wanda_variant_hits_the_target_within_a_thousandth_with_one_alpha_for_all_rows(sparsity):
    from wanda_gui.core.masks import alpha_mask

    score = wanda_like_score()
    mask = alpha_mask(score, sparsity)
    assert abs(float(mask.float().mean()) - sparsity) <= 0.001
    counts = mask.sum(dim=1)
    assert counts.min() < counts.max()  # rows differ
    ordered = score.sort(dim=1).values
    assert torch.equal(mask, score <= ordered.gather(1, (counts - 1).unsqueeze(1)))  # each row's lowest scores
    share = ordered.cumsum(dim=1) / score.sum(dim=1, keepdim=True)
    pruned_share = share.gather(1, (counts - 1).unsqueeze(1))
    next_share = share.gather(1, counts.clamp(max=score.shape[1] - 1).unsqueeze(1))
    assert pruned_share.max() < next_share.min()  # one α separates pruned from kept in every row


def test_wanda_variant_runs_in_the_engine_and_is_refused_elsewhere():
    model = tiny_model("llama")
    summary = drain(prune(model, PruneConfig(wanda_variant=True), CALIB))
    rows = [(weight_out_in(m) == 0).sum(dim=1) for m in dict(model.named_modules()).values()
            if hasattr(m, "weight") and m.weight.dim() == 2 and m.weight.shape[1] == 64 and m.weight.shape[0] == 64]
    assert any(r.min() < r.max() for r in rows)
    assert summary.achieved_sparsity == pytest.approx(0.5, abs=0.005)
    for settings in (dict(method="sparsegpt"), dict(pattern="2:4")):
        with pytest.raises(UserError, match="α-variant"):
            PruneConfig(wanda_variant=True, **settings)


def test_ria_score_matches_its_formula_and_prunes_per_row():
    from wanda_gui.core.methods.ria import ria_score

    g = torch.Generator().manual_seed(2)
    W, x_sq = torch.randn(6, 10, generator=g), torch.rand(10, generator=g) * 4
    score = ria_score(W, x_sq)
    for i in range(6):
        for j in range(10):
            expected = (abs(W[i, j]) / W[i].abs().sum() + abs(W[i, j]) / W[:, j].abs().sum()) * x_sq[j].sqrt() ** 0.5
            assert score[i, j] == pytest.approx(float(expected), rel=1e-5)
    model = tiny_model("qwen2")
    drain(prune(model, PruneConfig(method="ria", pattern="2:4"), CALIB))
    w = weight_out_in(find_blocks(model)[1][0].mlp.down_proj)
    assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()
