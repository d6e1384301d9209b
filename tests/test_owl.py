"""OWL: per-block sparsities from the blocks' outlier ratios, their size-weighted mean exactly the target."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers as tf

from tests.conftest import SMALL
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.runs import drain
from wanda_gui.core.errors import UserError
from wanda_gui.core.events import LinearPruned, Progress, RunCancelled, RunFailed, TargetsChosen
from wanda_gui.core.methods.base import Step
from wanda_gui.core.methods.owl import LAMBDA, OWL, outlier_ratio, owl_sparsities


def test_weighted_mean_is_the_target_and_every_block_stays_within_lambda():
    ratios, sizes = [1.0, 9.0, 3.0, 2.5, 7.0], [10, 40, 10, 25, 15]
    chosen = owl_sparsities(ratios, sizes, 0.6, 0.08)
    assert sum(s * w for s, w in zip(chosen, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-9)
    assert all(0.52 - 1e-12 <= s <= 0.68 + 1e-12 for s in chosen)
    assert chosen[1] == min(chosen) and chosen[0] == max(chosen)  # more outliers, fewer pruned


def test_random_allocations_keep_the_mean_and_the_range():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        blocks = int(torch.randint(2, 40, (1,), generator=generator))
        ratios = (torch.rand(blocks, generator=generator) ** 4 * 10).tolist()  # skewed, as real ratios are
        sizes = torch.randint(1, 10_000, (blocks,), generator=generator).tolist()
        target, lam = float(torch.rand(1, generator=generator)) * 0.95, float(torch.rand(1, generator=generator)) * 0.2
        chosen = owl_sparsities(ratios, sizes, target, lam)
        assert sum(s * n for s, n in zip(chosen, sizes)) / sum(sizes) == pytest.approx(target, abs=1e-9)
        assert all(max(0.0, target - lam) - 1e-12 <= s <= target + lam + 1e-12 and s < 1 for s in chosen)
        order = sorted(range(blocks), key=ratios.__getitem__)
        assert all(chosen[a] >= chosen[b] for a, b in zip(order, order[1:]))  # more outliers, never more pruned


def test_equal_sizes_follow_the_reference_formula():
    ratios, target, lam = [2.0, 4.0, 3.0, 5.0], 0.5, 0.08
    r = torch.tensor(ratios, dtype=torch.float64)
    scaled = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)  # luuyin/OWL prune_wanda_outlier
    reference = 1 - (scaled - scaled.mean() + (1 - target))
    assert owl_sparsities(ratios, [7] * 4, target, lam) == pytest.approx(reference.tolist(), abs=1e-12)
    assert owl_sparsities([3.0] * 4, [7] * 4, target, lam) == [target] * 4


def test_skewed_ratios_are_held_within_lambda_where_the_reference_would_leave_it():
    """The reference puts a lone outlier-heavy block 1.5 lambda below the target; the paper's range is +-lambda."""
    ratios, target, lam = [1.0, 1.0, 1.0, 10.0], 0.5, 0.08
    r = torch.tensor(ratios, dtype=torch.float64)
    scaled = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    assert float(1 - (scaled - scaled.mean() + (1 - target))[3]) == pytest.approx(target - 1.5 * lam)
    chosen = owl_sparsities(ratios, [1, 1, 1, 1], target, lam)
    assert chosen[3] == pytest.approx(target - lam, abs=1e-12)
    assert chosen[:3] == pytest.approx([target + lam / 3] * 3, abs=1e-12) and sum(chosen) / 4 == pytest.approx(target)


def test_targets_near_zero_stay_non_negative():
    chosen = owl_sparsities([5.0, 1.0, 2.0], [3, 1, 2], 0.05, 0.08)
    assert min(chosen) >= 0 and (3 * chosen[0] + chosen[1] + 2 * chosen[2]) / 6 == pytest.approx(0.05, abs=1e-9)


