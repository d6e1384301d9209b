"""DSnoT: swaps that keep every row's (or N:M group's) count, never raise a row's expected error, regrow the weights
as they were before pruning, and follow the reference's criteria."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from tests.conftest import tiny_model
from wanda_gui.core.architecture import weight_out_in
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.runs import drain
from wanda_gui.core.errors import UserError
from wanda_gui.core.events import RunFailed
from wanda_gui.core.masks import Pattern, Selection, select
from wanda_gui.core.methods import BlockMasked, Step
from wanda_gui.core.methods.dsnot import DSnoT
from wanda_gui.core.methods.dsnot import MeanVariance, Moments, dsnot, row_errors
from wanda_gui.core.passes import Cancelled


def planted(rows=16, cols=64, seed=0):
    """A layer and its inputs' moments, the features' means spread from -1 to 2 so rows have sizeable errors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, cols, generator=g) * torch.linspace(0.2, 2, cols) + torch.linspace(-1, 2, cols)
    stat = MeanVariance(cols, torch.device("cpu"))
    stat.add(x[:3])
    stat.add(x[3:])
    return torch.randn(rows, cols, generator=g), stat.result(), x


def wanda_mask(dense, moments, sparsity, pattern):
    return select(dense.abs() * moments.sq_mean.sqrt(), Selection(sparsity, pattern))


def test_statistics_follow_the_reference_definitions():
    """The reference's sum_metric_row, scaler_row and var (one sample per batch), however the batches fall."""
    _, moments, x = planted()
    torch.testing.assert_close(moments.xsum, x.sum(1).mean(0))
    torch.testing.assert_close(moments.sq_mean, (x ** 2).mean((0, 1)))
    torch.testing.assert_close(moments.var, x.var(1, unbiased=False).mean(0))
    flat = MeanVariance(64, torch.device("cpu"))
    flat.add(x[0])  # a 2-D input is one sample
    torch.testing.assert_close(flat.result().var, x[0].var(0, unbiased=False))


@pytest.mark.parametrize("sparsity,pattern", [(0.5, Pattern()), (0.73, Pattern()), (0.2, Pattern()),
                                              (0.5, Pattern(2, 4)), (0.5, Pattern(4, 8))])
def test_counts_kept_and_no_rows_error_grows(sparsity, pattern):
    dense, moments, _ = planted()
    mask = wanda_mask(dense, moments, sparsity, pattern)
    weight = dense.masked_fill(mask, 0)
    before = row_errors(dense, weight, moments.xsum).abs()
    new = dsnot(weight, dense, mask, moments, pattern.m, threshold=0.0)
    assert (new != mask).sum() >= 16  # it did swap
    assert torch.equal(new.sum(1), mask.sum(1))
    if pattern.nm:
        assert torch.equal(new.view(16, -1, pattern.m).sum(2), mask.view(16, -1, pattern.m).sum(2))
    assert torch.equal(weight == 0, new) and torch.equal(weight[~new], dense[~new])  # regrown: the dense values
    after = row_errors(dense, weight, moments.xsum).abs()
    assert (after <= before).all() and (after < before).sum() >= 10 and after.mean() < 0.5 * before.mean()


def test_rows_with_different_counts_keep_theirs():
    """Masks whose rows differ (Wanda's α-variant, a layer-wide threshold) keep each row's own count."""
    dense, moments, _ = planted()
    mask = torch.rand(dense.shape, generator=torch.Generator().manual_seed(1)) < torch.linspace(0.2, 0.8, 16)[:, None]
    new = dsnot(dense.masked_fill(mask, 0), dense, mask, moments, threshold=0.0)
    assert not torch.equal(new, mask) and torch.equal(new.sum(1), mask.sum(1))


def one_row(dense, pruned, xsum, var, sq_mean):
    moments = Moments(torch.tensor(xsum), torch.tensor(sq_mean), torch.tensor(var))
    dense = torch.tensor([dense])
    mask = torch.tensor([[j in pruned for j in range(dense.shape[1])]])
    return dense, mask, moments


