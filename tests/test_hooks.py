"""The engine's hook points and extra statistics: what options (OWL, DSnoT, reconstruction, offload) and the
why-it-works view build on."""

from __future__ import annotations

import torch

from tests.conftest import tiny_model
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.runs import drain
from wanda_gui.core.events import BlockStarted, LinearPruned, Progress, TargetsChosen
from wanda_gui.core.explain import OUTLIER_FACTOR
from wanda_gui.core.masks import Pattern, Selection, select
from wanda_gui.core.methods import Step
from wanda_gui.core.statistics import Hessian, SquaredMean


def calibration(n=6, seqlen=16):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(1))


class Recorder(Step):
    statistic = SquaredMean

    def __init__(self):
        self.calls, self.statistics = [], []

    def before_pruning(self, ctx):
        self.calls.append("before_pruning")
        ctx.sparsities = [0.3, 0.7]
        ctx.target_note, ctx.target_basis = "planted", [1.0, 2.0]
        yield Progress("planting", 1, 1)

    def before_stage(self, ctx, index):
        self.calls.append(f"before_stage {index}")

    def after_masking(self, ctx, block):
        self.calls.append(f"after_masking {block.index}")
        self.statistics.append(block.statistics)

    def after_stage(self, ctx, index):
        self.calls.append(f"after_stage {index}")


def test_hooks_run_in_order_and_set_per_stage_targets():
    model, recorder = tiny_model("llama"), Recorder()
    events = list(prune(model, PruneConfig("sparsegpt", 0.5), calibration(), steps=(recorder,)))
    assert recorder.calls == ["before_pruning", "before_stage 0", "after_masking 0", "after_stage 0",
                              "before_stage 1", "after_masking 1", "after_stage 1"]
    assert [e.what for e in events if isinstance(e, Progress)] == ["planting"]
    chosen = [e for e in events if isinstance(e, TargetsChosen)]
    assert len(chosen) == 1 and chosen[0].sparsities == [0.3, 0.7] and chosen[0].basis == [1.0, 2.0]
    assert [e.target for e in events if isinstance(e, BlockStarted)] == [0.3, 0.7]
    sparsity = {e.name: e.sparsity for e in events if isinstance(e, LinearPruned)}
    assert all(abs(v - 0.3) < 0.02 for k, v in sparsity.items() if ".0." in k)
    assert all(abs(v - 0.7) < 0.02 for k, v in sparsity.items() if ".1." in k)
    # the hook's statistic and the method's, from one pass, shared by linears fed the same input
    stats = recorder.statistics[0]
    assert set(stats) == {Hessian, SquaredMean}
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert stats[SquaredMean][q] is stats[SquaredMean][k] and stats[Hessian][q] is stats[Hessian][k]
    # diag(H) = 2/nsamples * sum of x^2 over tokens = 2 * seqlen * mean(x^2)
    torch.testing.assert_close(stats[Hessian][q].diagonal(), 2 * 16 * stats[SquaredMean][q], rtol=1e-4, atol=1e-6)


def test_explanation_compares_wanda_and_magnitude_masks_on_the_weights_before_pruning():
    model = tiny_model("qwen2")
    # a planted outlier feature: every q/k/v input of block 0 is scaled up on channel 5 through the norm's weight
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 40.0
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    events = list(prune(model, PruneConfig("wanda", 0.5, explain=True), calibration()))
    q = next(e for e in events if isinstance(e, LinearPruned) and e.name == "model.layers.0.self_attn.q_proj")
    why = q.explanation
    assert why is not None and why.input_norms.shape == (64,)
    assert 5 in why.outliers.tolist()
    assert all(why.input_norms[i] > OUTLIER_FACTOR * float(torch.tensor(why.input_norms).median()) for i in why.outliers)
    weight = dense["model.layers.0.self_attn.q_proj.weight"]
    norms = torch.from_numpy(why.input_norms)
    differ = select(weight.abs() * norms, Selection(0.5, Pattern())) ^ select(weight.abs(), Selection(0.5, Pattern()))
    assert why.differing == differ.float().mean().item() > 0
    assert why.difference_map.shape == q.score_map.shape
    # the outlier column is kept by Wanda in every row, which magnitude does not do
    assert (model.model.layers[0].self_attn.q_proj.weight[:, 5] != 0).all()


def test_no_explanation_unless_asked_or_without_calibration():
    events = list(prune(tiny_model("llama"), PruneConfig("wanda", 0.5), calibration()))
    assert all(e.explanation is None for e in events if isinstance(e, LinearPruned))
    events = list(prune(tiny_model("llama"), PruneConfig("magnitude", 0.5, explain=True)))
    assert all(e.explanation is None for e in events if isinstance(e, LinearPruned))
    assert not any(isinstance(e, TargetsChosen) for e in events)


def test_explaining_changes_no_mask():
    plain, explained = tiny_model("llama"), tiny_model("llama")
    drain(prune(plain, PruneConfig("sparsegpt", 0.5), calibration()))
    drain(prune(explained, PruneConfig("sparsegpt", 0.5, explain=True), calibration()))
    for (name, a), b in zip(plain.named_parameters(), explained.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