def test_outlier_ratio_pools_a_blocks_scores_against_one_mean():
    """Per-linear means would find no outlier in the first linear; the pooled mean (~9.3 x 5) finds only the big one."""
    weights = [torch.ones(10, 10), torch.ones(5, 4)]
    weights[1][0, 0] = 1000.0
    weights[0][0, :3] = 30.0  # above 5 x its own linear's mean (1.87) but not above 5 x the pooled mean
    stats = [torch.ones(10), torch.full((4,), 4.0)]  # input RMS 1 and 2: the second linear's scores double
    mean = (97 + 90 + 2 * (19 + 1000)) / 120
    assert 2000 > 5 * mean > 30
    assert outlier_ratio(weights, stats, 5.0) == pytest.approx(100 / 120)


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
    events = list(prune(model, PruneConfig("wanda", 0.5, options=("owl",)), calibration()))
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
    events = list(prune(with_owl, PruneConfig("wanda", 0.5, options=("owl",)), calibration()))
    targets = next(e for e in events if isinstance(e, TargetsChosen)).sparsities

    class Fixed:
        statistic = None

        def before_pruning(self, ctx):
            ctx.sparsities[:] = targets

        def before_stage(self, ctx, index): ...
        def after_masking(self, ctx, block): ...
        def after_stage(self, ctx, index): ...

    plain = four_blocks(1)
    drain(prune(plain, PruneConfig("wanda", 0.5), calibration(), steps=(Fixed(),)))
    for a, b in zip(with_owl.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_owl_reads_a_copy_of_the_calibration_inputs():
    """The run's hidden states after OWL's pass (which runs every block on its copy) are the captured ones."""
    seen = []

    class Snapshot(Step):
        def before_pruning(self, ctx):
            seen.append(ctx.hidden.clone())

    model = four_blocks(0)
    drain(prune(model, PruneConfig("wanda", 0.5), calibration(), steps=(Snapshot(), OWL(), Snapshot())))
    assert torch.equal(seen[0], seen[1])


def test_the_lm_head_keeps_the_runs_target():
    model = four_blocks(3)
    events = list(prune(model, PruneConfig("wanda", 0.6, options=("owl",), prune_head=True), calibration()))
    chosen = next(e for e in events if isinstance(e, TargetsChosen))
    assert len(chosen.sparsities) == 5 and chosen.sparsities[4] == 0.6 and chosen.basis[4] == 0.0
    assert chosen.sparsities.index(min(chosen.sparsities[:4])) == 3
    assert sum(chosen.sparsities[:4]) / 4 == pytest.approx(0.6, abs=1e-9)  # equal blocks: the plain mean


def test_a_block_with_nothing_to_prune_is_left_out_of_the_allocation():
    model = four_blocks(2)
    events = list(prune(model, PruneConfig("wanda", 0.5, options=("owl",), exclude=("model.layers.0.*",)), calibration()))
    chosen = next(e for e in events if isinstance(e, TargetsChosen))
    assert chosen.sparsities[0] == 0.5 and chosen.basis[0] == 0.0
    assert sum(chosen.sparsities[1:]) / 3 == pytest.approx(0.5, abs=1e-9) and len(set(chosen.sparsities[1:])) == 3
    assert [e.done for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]


def test_stopping_during_owls_pass_restores_the_model():
    model = four_blocks(1)
    dense = [p.clone() for p in model.parameters()]
    cancel = threading.Event()
    events = []
    for event in prune(model, PruneConfig("wanda", 0.5, options=("owl",)), calibration(), cancel=cancel):
        events.append(event)
        if isinstance(event, Progress):
            cancel.set()
    assert isinstance(events[-1], RunCancelled)
    assert [e.done for e in events if isinstance(e, Progress)] == [1]
    assert not any(isinstance(e, TargetsChosen) for e in events)
    assert all(torch.equal(a, b) for a, b in zip(dense, model.parameters()))


def test_owl_as_a_step_on_a_method_without_calibration_fails_clearly():
    events = list(prune(four_blocks(0), PruneConfig("magnitude", 0.5), steps=(OWL(),)))
    assert isinstance(events[-1], RunFailed) and "calibration activations" in events[-1].reason


@pytest.mark.parametrize("kwargs", [dict(lam=-0.1), dict(lam=1.0), dict(m=0.0)])
def test_owl_refuses_settings_out_of_range(kwargs):
    with pytest.raises(UserError, match="OWL's"):
        OWL(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="wanda", pattern="2:4"), "unstructured pattern with OWL"),
    (dict(method="magnitude"), "calibration activations"),
])
def test_owl_refuses_what_it_cannot_do(kwargs, message):
    with pytest.raises(UserError, match=message):
        PruneConfig(options=("owl",), **kwargs)


def test_a_sweep_with_owl_applies_it_to_unstructured_runs_only():
    from wanda_gui.core.sweep import sweep_runs

    specs = sweep_runs(["wanda", "sparsegpt"], [0.5, 0.6], ["unstructured", "2:4"], ("owl",))
    assert {(s.method, str(s.pattern), s.options) for s in specs} == {
        ("wanda", "unstructured", ("owl",)), ("sparsegpt", "unstructured", ("owl",)),
        ("wanda", "2:4", ()), ("sparsegpt", "2:4", ())}
    assert all(s.config().options == s.options for s in specs) and "wanda+owl|unstructured|0.5" in {s.key for s in specs}
    with pytest.raises(UserError, match="calibration activations"):
        sweep_runs(["magnitude"], [0.5], ["unstructured"], ("owl",))