def test_unstructured_swaps_by_hand():
    """Pruned 0,1,2,7 with effects W*xsum = 5, 4, -1, 0.5: e = 8.5. Regrow by effect / var: 1 (4/1) before 0 (5/4).
    Prune the kept weight of lowest Wanda score among those of negative effect: 5 (-1, score 1*2) rather than 3
    (-3, score 3) or 4 (score 0.5 but positive effect). e = 8.5 - 4 - 1 = 3.5. Next, regrowing 0 and pruning 3 gives
    3.5 - 5 - 3 = -4.5, larger: passed over (the reference would take it); then 7 with 3: 3.5 - 0.5 - 3 = 0."""
    dense, mask, moments = one_row([5.0, 2.0, 1.0, -3.0, 0.5, -1.0, 2.0, 1.0], {0, 1, 2, 7},
                                   xsum=[1.0, 2.0, -1.0, 1.0, 1.0, 1.0, 1.0, 0.5], var=[4.0] + [1.0] * 7,
                                   sq_mean=[1.0, 1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0])
    assert row_errors(dense, dense.masked_fill(mask, 0), moments.xsum).item() == 8.5
    expected = {1: ([0, 2, 5, 7], 3.5), 2: ([0, 2, 5, 7], 3.5), 3: ([0, 2, 3, 5], 0.0), 50: ([0, 2, 3, 5], 0.0)}
    for cycles, (pruned, error) in expected.items():
        weight = dense.masked_fill(mask, 0)
        new = dsnot(weight, dense, mask, moments, max_cycles=cycles)
        assert new[0].nonzero().flatten().tolist() == pruned
        assert row_errors(dense, weight, moments.xsum).item() == error
        assert torch.equal(weight, dense.masked_fill(new, 0))


def test_n_m_swaps_by_hand():
    """2:4, pruned 0,3 | 4,7 with effects 3, 0.5 | 1, -1: e = 3.5. Regrow 0 and prune its group's weakest kept
    weight, 1 (score 1; its effect +1 counts not): e = 1.5. Regrowing 4 with its group's weakest, 6, leaves 1.5:
    passed over (the reference would swap). Regrowing 3 with 2 (1 is pruned, 0 regrown) flips e to -1: the row stops
    (the reference's sign constraint), though candidates remain."""
    dense, mask, moments = one_row([3.0, 1.0, -2.0, 0.5, 1.0, 2.0, 1.0, -1.0], {0, 3, 4, 7},
                                   xsum=[1.0] * 8, var=[1.0] * 8, sq_mean=[1.0] * 8)
    for cycles in (1, 2, 3, 50):
        weight = dense.masked_fill(mask, 0)
        new = dsnot(weight, dense, mask, moments, m=4, max_cycles=cycles)
        assert new[0].nonzero().flatten().tolist() == [1, 3, 4, 7]
        assert row_errors(dense, weight, moments.xsum).item() == 1.5


def test_threshold_leaves_small_errors_alone():
    dense, moments, _ = planted()
    mask = wanda_mask(dense, moments, 0.5, Pattern())
    errors = row_errors(dense, dense.masked_fill(mask, 0), moments.xsum).abs()
    threshold = errors.median().item()
    new = dsnot(dense.masked_fill(mask, 0), dense, mask, moments, threshold=threshold)
    changed = (new != mask).any(1)
    assert not changed[errors <= threshold].any() and changed[errors > threshold].all()


class Record(Step):
    """Keeps, per linear of every stage, what the hooks after it start from."""

    def __init__(self):
        self.masks, self.weights, self.moments = {}, {}, {}

    def after_masking(self, ctx, block):
        for name, linear in block.linears.items():
            self.masks[name] = block.masks[name].clone()
            self.weights[name] = weight_out_in(linear).detach().clone()
            self.moments[name] = block.statistics[MeanVariance][name]


@pytest.mark.parametrize("arch,method,pattern", [("llama", "wanda", "unstructured"), ("llama", "sparsegpt", "2:4"),
                                                 ("gpt2", "sparsegpt", "unstructured"), ("gpt2", "wanda", "4:8"),
                                                 ("opt", "wanda", "unstructured"), ("opt", "sparsegpt", "4:8")])
