"""OWL: per-block sparsities from the blocks' outlier ratios, their size-weighted mean exactly the target."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tests.conftest import SMALL
from wanda_gui.core.engine import PruneConfig, prune, run_to_end
from wanda_gui.core.errors import UserError
from wanda_gui.core.events import LinearPruned, Progress, TargetsChosen
from wanda_gui.core.methods.owl import LAMBDA, outlier_ratio, owl_sparsities


def test_weighted_mean_is_the_target_and_every_block_stays_within_lambda():
    ratios, sizes = [1.0, 9.0, 3.0, 2.5, 7.0], [10, 40, 10, 25, 15]
    chosen = owl_sparsities(ratios, sizes, 0.6, 0.08)
    assert sum(s * w for s, w in zip(chosen, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-9)
    assert all(0.52 - 1e-12 <= s <= 0.68 + 1e-12 for s in chosen)
    assert chosen[1] == min(chosen) and chosen[0] == max(chosen)  # more outliers, fewer pruned


def test_equal_sizes_follow_the_reference_formula():
    ratios, target, lam = [2.0, 4.0, 3.0, 5.0], 0.5, 0.08
    r = torch.tensor(ratios, dtype=torch.float64)
    scaled = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)  # luuyin/OWL prune_wanda_outlier
    reference = 1 - (scaled - scaled.mean() + (1 - target))
    assert owl_sparsities(ratios, [7] * 4, target, lam) == pytest.approx(reference.tolist(), abs=1e-12)
    assert owl_sparsities([3.0] * 4, [7] * 4, target, lam) == [target] * 4


def test_outlier_ratio_pools_a_blocks_scores():
    scores = [torch.ones(10, 10), torch.ones(5, 4)]
    scores[1][0, 0] = 1000.0  # one score far above 5 x the pooled mean (~9.3)
    assert outlier_ratio(scores, 5.0) == pytest.approx(100 / 120)


def four_blocks(outlier_block: int):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**SMALL, "num_hidden_layers": 4})).eval()
    model.requires_grad_(False)
    with torch.no_grad():  # one input feature of every attention linear of that block becomes an outlier
        model.model.layers[outlier_block].input_layernorm.weight[3] = 200.0
    return model


def calibration():
    return torch.randint(0, 512, (6, 16), generator=torch.Generator().manual_seed(1))


def test_the_block_with_outliers_keeps_the_most_weights():
    model = four_blocks(3)  # the last block: an earlier one would also pass outliers down the residual stream
    events = list(prune(model, PruneConfig("wanda", 0.5, owl=True), calibration()))
    assert [(e.done, e.total) for e in events if isinstance(e, Progress)] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    chosen = next(e for e in events if isinstance(e, TargetsChosen))
    assert chosen.basis.index(max(chosen.basis)) == 3 and chosen.sparsities.index(min(chosen.sparsities)) == 3
    assert all(abs(s - 0.5) <= LAMBDA + 1e-9 for s in chosen.sparsities) and "OWL" in chosen.note
    pruned = [e for e in events if isinstance(e, LinearPruned)]
    for e in pruned:  # each row prunes int(C_in x its block's target)
        assert e.sparsity == int(e.shape[1] * chosen.sparsities[e.block]) / e.shape[1]
    sizes = [sum(e.shape[0] * e.shape[1] for e in pruned if e.block == b) for b in range(4)]
    assert sum(s * n for s, n in zip(chosen.sparsities, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-9)


def test_owl_leaves_the_runs_hidden_states_alone():
    """With OWL's targets fed back as plain per-block targets, the masks are the same: its pass touched nothing."""
    with_owl = four_blocks(1)
    events = list(prune(with_owl, PruneConfig("wanda", 0.5, owl=True), calibration()))
    targets = next(e for e in events if isinstance(e, TargetsChosen)).sparsities

    class Fixed:
        statistic = None

        def before_pruning(self, ctx):
            ctx.sparsities[:] = targets

        def before_stage(self, ctx, index): ...
        def after_masking(self, ctx, block): ...
        def after_stage(self, ctx, index): ...

    plain = four_blocks(1)
    run_to_end(prune(plain, PruneConfig("wanda", 0.5), calibration(), steps=(Fixed(),)))
    for a, b in zip(with_owl.parameters(), plain.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="wanda", pattern="2:4"), "unstructured pattern with OWL"),
    (dict(method="magnitude"), "calibration activations"),
])
def test_owl_refuses_what_it_cannot_do(kwargs, message):
    with pytest.raises(UserError, match=message):
        PruneConfig(owl=True, **kwargs)


def test_a_sweep_with_owl_applies_it_to_unstructured_runs_only():
    from wanda_gui.core.sweep import plan

    specs = plan(["wanda", "sparsegpt"], [0.5, 0.6], ["unstructured", "2:4"], owl=True)
    assert {(s.method, str(s.pattern), s.owl) for s in specs} == {
        ("wanda", "unstructured", True), ("sparsegpt", "unstructured", True),
        ("wanda", "2:4", False), ("sparsegpt", "2:4", False)}
    assert all(s.config().owl == s.owl for s in specs) and "wanda+owl|unstructured|0.5" in {s.key for s in specs}
    with pytest.raises(UserError, match="calibration activations"):
        plan(["magnitude"], [0.5], ["unstructured"], owl=True)
