"""Selection rules: exact per-row counts, stable tie-breaking, N:M group structure, clear errors."""

import pytest
import torch

from wanda_gui.core.errors import UserError
from wanda_gui.core.masks import Pattern, Selection, layerwise_mask, lowest_per_row, nm_mask, select, unstructured_mask


def reference_lowest(score, k):
    """The reference implementation's rule: the first k indices of a stable ascending sort of each row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, torch.sort(score, dim=-1, stable=True)[1][:, :k], True)
    return mask


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_unstructured_prunes_exactly_int_cin_times_sparsity_per_row(sparsity):
    score = torch.rand(37, 129)
    mask = unstructured_mask(score, sparsity)
    assert (mask.sum(dim=1) == int(129 * sparsity)).all()
    assert torch.equal(mask, reference_lowest(score, int(129 * sparsity)))


def test_ties_go_to_the_lower_index_as_a_stable_sort():
    score = torch.randint(0, 4, (50, 64)).float()  # many ties at every threshold
    for k in (1, 17, 32, 63):
        assert torch.equal(lowest_per_row(score, k), reference_lowest(score, k))


def test_pruned_scores_never_exceed_kept_scores_in_a_row():
    score = torch.randn(20, 100)
    mask = unstructured_mask(score, 0.5)
    pruned_max = score.masked_fill(~mask, float("-inf")).max(dim=1).values
    kept_min = score.masked_fill(mask, float("inf")).min(dim=1).values
    assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4), (1, 2)])
def test_nm_keeps_the_n_highest_in_every_group(n, m):
    score = torch.randn(16, 8 * m)
    mask = nm_mask(score, Pattern(n, m))
    groups_kept = (~mask).view(16, -1, m)
    assert (groups_kept.sum(-1) == n).all()
    scores = score.view(16, -1, m)
    kept_min = scores.masked_fill(~groups_kept, float("inf")).min(-1).values
    pruned_max = scores.masked_fill(groups_kept, float("-inf")).max(-1).values
    assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_matches_a_loop_over_groups_with_ties(n, m):
    score = torch.randint(0, 3, (8, 4 * m)).float()
    mask = nm_mask(score, Pattern(n, m))
    expected = torch.zeros_like(mask)
    for g in range(0, 4 * m, m):
        order = torch.sort(score[:, g:g + m], dim=-1, stable=True)[1][:, :m - n]
        expected[:, g:g + m].scatter_(1, order, True)
    assert torch.equal(mask, expected)


def test_layerwise_prunes_exact_count_over_whole_layer():
    score = torch.rand(10, 30)
    score[0] *= 0.01  # one row of tiny weights: layer-wide pruning takes it all, per-row would not
    mask = layerwise_mask(score, 0.3)
    assert mask.sum() == int(300 * 0.3)
    assert mask[0].all()
    assert not unstructured_mask(score, 0.3)[0].all()


def test_nm_rejects_width_not_multiple_of_m():
    with pytest.raises(UserError, match="multiple of 4"):
        select(torch.rand(4, 30), Selection(0.5, Pattern(2, 4)))


@pytest.mark.parametrize("text,expected", [("unstructured", Pattern()), ("2:4", Pattern(2, 4)), (" 4 : 8", Pattern(4, 8))])
def test_pattern_parse(text, expected):
    assert Pattern.parse(text) == expected


@pytest.mark.parametrize("text", ["4:2", "0:4", "2:2", "half", "2-4"])
def test_pattern_parse_rejects_nonsense(text):
    with pytest.raises(UserError):
        Pattern.parse(text)


def test_pattern_sparsity_is_what_nm_produces():
    assert Pattern(2, 4).sparsity(0.9) == 0.5
    assert Pattern(1, 4).sparsity(0.5) == 0.75
    assert Pattern().sparsity(0.6) == 0.6