def test_after_wanda_and_sparsegpt_on_real_blocks(arch, method, pattern):
    """Counts kept, no row's error raised, and every regrown weight back at its value before the method pruned it
    (for SparseGPT: not an updated one), the weights both kept keep SparseGPT's update; GPT-2's transposed
    Conv1D included. Tiny models' errors sit below the reference's threshold of 0.1: none here."""
    model, untouched = tiny_model(arch), tiny_model(arch)
    modules = dict(untouched.named_modules())
    before, after = Record(), Record()
    calib = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(3))
    config = PruneConfig(method, 0.5, pattern)
    drain(prune(model, config, calib, steps=(before, DSnoT(threshold=0.0), after)))
    swapped = 0
    dense = {name: weight_out_in(modules[name]) for name in after.masks}
    for name, mask in after.masks.items():
        old, weight = before.masks[name], weight_out_in(dict(model.named_modules())[name])
        assert torch.equal(weight == 0, mask) and torch.equal(after.weights[name], weight)
        assert torch.equal(mask.sum(1), old.sum(1))
        if config.pattern.nm:
            m = config.pattern.m
            assert (mask.view(mask.shape[0], -1, m).sum(2) == m - config.pattern.n).all()
        regrown, kept = old & ~mask, ~old & ~mask
        assert torch.equal(weight[regrown], dense[name][regrown])
        assert torch.equal(weight[kept], before.weights[name][kept])
        xsum = before.moments[name].xsum
        assert (row_errors(dense[name], weight, xsum).abs()
                <= row_errors(dense[name], before.weights[name], xsum).abs() + 1e-6).all()
        swapped += int(regrown.sum())
    assert swapped > 20
    if method == "sparsegpt":  # its update is there to keep, and differs from the dense weights
        name = next(iter(after.masks))
        kept = ~before.masks[name] & ~after.masks[name]
        assert not torch.equal(before.weights[name][kept], dense[name][kept])


def test_the_option_runs_with_its_defaults():
    """PruneConfig.dsnot runs DSnoT() after the method: its masks are the ones left in the model."""
    model, after = tiny_model("llama"), Record()
    calib = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(3))
    summary = drain(prune(model, PruneConfig("wanda", 0.5, options=("dsnot",)), calib, steps=(after,)))
    assert summary.settings["options"] == ("dsnot",) and summary.achieved_sparsity == pytest.approx(0.5)
    for name, mask in after.masks.items():
        assert torch.equal(weight_out_in(dict(model.named_modules())[name]) == 0, mask)


def test_refused_without_calibration():
    with pytest.raises(UserError, match="DSnoT"):
        PruneConfig("magnitude", 0.5, options=("dsnot",))
    events = list(prune(tiny_model("llama"), PruneConfig("magnitude", 0.5), steps=(DSnoT(),)))
    assert isinstance(events[-1], RunFailed) and "DSnoT" in events[-1].reason
    with pytest.raises(UserError, match="cycles"):
        DSnoT(max_cycles=-1)


class CancelAfter:
    """A stop flag that reads as set from its (n+1)-th look on."""

    def __init__(self, n):
        self.looks, self.n = 0, n

    def is_set(self):
        self.looks += 1
        return self.looks > self.n


def test_cancel_is_honoured_between_linears():
    dense, moments, _ = planted()
    linears = {}
    for name in ("first", "second"):
        linears[name] = nn.Linear(64, 16, bias=False)
        linears[name].weight.data = dense.clone()
    mask = wanda_mask(dense, moments, 0.5, Pattern())
    for linear in linears.values():
        linear.weight.data.masked_fill_(mask, 0)
    block = BlockMasked(0, linears, {n: mask for n in linears}, {n: dense for n in linears},
                        {MeanVariance: {n: moments for n in linears}})
    ctx = types.SimpleNamespace(cancel=CancelAfter(1), pattern=Pattern())
    with pytest.raises(Cancelled):
        DSnoT(threshold=0.0).after_masking(ctx, block)
    assert not torch.equal(linears["first"].weight == 0, mask)  # the first was done
    assert torch.equal(linears["second"].weight == 0, mask)  # the second never started
