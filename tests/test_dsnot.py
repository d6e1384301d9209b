"""DSnoT: swaps that keep every row's (or N:M group's) count and never raise a row's expected error."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.conftest import tiny_model
from wanda_gui.core.architecture import find_blocks, find_linears, weight_out_in
from wanda_gui.core.engine import PruneConfig, prune, run_to_end
from wanda_gui.core.errors import UserError
from wanda_gui.core.events import RunCancelled
from wanda_gui.core.masks import Pattern, select
from wanda_gui.core.methods import DSnoT, Step
from wanda_gui.core.methods.dsnot import MeanVariance, dsnot, row_errors


def planted(rows=16, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, cols, generator=g) + torch.linspace(-1, 2, cols)  # inputs with non-zero means
    stat = MeanVariance(cols, torch.device("cpu"))
    stat.add(x[:2])
    stat.add(x[2:])
    return torch.randn(rows, cols, generator=g), stat.result(), x


def test_statistics_follow_the_reference_definitions():
    _, stats, x = planted()
    torch.testing.assert_close(stats["xsum"], x.sum(1).mean(0))  # summed over a sample's tokens, mean over samples
    torch.testing.assert_close(stats["sq_mean"], (x ** 2).mean((0, 1)))
    torch.testing.assert_close(stats["var"], x.var(1, unbiased=False).mean(0))  # within each sample


@pytest.mark.parametrize("sparsity,pattern", [(0.5, Pattern()), (0.73, Pattern()), (0.5, Pattern(2, 4)),
                                              (0.5, Pattern(4, 8))])
def test_counts_are_kept_and_no_rows_error_grows(sparsity, pattern):
    dense, stats, _ = planted()
    score = dense.abs() * stats["sq_mean"].sqrt()
    mask = select(score, sparsity, pattern)
    weight = dense.masked_fill(mask, 0)
    before = row_errors(dense, weight, stats["xsum"]).abs()
    new = dsnot(weight, dense, mask, stats, pattern.m, threshold=0.0)
    assert torch.equal(new.sum(1), mask.sum(1)) and not torch.equal(new, mask)
    if pattern.structured:
        assert torch.equal(new.view(16, -1, pattern.m).sum(2), mask.view(16, -1, pattern.m).sum(2))
    assert torch.equal(weight == 0, new) and torch.equal(weight[~new], dense[~new])  # regrown = dense values
    after = row_errors(dense, weight, stats["xsum"]).abs()
    assert (after <= before + 1e-5).all() and (after < before - 1e-3).sum() >= 3


def test_one_swap_by_hand():
    """One row, e = 3 from the pruned (w=3, x=1): regrow it and prune the kept weight with a negative effect."""
    dense = torch.tensor([[3.0, -0.5, 1.0, 2.0]])
    mask = torch.tensor([[True, False, True, False]])
    stats = {"xsum": torch.tensor([1.0, 2.0, 0.0, 1.0]), "var": torch.ones(4), "sq_mean": torch.ones(4)}
    weight = dense.masked_fill(mask, 0)
    new = dsnot(weight, dense, mask, stats, cycles=1)
    # regrow 0 (largest w*x/var among pruned: 3 vs 0); prune 1 (w*x = -1 < 0): e goes 3 -> 3 - 3 + (-1) = -1: the
    # sign flips, so the swap is refused; with a smaller regrowth it would pass
    assert torch.equal(new, mask)
    stats["xsum"][1] = -1.0  # now pruning 1 adds 0.5 (positive): the reference then prunes a negative one: none
    new = dsnot(dense.masked_fill(mask, 0), dense, mask, stats, cycles=1)
    assert torch.equal(new, mask)
    dense2 = torch.tensor([[3.0, -2.5, 1.0, 2.0]])
    stats2 = {"xsum": torch.tensor([1.0, 1.0, 0.0, 1.0]), "var": torch.ones(4), "sq_mean": torch.ones(4)}
    w2 = dense2.masked_fill(mask, 0)
    new = dsnot(w2, dense2, mask, stats2, cycles=1)  # e = 3; regrow 0 (-3), prune 1 (-2.5): e = -2.5: flips
    assert torch.equal(new, mask)
    stats2["xsum"][0] = 2.0  # e = 6: regrow 0 (-6) and prune 1 (-2.5): -2.5, flips again; threshold stops nothing
    dense3 = torch.tensor([[3.0, -1.0, 0.5, 2.0, 0.2, -0.2]])
    mask3 = torch.tensor([[True, False, True, False, True, False]])
    stats3 = {"xsum": torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), "var": torch.ones(6), "sq_mean": torch.ones(6)}
    w3 = dense3.masked_fill(mask3, 0)  # e = 3 + 0.5 + 0.2 = 3.7 > 0: regrow 0 (3.0), prune the negative kept
    new = dsnot(w3, dense3, mask3, stats3, cycles=1)  # with the lowest Wanda score (-0.2 at 5): e = 3.7-3-0.2 = 0.5
    assert new.tolist() == [[False, False, True, False, True, True]]
    assert w3.tolist() == [[3.0, -1.0, 0.0, 2.0, 0.0, 0.0]]


@pytest.mark.parametrize("arch,method,pattern", [("llama", "wanda", "unstructured"), ("llama", "sparsegpt", "2:4"),
                                                 ("gpt2", "wanda", "unstructured"), ("opt", "wanda", "4:8")])
def test_after_any_mask_on_real_blocks(arch, method, pattern):
    model = tiny_model(arch)
    masks = {}

    class Masks(Step):
        def after_masking(self, ctx, block):
            masks.update({n: m.clone() for n, m in block.masks.items()})

    calib = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(3))
    summary = run_to_end(prune(model, PruneConfig(method, 0.5, pattern, dsnot=True), calib, steps=(Masks(),)))
    assert summary.achieved_sparsity == pytest.approx(0.5) and summary.settings["dsnot"]
    assert len(masks) == sum(len(find_linears(b)) for b in find_blocks(model)[1])
    for name, linear in zip(masks, [m for n, m in model.named_modules() if n in masks]):
        weight = weight_out_in(linear)
        assert torch.equal(weight == 0, masks[name])
        assert torch.equal(masks[name].sum(1), torch.full((weight.shape[0],), weight.shape[1] // 2))


def test_dsnot_changes_wandas_masks_on_a_real_block():
    plain, swapped = tiny_model("llama"), tiny_model("llama")
    calib = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(3))
    run_to_end(prune(plain, PruneConfig("wanda", 0.5), calib))
    run_to_end(prune(swapped, PruneConfig("wanda", 0.5), calib, steps=(DSnoT(threshold=0.0),)))  # tiny weights:
    # their expected errors sit below the reference's threshold of 0.1
    q = [weight_out_in(m.model.layers[0].mlp.down_proj) == 0 for m in (plain, swapped)]
    assert not torch.equal(*q)


def test_refused_without_calibration_and_cancel_honoured():
    with pytest.raises(UserError, match="DSnoT"):
        PruneConfig("magnitude", 0.5, dsnot=True)
    model = tiny_model("llama")
    dense = [p.detach().clone() for p in model.parameters()]
    cancel = threading.Event()

    class Stop(Step):
        def after_masking(self, ctx, block):
            cancel.set()

    calib = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(3))
    events = list(prune(model, PruneConfig("wanda", 0.5), calib, cancel=cancel, steps=(Stop(), DSnoT())))
    assert isinstance(events[-1], RunCancelled)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), dense))
