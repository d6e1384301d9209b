"""Block reconstruction: the pruned block's outputs move towards the dense block's, the masks held exactly."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import transformers as tf

from tests.conftest import tiny_model
from tests.test_estimate import smollm2
from wanda_gui.app.steps.method import prune_config
from wanda_gui.cli import _parser, prune_job
from wanda_gui.core import estimate as est
from wanda_gui.core.architecture import BlockCall, find_blocks, find_linears, weight_out_in
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.runs import drain
from wanda_gui.core.errors import UserError
from wanda_gui.core.events import RunCancelled
from wanda_gui.core.methods import Step
from wanda_gui.core.methods.reconstruct import Reconstruct, adds_unchanged, find_mlp, refit
from wanda_gui.core.sweep import sweep_runs


def calibration():
    return torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(2))


class Masks(Step):
    """Runs after the reconstruction: records the masks it had to hold."""

    def __init__(self):
        self.masks = {}

    def after_masking(self, ctx, block):
        self.masks.update(block.masks)


@pytest.mark.parametrize("arch,method,pattern,dense_stream", [
    ("llama", "wanda", "unstructured", True), ("llama", "sparsegpt", "2:4", False), ("gpt2", "wanda", "2:4", True),
    ("opt", "ria", "unstructured", True)])
def test_reconstruction_lowers_each_blocks_error_and_holds_the_masks(arch, method, pattern, dense_stream):
    plain, fitted = tiny_model(arch), tiny_model(arch)
    dense = {n: p.detach().clone() for n, p in fitted.named_parameters()}
    drain(prune(plain, PruneConfig(method, 0.5, pattern), calibration()))
    step, seen = Reconstruct(epochs=4, lr=3e-4, dense_stream=dense_stream), Masks()
    drain(prune(fitted, PruneConfig(method, 0.5, pattern), calibration(), steps=(step, seen)))
    assert len(step.errors) == 2
    for masked, refitted, final in step.errors:
        assert refitted < masked and final < 0.9 * refitted
    modules = dict(fitted.named_modules())
    assert len(seen.masks) == sum(len(find_linears(b)) for b in find_blocks(fitted)[1])
    for name, mask in seen.masks.items():  # pruned exactly 0, kept non-zero
        assert torch.equal(weight_out_in(modules[name]) == 0, mask), name
    block0 = {n for n in seen.masks if ".0." in n}
    for (name, a), b in zip(plain.named_parameters(), fitted.parameters()):
        linear = name.removesuffix(".weight")
        if linear in block0:  # same inputs and masks as without reconstruction: only the kept values moved
            assert torch.equal(a == 0, b == 0) and not torch.equal(a, b), name
        elif linear not in seen.masks:
            assert torch.equal(b, dense[name]), name  # norms, embeddings, biases untouched
        assert not b.requires_grad


def test_each_stage_alone_lowers_the_error():
    """The closed-form refit and Adam each help on their own (so neither is dead weight)."""
    for step in (Reconstruct(epochs=0), Reconstruct(epochs=4, lr=1e-3, refit_iterations=0)):
        drain(prune(tiny_model("llama"), PruneConfig("wanda", 0.5), calibration(), steps=(step,)))
        assert all(final < 0.9 * masked for masked, _, final in step.errors)


@pytest.mark.parametrize("bf16,tolerance", [(False, 1e-4), (True, 3e-3)])
@pytest.mark.parametrize("exclude", [(), ("model.layers.0.*",)])
def test_targets_are_the_dense_models_own_hidden_states(exclude, bf16, tolerance):
    """Block 1 is fitted to what the dense model computes after block 0, even when block 0 is left dense: in fp32 to
    rounding, in bf16 (where Adam runs in it) within bf16's precision."""
    model = tiny_model("llama")
    outputs = []
    hook = model.model.layers[1].register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model(calibration())
    hook.remove()
    expected = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    targets = []

    class Recorded(Reconstruct):
        def dense_targets(self, *args):
            targets.append(super().dense_targets(*args))
            return targets[-1]

    drain(prune(model, PruneConfig("wanda", 0.5, exclude=exclude), calibration(), steps=(Recorded(bf16=bf16),)))
    torch.testing.assert_close(targets[-1], expected, rtol=tolerance, atol=tolerance)
    assert len(targets) == 2 - len(exclude)


