"""SparseGPT: the OBS update against explicit inverses, what it buys over masking alone, and shared Hessians."""

import pytest
import torch

from conftest import tiny_model
from wanda_gui.core import events as ev
from wanda_gui.core.architecture import capture_block_inputs, find_blocks, find_linears, weight_out_in
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.passes import collect_input_stats
from wanda_gui.core.runs import drain
from wanda_gui.core.masks import Pattern, Selection, select
from wanda_gui.core.methods import get_method
from wanda_gui.core.methods.wanda import wanda_score
from wanda_gui.core.methods.sparsegpt import SPARSEGPT, block_mask, inverse_hessian, sparsegpt_prune
from wanda_gui.core.statistics import Hessian, SquaredMean

CALIB = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(1))


def layer_and_inputs(rows=12, cols=32, tokens=400, seed=0):
    """A weight and inputs with uneven feature scales (a few large ones, as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4, tokens // 4, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)
    X[..., :3] *= 8
    return W, X


def hessian(X):
    stat = Hessian(X.shape[-1], torch.device("cpu"))
    for j in range(0, len(X), 2):
        stat.add(X[j:j + 2])
    return stat.result()


def direct_obs(W, H, sparsity, pattern, blocksize):
    """The OBS procedure written out with explicit inverses, in float64: column by column, the error of zeroing
    column i's pruned entries is spread over columns i.. by inv(H restricted to columns i..)'s first row."""
    H = H.double() + 0.01 * H.diagonal().mean().double() * torch.eye(len(H), dtype=torch.float64)
    W = W.double().clone()
    rows, cols = W.shape
    inverses = [torch.linalg.inv(H[i:, i:]) for i in range(cols)]
    d2 = torch.tensor([inv[0, 0] for inv in inverses], dtype=torch.float64)  # [H_F^-1]_ii = U_ii^2: the d^2
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(cols):
        if not pattern.nm and i % blocksize == 0:
            sal = W[:, i:i + blocksize] ** 2 / d2[i:i + blocksize]
            mask[:, i:i + blocksize] = sal <= sal.flatten().sort().values[int(sal.numel() * sparsity)]
        if pattern.nm and i % pattern.m == 0:
            sal = W[:, i:i + pattern.m] ** 2 / d2[i:i + pattern.m]
            mask[:, i:i + pattern.m].scatter_(1, sal.argsort(dim=1)[:, :pattern.m - pattern.n], True)
        err = torch.where(mask[:, i], W[:, i], 0) / inverses[i][0, 0]
        W[:, i:] -= torch.outer(err, inverses[i][0])
        W[:, i][mask[:, i]] = 0
    return W, mask


@pytest.mark.parametrize("pattern,blocksize", [(Pattern(), 32), (Pattern(), 8), (Pattern(2, 4), 32), (Pattern(4, 8), 8)])
def test_update_matches_obs_with_explicit_inverses(pattern, blocksize):
    W, X = layer_and_inputs()
    H = hessian(X)
    expected, expected_mask = direct_obs(W, H, 0.5, pattern, blocksize)
    weight = W.clone()
    _, mask = sparsegpt_prune(weight, inverse_hessian(H), 0.5, pattern, blocksize)
    assert torch.equal(mask, expected_mask)
    assert torch.allclose(weight.double(), expected, atol=1e-4 * W.abs().max().item())
    assert torch.equal(weight == 0, mask)
    assert not torch.allclose(weight[~mask], W[~mask])  # the kept weights did move


def test_unstructured_masks_are_chosen_in_the_references_blocks_of_128_columns():
    """The default is the reference's 128-column block: its masks equal OBS written out with 128-column selection,
    which on a 256-column layer differ from 64-column selection."""
    W, X = layer_and_inputs(rows=8, cols=256, tokens=800)
    H = hessian(X)
    _, mask = sparsegpt_prune(W.clone(), inverse_hessian(H), 0.5, Pattern())
    _, by_128 = direct_obs(W, H, 0.5, Pattern(), 128)
    _, by_64 = direct_obs(W, H, 0.5, Pattern(), 64)
    assert not torch.equal(by_128, by_64)  # the test can tell the block sizes apart
    assert torch.equal(mask, by_128)


def test_hessian_is_the_references_two_over_n_xtx():
    _, X = layer_and_inputs()
    flat = X.reshape(-1, X.shape[-1]).double()
    assert torch.allclose(hessian(X).double(), 2 / len(X) * flat.T @ flat, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("width", [3, 13, 576])
def test_hessian_summed_as_its_upper_triangle_is_the_whole_symmetric_product(width):
    """Each batch adds only the bands of rows from the diagonal on (fewer bands than rows or not, even or not);
    result() is exactly symmetric and the full 2/n X^T X."""
    torch.manual_seed(width)
    x = torch.randn(5, 7, width) * (torch.rand(width) * 3)
    stat = Hessian(width, torch.device("cpu"))
    stat.add(x[:2])
    stat.add(x[2:])
    H = stat.result()
    flat = x.reshape(-1, width).double()
    assert torch.equal(H, H.t())
    assert torch.allclose(H.double(), 2 / 5 * flat.T @ flat, rtol=1e-5, atol=1e-5 * H.abs().max().item())


def test_hessian_and_its_inverse_equal_the_references_arithmetic_to_rounding():
    """The reference's own route (H as a running average rescaled sample by sample; U by cholesky, cholesky_inverse,
    cholesky) and ours (one product a batch; U from one factorisation of H reversed) agree to float32 rounding, and
    U is upper triangular with U^T U = (H + damping)^-1."""
    import math

    torch.manual_seed(0)
    x = torch.randn(6, 64, 576) * torch.rand(576) * 3
    H, n = torch.zeros(576, 576), 0
    for sample in x:  # lib/sparsegpt.py add_batch, one sample per call
        H *= n / (n + 1)
        n += 1
        inp = math.sqrt(2 / n) * sample.t().float()
        H += inp.matmul(inp.t())
    ours = Hessian(576, torch.device("cpu"))
    ours.add(x[:2])
    ours.add(x[2:])
    assert ours.nsamples == 6 and torch.allclose(ours.result(), H, rtol=1e-5, atol=1e-5 * H.abs().max().item())
    damped = H.double().clone()
    damped.diagonal().add_(0.01 * damped.diagonal().mean())
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    upper = inverse_hessian(H).upper
    assert torch.equal(upper, upper.triu())
    assert torch.allclose(upper.double(), reference, rtol=1e-3, atol=1e-5 * reference.abs().max().item())
    assert torch.allclose(upper.double().T @ upper.double(), torch.linalg.inv(damped), rtol=1e-3,
                          atol=1e-5 * reference.abs().max().item() ** 2)


def test_unstructured_block_rule_is_the_references_threshold():
    """Within a block: everything up to and including sort(flat)[int(numel * s)], so one more than numel * s."""
    W1, d = torch.randn(20, 16), torch.rand(16) + 0.5
    for sparsity in (0.3, 0.5, 0.73):
        saliency, mask = block_mask(W1, d, sparsity)
        assert torch.equal(mask, saliency <= torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)])
        assert int(mask.sum()) == int(320 * sparsity) + 1


def test_dead_inputs_are_zeroed_and_do_not_break_the_inverse():
    W, X = layer_and_inputs()
    X[..., 7] = 0
    weight = W.clone()
    sparsegpt_prune(weight, inverse_hessian(hessian(X)), 0.5, Pattern())
    assert (weight[:, 7] == 0).all() and torch.isfinite(weight).all()


def output_error(W_hat, W, X):
    flat = X.reshape(-1, X.shape[-1])
    return float((flat @ W.T - flat @ W_hat.T).norm())


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_update_lowers_reconstruction_error_below_mask_alone_and_wanda(pattern):
    W, X = layer_and_inputs(rows=32, cols=64, tokens=800)
    weight = W.clone()
    _, mask = sparsegpt_prune(weight, inverse_hessian(hessian(X)), 0.5, pattern)
    sq_mean = SquaredMean(64, torch.device("cpu"))
    sq_mean.add(X)
    wanda = W.masked_fill(select(wanda_score(W, sq_mean.result()), Selection(0.5, pattern)), 0)
    assert output_error(weight, W, X) < output_error(W.masked_fill(mask, 0), W, X)
    assert output_error(weight, W, X) < output_error(wanda, W, X)


@pytest.mark.parametrize("pattern,blocksize", [(Pattern(2, 4), 128), (Pattern(4, 8), 128), (Pattern(1, 4), 128),
                                               (Pattern(2, 5), 8), (Pattern(3, 20), 8)])
def test_nm_counts_are_exact(pattern, blocksize):
    """Exact per group, also when M does not divide the column block (groups then never straddle blocks)."""
    W, X = layer_and_inputs(rows=16, cols=80 if pattern.m in (5, 20) else 64)
    weight = W.clone()
    _, mask = sparsegpt_prune(weight, inverse_hessian(hessian(X)), 0.5, pattern, blocksize)
    assert (mask.view(16, -1, pattern.m).sum(-1) == pattern.m - pattern.n).all()
    assert ((weight != 0).view(16, -1, pattern.m).sum(-1) == pattern.n).all()


def test_linears_sharing_an_input_share_one_hessian_equal_to_their_hooked_inputs():
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    hidden, calls = capture_block_inputs(model, blocks, CALIB, 6, torch.device("cpu"))
    linears = find_linears(blocks[0])
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach().clone()))
               for n, m in linears.items()]
    with torch.inference_mode():
        calls[0](blocks[0], hidden)
    for h in handles:
        h.remove()
    stats = collect_input_stats(blocks[0], linears, hidden, calls[0], 2, None, Hessian)
    q, k, v, o = (stats[f"self_attn.{p}_proj"] for p in "qkvo")
    assert q is k is v and stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert o is not q and stats["mlp.down_proj"] is not stats["mlp.up_proj"]
    for name, x in seen.items():
        flat = x.reshape(-1, x.shape[-1]).double()
        assert torch.allclose(stats[name].double(), 2 / len(hidden) * flat.T @ flat, rtol=1e-4, atol=1e-4), name


def test_engine_prepares_each_shared_hessian_once(monkeypatch):
    calls = []
    real = SPARSEGPT.prepare
    monkeypatch.setattr(type(SPARSEGPT), "prepare", lambda self, stat: calls.append(stat) or real(stat))
    drain(prune(tiny_model("llama"), PruneConfig(method="sparsegpt"), CALIB))
    assert len(calls) == 2 * 4  # per block: q/k/v, o, gate/up, down


@pytest.mark.parametrize("arch,pattern", [("llama", "unstructured"), ("gpt2", "2:4"), ("opt", "4:8")])
def test_engine_runs_sparsegpt_and_reports_achieved_sparsity(arch, pattern):
    model = tiny_model(arch)
    events = list(prune(model, PruneConfig(method="sparsegpt", pattern=pattern, batch_size=4), CALIB))
    assert isinstance(events[-1], ev.RunFinished), events[-1]
    assert events[0].score_label == SPARSEGPT.score_label
    p = Pattern.parse(pattern)
    for e in events:
        if isinstance(e, ev.LinearPruned):
            assert e.sparsity >= 0.5
    for b in find_blocks(model)[1]:
        for m in find_linears(b).values():
            w = weight_out_in(m)
            if p.nm:
                assert ((w != 0).view(w.shape[0], -1, p.m).sum(-1) <= p.n).all()
            else:
                assert 0.5 <= float((w == 0).float().mean()) < 0.52


def test_cancel_restores_updated_weights():
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    cancel = __import__("threading").Event()
    for e in prune(model, PruneConfig(method="sparsegpt"), CALIB, cancel):
        if isinstance(e, ev.LinearPruned) and e.done == 5:
            cancel.set()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_sparsegpt_is_offered_and_needs_calibration():
    method = get_method("SparseGPT")
    assert method is SPARSEGPT and method.needs_activations and "Frantar" in method.description

