"""Structured pruning: whole MLP channels and key/value head groups removed, the linears really smaller, the config
saying so, the export loading with plain from_pretrained to the same logits; FLAP's scores and bias; refusals."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import transformers as tf
from conftest import SMALL, tiny_model
from test_bad_input_cli import prune_args, run, snapshot

import wanda_gui.core.models as models
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune, validate
from wanda_gui.core.errors import UserError
from wanda_gui.core.events import BlockShrunk, RunCancelled, RunFailed
from wanda_gui.core.export import export_model, make_report
from wanda_gui.core.methods.reconstruct import Reconstruct
from wanda_gui.core.models import ModelInfo
from wanda_gui.core.runs import drain
from wanda_gui.core.structured import adaptive_widths, layouts, uniform_widths

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


def calibration(n=4, seqlen=32, seed=0):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def structured(model, method="wanda", sparsity=0.5, widths="uniform", steps=(), **config):
    events = []
    summary = drain(prune(model, PruneConfig(method=method, sparsity=sparsity, pattern="structured", widths=widths,
                                             **config), calibration(), steps=steps), events.append)
    return summary, events


def info(model):
    return ModelInfo("tiny", type(model).__name__, model.config.model_type, sum(p.numel() for p in model.parameters()),
                     2, 14, 0, "fp32", "cpu", 0, 64, 256, True)


def block_inputs(model, index=0):
    """The inputs of o_proj and down_proj in one block of the dense model, over the calibration windows."""
    seen = {}
    block = model.model.layers[index]
    hooks = [getattr(block.self_attn if name == "o_proj" else block.mlp, name).register_forward_pre_hook(
        lambda m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name in ("o_proj", "down_proj")]
    with torch.no_grad():
        model(calibration())
    for h in hooks:
        h.remove()
    return {name: torch.cat(xs).double() for name, xs in seen.items()}


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_linears_are_smaller_and_the_config_says_so(arch):
    model = tiny_model(arch)
    head_dim = layouts(model)[0].head_dim
    summary, events = structured(model)
    config = model.config
    assert (config.intermediate_size, config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (
        64, 1, 2, head_dim)
    for block in model.model.layers:
        assert block.mlp.gate_proj.weight.shape == block.mlp.up_proj.weight.shape == (64, 64)
        assert block.mlp.down_proj.weight.shape == (64, 64)
        assert block.self_attn.q_proj.weight.shape == (2 * head_dim, 64)
        assert block.self_attn.k_proj.weight.shape == block.self_attn.v_proj.weight.shape == (head_dim, 64)
        assert block.self_attn.o_proj.weight.shape == (64, 2 * head_dim)
    shrunk = [e for e in events if isinstance(e, BlockShrunk)]
    assert [(e.kept_heads, e.total_heads, e.kept_channels, e.total_channels) for e in shrunk] == [(2, 4, 64, 128)] * 2
    assert summary.parameters_after < summary.parameters_before == sum(p.numel() for p in tiny_model(arch).parameters())
    assert summary.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    assert torch.isfinite(model(calibration(1, 16)).logits).all()


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_uniform_export_loads_with_plain_from_pretrained_to_the_same_logits(arch, tmp_path, tiny_tokenizer):
    model = tiny_model(arch)
    summary, _ = structured(model, method="flap", sparsity=0.3)
    export_model(model, tiny_tokenizer, tmp_path / "out", make_report(info(model), summary, None, {}))
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = calibration(2, 24, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == summary.parameters_after
    compensated = json.loads((tmp_path / "out" / "pruning_report.json").read_text())["structure"]["bias_compensation"]
    assert compensated == {"o_proj": arch != "mistral" and arch != "qwen2", "down_proj": arch == "llama"}
    assert (loaded.model.layers[0].self_attn.o_proj.bias is not None) == compensated["o_proj"]


def test_an_adaptive_export_is_padded_to_the_widest_block_with_the_same_logits(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    summary, _ = structured(model, method="flap", sparsity=0.4, widths="adaptive")
    widths = model.config.structured_widths
    assert len(set(widths["intermediate_size"])) > 1 or len(set(widths["num_key_value_heads"])) > 1
    export_model(model, tiny_tokenizer, tmp_path / "out", make_report(info(model), summary, None, {}))
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.model.layers[0].mlp.down_proj.in_features == max(widths["intermediate_size"])
    ids = calibration(2, 24, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert [b.mlp.down_proj.in_features for b in model.model.layers] == widths["intermediate_size"]  # back after


def test_flap_keeps_the_top_fluctuation_scores_and_its_bias_is_the_removed_mean_input():
    dense = tiny_model("llama")
    x = block_inputs(dense)
    model = tiny_model("llama")
    structured(model, method="flap", sparsity=0.5)
    block, original = model.model.layers[0], dense.model.layers[0]
    down = original.mlp.down_proj.weight.double()
    score = x["down_proj"].var(dim=0, unbiased=False) * down.pow(2).sum(dim=0)
    kept = score.topk(64).indices.sort().values
    torch.testing.assert_close(block.mlp.up_proj.weight, original.mlp.up_proj.weight[kept])
    torch.testing.assert_close(block.mlp.down_proj.weight, original.mlp.down_proj.weight[:, kept])
    removed = torch.ones(128, dtype=torch.bool)
    removed[kept] = False
    expected = down[:, removed] @ x["down_proj"].mean(dim=0)[removed]
    torch.testing.assert_close(block.mlp.down_proj.bias.double(), expected, rtol=1e-4, atol=1e-5)
    o = original.self_attn.o_proj.weight.double()
    heads = (x["o_proj"].var(dim=0, unbiased=False) * o.pow(2).sum(dim=0)).pow(2).view(2, -1).sum(dim=1)
    group = int(heads.argmax())  # one of two key/value groups (two query heads each) is kept
    rows = torch.arange(group * 32, group * 32 + 32)
    torch.testing.assert_close(block.self_attn.q_proj.weight, original.self_attn.q_proj.weight[rows])
    torch.testing.assert_close(block.self_attn.k_proj.weight, original.self_attn.k_proj.weight[rows[:16] - group * 16])
    others = torch.tensor([c for c in range(64) if c not in rows])
    torch.testing.assert_close(block.self_attn.o_proj.bias.double(), o[:, others] @ x["o_proj"].mean(dim=0)[others],
                               rtol=1e-4, atol=1e-5)
    assert not block.self_attn.q_proj.bias.any()  # attention_bias turned on for o_proj: zero q/k/v biases


def test_wanda_sp_keeps_the_channels_with_the_highest_mean_weight_times_input_norm():
    dense = tiny_model("qwen3")
    x = block_inputs(dense)
    model = tiny_model("qwen3")
    structured(model, method="wanda", sparsity=0.5)
    down = dense.model.layers[0].mlp.down_proj.weight.double()
    score = (down.abs() * x["down_proj"].pow(2).mean(dim=0).sqrt()).mean(dim=0)
    kept = score.topk(64).indices.sort().values
    gate = dense.model.layers[0].mlp.gate_proj.weight
    torch.testing.assert_close(model.model.layers[0].mlp.gate_proj.weight, gate[kept])


def test_uniform_widths_take_whole_groups_first_and_the_mlp_makes_up_the_rest():
    layout = layouts(tiny_model("llama"))[0]  # 2 groups of 2 heads x 16, 128 channels, hidden 64
    assert uniform_widths(layout, 0.2) == (2, 128 - round(0.2 * (2 * 6 * 16 * 64 + 128 * 192) / 192))
    groups, channels = uniform_widths(layout, 0.5)
    assert groups == 1 and abs(1 - (groups * 6 * 16 * 64 + channels * 192) / (2 * 6 * 16 * 64 + 128 * 192) - 0.5) < 0.01
    with pytest.raises(UserError, match="no MLP channel"):
        uniform_widths(layout, 0.95)


def test_adaptive_widths_give_more_to_the_block_that_scores_higher_and_meet_the_budget():
    found = layouts(tiny_model("llama"))
    flat = torch.linspace(0, 1, 128)
    peaked = torch.cat([torch.zeros(120), torch.full((8,), 10.0)])  # few strong channels: the rest rank low
    widths = adaptive_widths(found, [torch.rand(64), torch.rand(64)], [flat, peaked], 0.3)
    assert widths[0][1] > widths[1][1] and all(g >= 1 and c >= 1 for g, c in widths)
    kept = sum(g * found[0].group_cost + c * found[0].channel_cost for g, c in widths)
    total = 2 * (2 * found[0].group_cost + 128 * found[0].channel_cost)
    assert abs(kept / total - 0.7) < found[0].group_cost / total


def test_reconstruction_on_top_brings_the_blocks_outputs_closer_to_the_dense_ones():
    model = tiny_model("llama")
    step = Reconstruct(epochs=4, batch_size=1, lr=1e-4)  # errors of 1e-6 on this tiny model: small steps
    summary, _ = structured(model, method="flap", sparsity=0.3, steps=(step,))
    assert len(step.errors) == 2 and all(after < masked for masked, _, after in step.errors), step.errors
    assert model.model.layers[0].mlp.down_proj.in_features < 128


def test_a_stopped_run_puts_the_dense_linears_back():
    model = tiny_model("gemma2")
    cancel = threading.Event()
    events = []
    for event in prune(model, PruneConfig(method="flap", sparsity=0.5, pattern="structured"), calibration(), cancel):
        events.append(event)
        if isinstance(event, BlockShrunk):
            cancel.set()
    assert isinstance(events[-1], RunCancelled) and events[-1].restored
    assert all(b.mlp.down_proj.in_features == 128 and b.self_attn.q_proj.out_features == 64
               for b in model.model.layers)
    assert model.config.intermediate_size == 128


def test_a_failure_in_a_block_names_it_and_puts_the_dense_linears_back():
    """A failure after block 0 was shrunk, inside block 1's pass: the event says where, the model is whole again."""
    model = tiny_model("llama")
    dense = {name: p.clone() for name, p in model.named_parameters()}

    def broken(module, args):
        raise RuntimeError("a broken kernel")

    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(broken)
    events = list(prune(model, PruneConfig(method="flap", sparsity=0.5, pattern="structured"), calibration()))
    assert sum(isinstance(e, BlockShrunk) for e in events) == 1
    failed = events[-1]
    assert isinstance(failed, RunFailed) and failed.restored
    assert failed.reason == "RuntimeError at block 1: a broken kernel" and failed.layer == "block 1"
    assert {name: p for name, p in model.named_parameters()}.keys() == dense.keys()
    assert all(torch.equal(p, dense[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("config,message", [
    (dict(method="flap", pattern="unstructured"), "FLAP removes whole channels and heads"),
    (dict(method="flap", pattern="2:4"), "FLAP removes whole channels and heads"),
    (dict(method="sparsegpt", pattern="structured"), "SparseGPT scores single weights"),
    (dict(method="ria", pattern="structured"), "cannot remove whole channels"),
    (dict(method="wanda", pattern="structured", options=("owl",)), "OWL works on single weights"),
    (dict(method="wanda", pattern="structured", options=("dsnot",)), "does not apply to the structured pattern"),
    (dict(method="wanda", pattern="2:4", widths="adaptive"), "Adaptive widths"),
    (dict(method="wanda", pattern="structured", widths="wide"), "Widths must be one of"),
    (dict(method="magnitude", pattern="structured", layerwise=True), "layer-wide comparison does not apply"),
    (dict(method="wanda", pattern="structured", exclude=("*.q_proj",)), "include/exclude"),
    (dict(method="wanda", pattern="structured", sparsity=0.0), "above 0"),
])
def test_what_the_structured_pattern_cannot_take_is_refused_in_one_line(config, message):
    with pytest.raises(UserError, match=message) as error:
        PruneConfig(**config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch,missing", [
    ("phi3", "no self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, mlp.up_proj"),  # fused qkv and gate_up
    ("opt", "no self_attn.o_proj, mlp.up_proj, mlp.down_proj"),
    ("olmo", "its modeling code was not checked"),
])
def test_other_families_are_refused_naming_what_is_missing(arch, missing):
    torch.manual_seed(0)
    model = tiny_model(arch) if arch != "olmo" else tf.AutoModelForCausalLM.from_config(tf.OlmoConfig(**SMALL))
    with pytest.raises(UserError, match="Structured pruning supports the LLaMA, Mistral") as error:
        validate(model, PruneConfig(pattern="structured"))
    assert missing in str(error.value)


def test_too_large_a_fraction_is_refused_against_the_model():
    with pytest.raises(UserError, match="leave it no MLP channel"):
        validate(tiny_model("llama"), PruneConfig(pattern="structured", sparsity=0.97))


def test_cli_prunes_structurally_end_to_end_and_the_export_is_smaller(capsys, tmp_path, tiny_model_dir, text_file):
    code, err = run(capsys, prune_args(tiny_model_dir, tmp_path / "o", "--pattern", "structured", "--method", "flap",
                                       "--sparsity", "0.3", "--json", "--nsamples", "4", "--seqlen", "32",
                                       calib=text_file))
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "pruning_report.json").read_text())
    assert report["pattern"] == "structured" and report["parameters"]["after"] < report["parameters"]["before"]
    assert "block 0: kept" in err and "MLP channels" in err
    assert "Structured pruning with **flap**" in (tmp_path / "o" / "README.md").read_text()
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert sum(p.numel() for p in loaded.parameters()) == report["parameters"]["after"]
    size = sum(p.stat().st_size for p in (tmp_path / "o").glob("*.safetensors"))
    assert size < sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize("extra,message", [
    (["--pattern", "structured", "--method", "sparsegpt"], "SparseGPT scores single weights"),
    (["--method", "flap"], "FLAP removes whole channels and heads"),
    (["--pattern", "structured", "--owl"], "OWL works on single weights"),
    (["--pattern", "structured", "--offload"], "changes the blocks' shapes"),
    (["--pattern", "2:4", "--widths", "adaptive"], "Adaptive widths"),
])
def test_cli_refuses_structured_misuse_before_loading(capsys, tmp_path, tiny_model_dir, no_load, extra, message):
    before = snapshot(tiny_model_dir)
    code, err = run(capsys, prune_args(tiny_model_dir, tmp_path / "o", *extra))
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists() and snapshot(tiny_model_dir) == before


def test_cli_refuses_a_fraction_that_leaves_a_block_nothing_once_the_shapes_are_known(capsys, tmp_path, tiny_model_dir,
                                                                                      text_file):
    code, err = run(capsys, prune_args(tiny_model_dir, tmp_path / "o", "--pattern", "structured", "--sparsity", "0.97",
                                       calib=text_file))
    error = err.strip().splitlines()[-1]  # after the loading progress
    assert code == 2 and error.startswith("error: ") and "would leave it no MLP channel" in error, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