def test_refit_reaches_each_rows_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 12, generator=g) @ torch.randn(12, 12, generator=g)
    H = X.t() @ X
    dense = torch.randn(5, 12, generator=g)
    keep = torch.rand(5, 12, generator=g) > 0.5
    fitted = refit(dense * keep, dense, keep, H, iterations=12)
    damped = H + 0.01 * H.diagonal().mean() * torch.eye(12)
    for row in range(5):
        k = keep[row]
        best = dense[row, k] + torch.linalg.solve(damped[k][:, k], damped[k][:, ~k] @ dense[row, ~k])
        torch.testing.assert_close(fitted[row, k], best, rtol=1e-4, atol=1e-4)
        assert torch.all(fitted[row, ~k] == 0)


def test_the_option_is_in_the_config_and_refused_without_calibration():
    model = tiny_model("llama")
    summary = drain(prune(model, PruneConfig("wanda", 0.5, options=("reconstruct",)), calibration()))
    assert summary.settings["options"] == ("reconstruct",) and summary.achieved_sparsity == pytest.approx(0.5)
    with pytest.raises(UserError, match="reconstruction"):
        PruneConfig("magnitude", 0.5, options=("reconstruct",))


@pytest.mark.parametrize("settings", [dict(epochs=-1), dict(lr=0.0), dict(batch_size=0), dict(refit_iterations=-2),
                                      dict(mlp_steps=-1)])
def test_bad_settings_are_refused(settings):
    with pytest.raises(UserError, match="Reconstruction needs"):
        Reconstruct(**settings)


def test_cancel_during_reconstruction_restores_the_dense_model():
    model = tiny_model("llama")
    dense = [p.detach().clone() for p in model.parameters()]
    cancel = threading.Event()

    class CancelOnFit(Reconstruct):
        def adam(self, *args):
            cancel.set()
            return super().adam(*args)

    events = list(prune(model, PruneConfig("wanda", 0.5), calibration(), cancel=cancel, steps=(CancelOnFit(),)))
    assert isinstance(events[-1], RunCancelled) and events[-1].restored
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), dense))
    assert not any(p.requires_grad for p in model.parameters())


def test_grad_flags_are_left_as_found():
    """A model being trained elsewhere keeps its trainable parameters trainable."""
    model = tiny_model("llama")
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name or "q_proj" in name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    drain(prune(model, PruneConfig("wanda", 0.5), calibration(), steps=(Reconstruct(epochs=1),)))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_a_bf16_block_is_fitted_and_returned_in_bf16():
    model = tiny_model("qwen2").to(torch.bfloat16)
    step = Reconstruct(epochs=3, lr=1e-3)
    drain(prune(model, PruneConfig("wanda", 0.5), calibration(), steps=(step,)))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(final < masked for masked, _, final in step.errors)
    q = weight_out_in(model.model.layers[0].self_attn.q_proj)
    assert (q == 0).float().mean() == pytest.approx(0.5)


def test_an_apps_pruning_copy_of_inference_tensors_is_fitted_and_the_dense_model_untouched():
    """The app prunes a copy whose untouched tensors are the dense model's own (and may be inference tensors)."""
    from wanda_gui.core.copies import pruning_copy
    from wanda_gui.core.engine import select_linears

    with torch.inference_mode():
        dense = tiny_model("llama")
    before = {n: p.clone() for n, p in dense.named_parameters()}
    config = PruneConfig("wanda", 0.5, options=("reconstruct",))
    _, plan = select_linears(dense, config)
    copy = pruning_copy(dense, [linear for stage in plan for linear in stage.values()])
    summary = drain(prune(copy, config, torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))))
    assert summary.achieved_sparsity == pytest.approx(0.5)
    assert copy.model.layers[0].input_layernorm.weight is dense.model.layers[0].input_layernorm.weight  # still shared
    assert all(torch.equal(p, before[n]) for n, p in dense.named_parameters())


class PrunedStayZeroDuringAdam(Reconstruct):
    """Looks at the weights right after Adam, before the final write-back re-zeroes the pruned positions."""

    moved: list[float] = []

    def adam(self, ctx, module, call, hidden, targets, block, keeps):
        super().adam(ctx, module, call, hidden, targets, block, keeps)
        for name, linear in block.linears.items():
            self.moved.append(float(weight_out_in(linear).detach()[~keeps[name]].abs().max()))


