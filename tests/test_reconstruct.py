"""Block reconstruction: the pruned block's outputs move towards the dense block's, the masks held exactly."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.conftest import tiny_model
from wanda_gui.core.architecture import find_blocks, find_linears, weight_out_in
from wanda_gui.core.engine import PruneConfig, prune, run_to_end
from wanda_gui.core.errors import UserError
from wanda_gui.core.events import RunCancelled
from wanda_gui.core.methods import Reconstruct, Step


def calibration():
    return torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch,method,pattern", [("llama", "wanda", "unstructured"), ("llama", "sparsegpt", "2:4"),
                                                 ("gpt2", "wanda", "2:4"), ("opt", "ria", "unstructured")])
def test_reconstruction_lowers_each_blocks_error_and_holds_the_masks(arch, method, pattern):
    plain, fitted = tiny_model(arch), tiny_model(arch)
    dense = {n: p.detach().clone() for n, p in fitted.named_parameters()}
    run_to_end(prune(plain, PruneConfig(method, 0.5, pattern), calibration()))
    step, masks = Reconstruct(epochs=4, lr=1e-3), {}

    class Masks(Step):  # runs after the reconstruction: sees the masks it had to hold
        def after_masking(self, ctx, block):
            masks.update(block.masks)

    run_to_end(prune(fitted, PruneConfig(method, 0.5, pattern), calibration(), steps=(step, Masks())))
    assert len(step.errors) == 2 and all(after < 0.9 * before for before, after in step.errors)
    for name, linear in zip(masks, [m for n, m in fitted.named_modules() if n in masks]):
        assert torch.equal(weight_out_in(linear) == 0, masks[name]), name  # pruned stay 0, kept stay non-zero
    block0 = {n for n in masks if ".0." in n or ".h.0." in n}
    for (name, a), b in zip(plain.named_parameters(), fitted.parameters()):
        if name.removesuffix(".weight") in block0:  # the same inputs and masks as without: only the kept values moved
            assert torch.equal(a == 0, b == 0) and not torch.equal(a, b), name
        elif name.removesuffix(".weight") not in masks:
            assert torch.equal(b, dense[name]), name  # norms, embeddings, biases untouched
        assert not b.requires_grad
    assert len(masks) == sum(len(find_linears(b)) for b in find_blocks(fitted)[1])


def test_the_option_is_in_the_config_and_refused_without_calibration():
    model = tiny_model("llama")
    summary = run_to_end(prune(model, PruneConfig("wanda", 0.5, reconstruct=True), calibration()))
    assert summary.settings["reconstruct"] and summary.achieved_sparsity == pytest.approx(0.5)
    with pytest.raises(UserError, match="reconstruction"):
        PruneConfig("magnitude", 0.5, reconstruct=True)


def test_cancel_during_reconstruction_restores_the_dense_model():
    model = tiny_model("llama")
    dense = [p.detach().clone() for p in model.parameters()]
    cancel = threading.Event()

    class CancelOnFit(Reconstruct):
        def fit(self, *args):
            cancel.set()
            return super().fit(*args)

    events = list(prune(model, PruneConfig("wanda", 0.5), calibration(), cancel=cancel, steps=(CancelOnFit(),)))
    assert isinstance(events[-1], RunCancelled) and events[-1].restored
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), dense))
    assert not any(p.requires_grad for p in model.parameters())


def test_a_bf16_block_is_fitted_and_returned_in_bf16():
    model = tiny_model("qwen2").to(torch.bfloat16)
    step = Reconstruct(epochs=3, lr=1e-3)
    run_to_end(prune(model, PruneConfig("wanda", 0.5), calibration(), steps=(step,)))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(after < before for before, after in step.errors)
    q = weight_out_in(model.model.layers[0].self_attn.q_proj)
    assert (q == 0).float().mean() == pytest.approx(0.5)


def test_step_base_class_leaves_after_masking_alone():
    assert Reconstruct.after_masking is not Step.after_masking
