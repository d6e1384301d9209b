"""ALPS: a lower layer error than SparseGPT and Wanda on correlated inputs, exact per-row and N:M counts, dead
inputs, the reference's penalty schedule, and the command line."""

import json

import pytest
import torch

from wanda_gui.core.masks import Pattern, Selection, select
from wanda_gui.core.methods import METHODS
from wanda_gui.core.methods.alps import RHO_MAX, alps_prune, next_rho, normalize, refit
from wanda_gui.core.methods.sparsegpt import inverse_hessian, sparsegpt_prune
from wanda_gui.core.methods.wanda import wanda_score
from wanda_gui.core.statistics import Hessian


def correlated_layer(rows=24, cols=48, tokens=600, seed=0):
    """A weight and inputs whose features are mixed (correlated, as in LLMs) with a few large ones."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mixing = torch.eye(cols) + 0.6 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(tokens, cols, generator=g) @ mixing * (torch.rand(cols, generator=g) + 0.2)
    X[:, :3] *= 6
    return W, X.reshape(4, tokens // 4, cols)


def hessian(X):
    stat = Hessian(X.shape[-1], torch.device("cpu"))
    stat.add(X)
    return stat.result()


def layer_error(W, pruned, X):
    flat = X.reshape(-1, X.shape[-1])
    return float(((flat @ W.T - flat @ pruned.T) ** 2).sum() / ((flat @ W.T) ** 2).sum())


@pytest.mark.parametrize("sparsity,pattern", [(0.5, Pattern()), (0.7, Pattern()), (0.5, Pattern(2, 4))])
def test_layer_error_is_at_most_sparsegpts_and_wandas(sparsity, pattern):
    W, X = correlated_layer()
    H = hessian(X)
    ours = W.clone()
    alps_prune(ours, normalize(H), Selection(sparsity, pattern))
    sgpt = W.clone()
    sparsegpt_prune(sgpt, inverse_hessian(H), sparsity, pattern)
    wanda = W.masked_fill(select(wanda_score(W, H.diagonal()), Selection(sparsity, pattern)), 0)
    assert layer_error(W, ours, X) <= layer_error(W, sgpt, X)
    assert layer_error(W, ours, X) <= layer_error(W, wanda, X)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.73])
def test_unstructured_prunes_exactly_the_rows_share(sparsity):
    W, X = correlated_layer()
    weight = W.clone()
    _, mask = alps_prune(weight, normalize(hessian(X)), Selection(sparsity))
    assert (mask.sum(dim=1) == int(48 * sparsity)).all()
    assert (weight[mask] == 0).all() and (weight[~mask] != 0).all()


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(4, 8), Pattern(1, 4)])
def test_nm_keeps_exactly_n_of_every_m(pattern):
    W, X = correlated_layer()
    weight = W.clone()
    _, mask = alps_prune(weight, normalize(hessian(X)), Selection(0.5, pattern))
    kept = (weight != 0).reshape(24, -1, pattern.m).sum(-1)
    assert (kept == pattern.n).all() and torch.equal(weight == 0, mask)


def test_dead_inputs_are_pruned_first_and_nothing_is_nan():
    W, X = correlated_layer()
    X[..., 5] = 0
    X[..., 11] = 0
    weight = W.clone()
    _, mask = alps_prune(weight, normalize(hessian(X)), Selection(0.5))
    assert torch.isfinite(weight).all() and mask[:, [5, 11]].all()
    assert (mask.sum(dim=1) == 24).all()


def test_refit_solves_the_kept_weights_least_squares():
    """Enough CG iterations reach each row's exact restricted solution; the default 10 get most of the way."""
    W, X = correlated_layer(rows=6, cols=16, tokens=200)
    norm = normalize(hessian(X))
    Wn = W * norm.scale
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    start = Wn * keep
    exact = torch.zeros_like(Wn)
    C = norm.C.double()
    for r in range(len(Wn)):
        k = keep[r]
        exact[r, k] = torch.linalg.solve(C[k][:, k], (Wn[r].double() @ C)[k]).float()
    solved = refit(start, Wn @ norm.C, norm.C, keep, iters=40)
    assert torch.allclose(solved, exact, atol=1e-4 * Wn.abs().max().item())
    assert (solved[~keep] == 0).all()

    def loss(B):
        return float((((B - Wn) @ norm.C) * (B - Wn)).sum())
    default = loss(refit(start, Wn @ norm.C, norm.C, keep))
    assert loss(exact) <= default * (1 + 1e-5) and default - loss(exact) <= 0.01 * (loss(start) - loss(exact))


def test_penalty_schedule_is_the_references():
    """x1.3 / x1.2 / x1.1 as the support moves less; /5 and a restart while it has not begun to move; stop once
    it is still; never above 1e6."""
    assert next_rho(1.0, 20, 100, False) == (1.3, True, "go")
    assert next_rho(1.0, 1, 100, False) == (1.2, True, "go")
    assert next_rho(1.0, 1, 1000, True) == pytest.approx((1.1, True, "go"))
    assert next_rho(1.0, 1, 1000, False) == (0.2, False, "restart")
    assert next_rho(1.0, 0, 1000, False) == (0.2, False, "go")
    assert next_rho(1.0, 0, 1000, True)[2] == "stop"
    assert next_rho(RHO_MAX, 50, 100, True)[0] == RHO_MAX


def test_zero_sparsity_keeps_the_weight():
    W, X = correlated_layer()
    weight = W.clone()
    _, mask = alps_prune(weight, normalize(hessian(X)), Selection(0.0))
    assert not mask.any() and torch.allclose(weight, W, atol=1e-3 * W.abs().max().item())


def test_cli_prunes_a_tiny_model_with_alps_and_refuses_what_it_cannot_take(tmp_path, tiny_model_dir, text_file,
                                                                          capsys):
    from wanda_gui.cli import main

    assert "alps" in METHODS
    for pattern, sparsity in (("unstructured", 0.5), ("2:4", 0.5)):
        out = tmp_path / pattern.replace(":", "of")
        assert main(["prune", "--model", str(tiny_model_dir), "--method", "alps", "--pattern", pattern,
                     "--sparsity", str(sparsity), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                     "--out", str(out), "--json"]) == 0
        report = json.loads((out / "pruning_report.json").read_text())
        assert report["method"] == "alps" and abs(report["achieved_sparsity"] - 0.5) < 0.01
    capsys.readouterr()
    for flag in ("--layerwise", "--wanda-variant"):
        assert main(["prune", "--model", str(tiny_model_dir), "--method", "alps", flag,
                     "--out", str(tmp_path / "refused")]) == 2
        assert capsys.readouterr().err.strip() and not (tmp_path / "refused").exists()


def test_estimate_counts_the_solver_beside_the_hessian_passes(tiny_model_dir):
    """ALPS costs SparseGPT's passes plus a per-weight solve that does not grow with the calibration."""
    from wanda_gui.core.estimate import prune_seconds
    from wanda_gui.core.models import load_model

    info = load_model(str(tiny_model_dir)).info
    small, large = (prune_seconds(info, "alps", n, 128) - prune_seconds(info, "sparsegpt", n, 128) for n in (8, 64))
    assert small > 0 and large == pytest.approx(small, rel=1e-6)