def test_adam_never_moves_a_pruned_weight():
    """Adam's gradients are masked, so its moments and steps at pruned positions stay exactly zero; the final
    re-zeroing must not be what hides a pruned weight that moved (the after-Adam error is measured before it)."""
    step = PrunedStayZeroDuringAdam(epochs=2, refit_iterations=0)
    step.moved = []
    drain(prune(tiny_model("llama"), PruneConfig("wanda", 0.5), calibration(), steps=(step,)))
    assert len(step.moved) == 14 and max(step.moved) == 0.0, step.moved


def test_adams_learning_rate_falls_along_a_cosine_over_the_epochs_steps(monkeypatch):
    """Each block's Adam starts at lr and falls to 0 along a cosine over the steps its epochs allow, whatever the
    block before it took."""
    seen, adam_step = [], torch.optim.Adam.step

    def step(optimizer, *args, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])
        return adam_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    fit = Reconstruct(epochs=2, lr=1e-3, batch_size=2)  # 8 samples: 4 steps an epoch, 8 a block
    drain(prune(tiny_model("llama"), PruneConfig("wanda", 0.5), calibration(), steps=(fit,)))
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]
    # on each batch a step on the block, then one on its MLP alone, at that batch's rate
    assert fit.steps == [8, 8] and seen == pytest.approx([rate for rate in cosine for _ in range(2)] * 2)


@pytest.mark.parametrize("native,asked,expected", [(True, None, True), (False, None, False), (True, False, False)])
def test_adams_passes_run_in_bf16_where_the_device_has_it_and_everything_else_in_fp32(monkeypatch, native, asked,
                                                                                        expected):
    """Autocast to bf16 during Adam's forwards and the dense targets' only (never the probes or the next block's
    inputs), the weights and their moments fp32, the masks held and the block's error still falling."""
    monkeypatch.setattr("wanda_gui.core.methods.reconstruct.native_bf16", lambda device: native)
    seen = []
    phase = ["other"]
    model = tiny_model("llama")
    for linear in find_linears(find_blocks(model)[1][0]).values():
        linear.register_forward_hook(lambda m, args, out: seen.append(
            ("adam" if torch.is_grad_enabled() else phase[0], out.dtype)))

    class Phased(Reconstruct):
        def dense_targets(self, *args):
            phase[0] = "targets"
            try:
                return super().dense_targets(*args)
            finally:
                phase[0] = "other"

    step, masks = Phased(epochs=2, bf16=asked), Masks()
    drain(prune(model, PruneConfig("wanda", 0.5), calibration(), steps=(step, masks)))
    dtypes = {name: {dtype for at, dtype in seen if at == name} for name in ("adam", "targets", "other")}
    assert dtypes["adam"] == dtypes["targets"] == {torch.bfloat16 if expected else torch.float32}
    assert dtypes["other"] == {torch.float32}
    assert all(final < masked for masked, _, final in step.errors)
    modules = dict(model.named_modules())
    assert all(weight_out_in(modules[n]).dtype == torch.float32 and torch.equal(weight_out_in(modules[n]) == 0, m)
               for n, m in masks.masks.items())


def test_each_effort_takes_more_steps_than_the_one_before_and_ends_at_a_loss_at_most_its():
    """fast, balanced, thorough in the registry's order: more epochs each, and on every block a final loss at most
    the cheaper effort's."""
    names = list(Reconstruct.efforts)
    steps = [PruneConfig("sparsegpt", 0.5, "2:4", options=("reconstruct",), efforts={"reconstruct": name}).steps()[0]
             for name in names]
    for step in steps:
        drain(prune(tiny_model("llama"), PruneConfig("sparsegpt", 0.5, "2:4"), calibration(), steps=(step,)))
    assert names[0] == "fast" and [step.epochs for step in steps] == [1, 2, 4]
    for cheaper, dearer in zip(steps, steps[1:]):
        assert sum(dearer.steps) > sum(cheaper.steps)
        assert cheaper.errors[0][0] == pytest.approx(dearer.errors[0][0])  # the same block 0 (later inputs differ)
        assert all(d[2] <= c[2] for c, d in zip(cheaper.errors, dearer.errors)), (cheaper.errors, dearer.errors)


def test_the_effort_goes_through_the_config_and_the_cli():
    assert PruneConfig("wanda", 0.5, options=("reconstruct",)).efforts == {"reconstruct": "fast"}
    assert PruneConfig("wanda", 0.5).efforts == {}
    config = prune_job(_parser().parse_args(["prune", "--model", "builtin", "--reconstruct", "--reconstruct-effort",
                                             "thorough", "--out", "x"])).config
    assert config.efforts == {"reconstruct": "thorough"} and config.steps()[0].refit_iterations == 30
    with pytest.raises(UserError, match="needs Block reconstruction on"):
        PruneConfig("wanda", 0.5, efforts={"reconstruct": "thorough"})
    with pytest.raises(UserError, match="no effort 'slow'"):
        PruneConfig("wanda", 0.5, options=("reconstruct",), efforts={"reconstruct": "slow"})
    specs = sweep_runs(["wanda"], [0.5], ["2:4"], ("reconstruct",), {"reconstruct": "thorough"})
    assert specs[0].key == "wanda+reconstruct=thorough|2:4|0.5" and specs[0].config().efforts["reconstruct"] == "thorough"
    assert sweep_runs(["wanda"], [0.5], ["2:4"], ("reconstruct",))[0].key == "wanda+reconstruct|2:4|0.5"


def test_the_estimate_counts_reconstruction_by_its_effort(monkeypatch):
    """None, then each effort in the registry's order: each estimated longer than the one before."""
    monkeypatch.setattr(est, "matmul_rate", lambda device, dtype, tokens, width: 1e11)
    info = smollm2()
    settings = [((), {})] + [(("reconstruct",), {"reconstruct": name}) for name in Reconstruct.efforts]
    seconds = [est.estimate(info, "sparsegpt", 64, 512, False, steps=PruneConfig(
        "sparsegpt", 0.5, options=options, efforts=efforts).steps()).seconds for options, efforts in settings]
    assert len(seconds) == 4 and seconds == sorted(set(seconds))


def test_the_apps_effort_choice_reaches_the_config_only_with_reconstruction_on():
    on = prune_config("SparseGPT", 0.5, "2:4", "1:4", "", "", False, 0, False, ["Block reconstruction"],
                      reconstruct_effort="thorough")
    off = prune_config("SparseGPT", 0.5, "2:4", "1:4", "", "", False, 0, False, [], reconstruct_effort="thorough")
    assert on.efforts == {"reconstruct": "thorough"} and on.steps()[0].epochs == 4 and off.efforts == {}


def test_adam_that_overshoots_gives_the_block_back_its_refit():
    """A learning rate far too large makes Adam worse than the closed-form refit it starts from: the block keeps the
    refit's weights (the final error is the refit's, exactly), and the masks still hold."""
    step, seen = Reconstruct(epochs=2, lr=10.0), Masks()
    model = tiny_model("llama")
    drain(prune(model, PruneConfig("wanda", 0.5), calibration(), steps=(step, seen)))
    assert all(final == refitted < masked for masked, refitted, final in step.errors), step.errors
    modules = dict(model.named_modules())
    for name, mask in seen.masks.items():
        assert torch.equal(weight_out_in(modules[name]) == 0, mask), name


class Probes(Step):
    """Records, per block, the MLP found and whether the block adds its output unchanged."""

    def __init__(self):
        self.found = []

    def after_masking(self, ctx, block):
        if block.index < len(ctx.blocks):
            module = ctx.blocks[block.index]
            mlp = find_mlp(module)
            name = next((n for n, child in module.named_children() if child is mlp), None)
            self.found.append((name, mlp is not None and adds_unchanged(module, mlp, ctx.calls[block.index],
                                                                        ctx.hidden[:1].clone())))


@pytest.mark.parametrize("arch,found", [
    ("llama", ("mlp", True)), ("qwen3", ("mlp", True)), ("phi3", ("mlp", True)), ("gpt2", ("mlp", True)),
    ("gpt_neox", ("mlp", True)),  # attention and MLP side by side, both added to the residual
    ("gemma2", ("mlp", False)), ("gemma3", ("mlp", False)),  # a norm after the MLP
    ("opt", (None, False))])  # fc1 and fc2 are the block's own
def test_the_mlp_is_found_and_probed_for_adding_its_output_unchanged(arch, found):
    probes = Probes()
    drain(prune(tiny_model(arch), PruneConfig("wanda", 0.5), calibration(), steps=(probes,)))
    assert probes.found == [found] * 2


def falcon():
    """Falcon adds the attention's output to the MLP's in place (parallel attention, its default)."""
    torch.manual_seed(0)
    config = tf.FalconConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    return tf.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), lambda: tiny_model("gpt_neox"), falcon])
def test_the_mlp_step_sees_the_blocks_own_output(make):
    """Before any step, the MLP step's loss (the rest kept from the block's step plus the MLP run again on its kept
    input) is the block's loss: the attention is held, nothing else changes."""
    losses = []

    class FirstLosses(Reconstruct):
        def optimise(self, ctx, losses_of, *args):
            rows = torch.arange(2)
            with torch.enable_grad():
                losses.append([float(loss(rows)) for loss in losses_of])
            return super().optimise(ctx, losses_of, *args)

    drain(prune(make(), PruneConfig("wanda", 0.5), calibration(), steps=(FirstLosses(bf16=False),)))
    assert len(losses) == 2 and all(len(pair) == 2 and pair[1] == pytest.approx(pair[0], rel=1e-5) for pair in losses)


def fitted(arch, mlp_steps, epochs):
    model, masks = tiny_model(arch), Masks()
    step = Reconstruct(epochs=epochs, lr=3e-4, refit_iterations=0, mlp_steps=mlp_steps, bf16=False)
    drain(prune(model, PruneConfig("wanda", 0.5), calibration(), steps=(step, masks)))
    return model, step, masks


def test_the_mlp_steps_move_the_mlp_only_and_lower_the_error():
    """One batch: the attention takes the same single step with or without the MLP's, the MLP moves on from it; an
    epoch: block 0 ends at a lower error, the masks held."""
    (plain, _, _), (more, _, masks) = fitted("llama", 0, 0.25), fitted("llama", 1, 0.25)
    block_plain, block_more = plain.model.layers[0], more.model.layers[0]
    for name, linear in find_linears(block_more).items():
        same = torch.equal(linear.weight, find_linears(block_plain)[name].weight)
        assert same == name.startswith("self_attn."), name
    modules = dict(more.named_modules())
    assert all(torch.equal(weight_out_in(modules[n]) == 0, m) for n, m in masks.masks.items())
    (_, plain_step, _), (_, more_step, _) = fitted("llama", 0, 2), fitted("llama", 1, 2)
    assert plain_step.steps == more_step.steps == [8, 8]
    assert more_step.errors[0][2] < plain_step.errors[0][2] < 0.9 * plain_step.errors[0][0]


@pytest.mark.parametrize("arch", ["gemma2", "opt"])
def test_where_the_mlp_cannot_step_alone_the_block_steps_as_without_mlp_steps(arch):
    (plain, _, _), (more, _, _) = fitted(arch, 0, 1), fitted(arch, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), more.parameters()))


def test_with_no_mlp_linear_pruned_the_block_steps_alone():
    """--exclude '*mlp*': the MLP's weights are not being fitted, so there is no MLP step to take."""
    runs = []
    for mlp_steps in (0, 1):
        model, step = tiny_model("llama"), Reconstruct(epochs=1, lr=3e-4, mlp_steps=mlp_steps, bf16=False)
        drain(prune(model, PruneConfig("wanda", 0.5, exclude=("*mlp*",)), calibration(), steps=(step,)))
        runs.append((model, step))
    (plain, plain_step), (more, more_step) = runs
    assert plain_step.errors == more_step.errors and all(f < m for m, _, f in more_step.errors)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), more.parameters()))


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x, gate=None):
        return self.down(self.up(x) if gate is None else self.up(x) * gate)


class Parallel(torch.nn.Module):
    """x + attention(x) + mlp(x), the MLP called with its input alone or with a keyword argument too."""

    def __init__(self, keyword):
        super().__init__()
        self.attention, self.mlp, self.keyword = torch.nn.Linear(4, 4), TwoLinears(), keyword

    def forward(self, x):
        return x + self.attention(x) + (self.mlp(x, gate=torch.ones(8)) if self.keyword else self.mlp(x))


@pytest.mark.parametrize("keyword", [False, True])
def test_an_mlp_called_with_more_than_its_input_does_not_step_alone(keyword):
    block = Parallel(keyword)
    assert find_mlp(block) is block.mlp
    assert adds_unchanged(block, block.mlp, BlockCall((), {}, False), torch.randn(2, 3, 4)) is not keyword

