"""The block-by-block engine on tiny random models of every supported architecture."""

import copy
import hashlib
import threading

import pytest
import torch
import transformers as tf
from conftest import ARCHITECTURES, SMALL, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from wanda_gui.core import engine
from wanda_gui.core import events as ev
from wanda_gui.core.architecture import (
    BlockCall,
    capture_block_inputs,
    find_blocks,
    find_linears,
    weight_out_in,
)
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.errors import UserError
from wanda_gui.core.masks import Pattern, Selection, select
from wanda_gui.core.methods import base as method_base
from wanda_gui.core.methods.wanda import wanda_score
from wanda_gui.core.passes import collect_input_stats, run_block
from wanda_gui.core.runs import drain

CALIB = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(1))


def checksum(model):
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def block_linears(model):
    _, blocks = find_blocks(model)
    return [(name, m) for b in blocks for name, m in find_linears(b).items()]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_prunes_each_row_exactly(arch):
    model = tiny_model(arch)
    events = list(prune(model, PruneConfig(sparsity=0.5, batch_size=4), CALIB))
    assert isinstance(events[-1], ev.RunFinished), events[-1]
    linears = block_linears(model)
    assert events[0].total_linears == len(linears) >= 4
    for _, linear in linears:
        w = weight_out_in(linear)
        assert ((w == 0).sum(dim=1) == int(w.shape[1] * 0.5)).all()
    pruned = [e for e in events if isinstance(e, ev.LinearPruned)]
    assert len(pruned) == len(linears)
    assert all(e.score_map.dtype.name == "float32" and max(e.score_map.shape) <= 128 for e in pruned)
    assert events[-1].summary.achieved_sparsity == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_replayed_blocks_reproduce_the_models_own_hidden_states(arch):
    """Capture + replay with batches other than 1 gives exactly what the model computes itself, block after block
    (three blocks, so that a middle block's own arguments, e.g. Gemma's global attention, are exercised)."""
    torch.manual_seed(0)
    config = ARCHITECTURES[arch]()
    config.num_hidden_layers = 3
    if getattr(config, "layer_types", None):
        config.layer_types = (list(config.layer_types) * 3)[:3]  # Gemma3: sliding, full, sliding
    model = AutoModelForCausalLM.from_config(config).eval()
    _, blocks = find_blocks(model)
    assert len(blocks) == 3
    hidden, calls = capture_block_inputs(model, blocks, CALIB, batch_size=4, device=torch.device("cpu"))
    with torch.inference_mode():
        expected = model(input_ids=CALIB, output_hidden_states=True, use_cache=False).hidden_states
        for i in range(2):  # the last entry of hidden_states is usually after the final norm
            run_block(blocks[i], hidden, calls[i], 4, None)
            assert torch.allclose(hidden, expected[i + 1], atol=1e-5), (i, (hidden - expected[i + 1]).abs().max())


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_patterns_on_a_model(pattern):
    model = tiny_model("qwen2")
    p = Pattern.parse(pattern)
    drain(prune(model, PruneConfig(pattern=p, batch_size=2), CALIB))
    for _, linear in block_linears(model):
        w = weight_out_in(linear)
        kept = (w != 0).view(w.shape[0], -1, p.m).sum(-1)
        assert (kept <= p.n).all() and (kept == p.n).float().mean() > 0.99


def test_wanda_metric_matches_the_direct_formula():
    """Stats collected by hooks equal mean(x^2) over all tokens, and the mask follows |W| * sqrt of it."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    hidden = torch.randn(5, 7, 16) * torch.linspace(0.1, 10, 16)  # uneven feature scales
    linears = {"0": block[0], "2": block[2]}
    call = BlockCall((), {}, False)
    stats = collect_input_stats(block, linears, hidden, call, 2, None)
    x = hidden.reshape(-1, 16)
    assert torch.allclose(stats["0"], (x ** 2).mean(0), rtol=1e-5)
    x2 = torch.relu(block[0](x))
    assert torch.allclose(stats["2"], (x2 ** 2).mean(0), rtol=1e-5)
    direct = block[0].weight.abs() * x.norm(dim=0).unsqueeze(0)  # |W_ij| * ||X_j||_2
    score = wanda_score(block[0].weight, stats["0"])
    assert torch.allclose(score / score.max(), direct / direct.max(), rtol=1e-5)


def test_statistics_come_from_the_pruned_upstream():
    """Pruning block 0 changes what block 1 sees, and so block 1's mask (vs. dense-input statistics)."""
    model = tiny_model("llama", seed=3)
    dense = tiny_model("llama", seed=3)
    _, blocks = find_blocks(dense)
    hidden, calls = capture_block_inputs(dense, blocks, CALIB, 6, torch.device("cpu"))
    run_block(blocks[0], hidden, calls[0], 6, None)  # block 1's inputs from the *dense* block 0
    dense_stats = collect_input_stats(blocks[1], find_linears(blocks[1]), hidden, calls[1], 6, None)

    masks = {}
    for e in prune(model, PruneConfig(sparsity=0.5), CALIB):
        if isinstance(e, ev.LinearPruned) and e.block == 1:
            masks[e.name] = e
    name = "model.layers.1.mlp.down_proj"
    linear = find_linears(find_blocks(model)[1][1])["mlp.down_proj"]
    w_dense = find_linears(blocks[1])["mlp.down_proj"].weight
    dense_mask = select(wanda_score(w_dense, dense_stats["mlp.down_proj"]), Selection(0.5, Pattern()))
    assert name in masks
    assert not torch.equal(linear.weight == 0, dense_mask)


def test_magnitude_needs_no_calibration_and_matches_abs_weight():
    model = tiny_model("gpt2")
    before = [weight_out_in(m).clone() for _, m in block_linears(model)]
    drain(prune(model, PruneConfig(method="magnitude", sparsity=0.25), None))
    for w, (_, m) in zip(before, block_linears(model)):
        k = int(w.shape[1] * 0.25)
        expected = torch.zeros_like(w, dtype=torch.bool).scatter_(1, torch.sort(w.abs(), dim=1, stable=True)[1][:, :k], True)
        assert torch.equal(weight_out_in(m) == 0, expected)


def test_magnitude_layerwise_prunes_exact_layer_count():
    model = tiny_model("opt")
    drain(prune(model, PruneConfig(method="magnitude", sparsity=0.4, layerwise=True), None))
    for _, m in block_linears(model):
        assert int((m.weight == 0).sum()) == int(m.weight.numel() * 0.4)


def test_include_and_exclude_select_linears_by_name():
    model = tiny_model("llama")
    config = PruneConfig(include=("*.mlp.*",), exclude=("*down_proj",))
    events = list(prune(model, config, CALIB))
    names = [e.name for e in events if isinstance(e, ev.LinearPruned)]
    assert names and all(("gate_proj" in n or "up_proj" in n) for n in names)
    for name, m in block_linears(model):
        assert ((m.weight == 0).float().mean() > 0.4) == (name.endswith(("gate_proj", "up_proj")))


def test_cancel_restores_the_dense_weights_exactly():
    model = tiny_model("mistral")
    before = checksum(model)
    cancel = threading.Event()
    events = []
    for e in prune(model, PruneConfig(), CALIB, cancel=cancel):
        events.append(e)
        if isinstance(e, ev.LinearPruned) and e.done == 5:
            cancel.set()
    assert isinstance(events[-1], ev.RunCancelled) and events[-1].restored
    assert checksum(model) == before


def test_closing_the_stream_midway_restores_the_dense_weights():
    model = tiny_model("phi3")
    before = checksum(model)
    stream = prune(model, PruneConfig(), CALIB)
    for e in stream:
        if isinstance(e, ev.LinearPruned):
            break
    assert checksum(model) != before
    stream.close()
    assert checksum(model) == before


def test_failure_mid_run_restores_and_names_the_layer(monkeypatch):
    model = tiny_model("llama")
    before = checksum(model)
    real_select, calls = method_base.select, []

    def failing_select(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("boom")
        return real_select(*args, **kwargs)

    monkeypatch.setattr(method_base, "select", failing_select)
    events = list(prune(model, PruneConfig(), CALIB))
    assert isinstance(events[-1], ev.RunFailed)
    assert events[-1].layer == "model.layers.1.self_attn.k_proj" and "boom" in events[-1].reason
    assert events[-1].restored and checksum(model) == before


@pytest.mark.parametrize("settings,calib,message", [
    (dict(sparsity=1.0), CALIB, "Sparsity must be in"),
    (dict(sparsity=-0.1), CALIB, "Sparsity must be in"),
    (dict(method="obs"), CALIB, "Unknown method"),
    ({}, None, "needs calibration data"),
    (dict(layerwise=True), CALIB, "magnitude-pruning option"),
    (dict(pattern="2:3"), CALIB, "multiple of 3"),
    (dict(include=("nothing*",)), CALIB, "select no linear"),
    (dict(batch_size=0), CALIB, "Batch size"),
])
def test_bad_configs_are_refused_before_any_weight_changes(settings, calib, message):
    model = tiny_model("llama")
    before = checksum(model)
    with pytest.raises(UserError, match=message):
        list(prune(model, PruneConfig(**settings), calib))
    assert checksum(model) == before


def test_events_arrive_in_order_with_block_timings():
    model = tiny_model("gpt_neox")
    events = list(prune(model, PruneConfig(), CALIB))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert kinds.count("BlockStarted") == kinds.count("BlockFinished") == 2
    finished = [e for e in events if isinstance(e, ev.BlockFinished)]
    assert all(e.seconds > 0 and e.peak_memory_bytes > 0 and e.sparsity == pytest.approx(0.5, abs=0.01) for e in finished)
    dones = [e.done for e in events if isinstance(e, ev.LinearPruned)]
    assert dones == list(range(1, events[0].total_linears + 1))


def test_lm_head_is_left_alone_by_default():
    model = tiny_model("llama")
    head = model.lm_head.weight.clone()
    drain(prune(model, PruneConfig(), CALIB))
    assert torch.equal(model.lm_head.weight, head)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_lm_head_pruned_with_wanda_from_its_real_inputs_when_asked(arch):
    """The head's statistic is what the (pruned) model feeds it: final norm of the last block's output.
    (Untied here: a tied head's pruning also changes the embeddings, and so what the model then feeds it.)"""
    torch.manual_seed(0)
    config = ARCHITECTURES[arch]()
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config).eval()
    dense_head = model.get_output_embeddings().weight.clone()
    events = list(prune(model, PruneConfig(prune_head=True), CALIB))
    head = model.get_output_embeddings()
    assert events[0].blocks[-1] == [n for n, m in model.named_modules() if m is head]
    assert isinstance(events[-1], ev.RunFinished) and len(events[-1].summary.layers) == events[0].total_linears

    seen = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.inference_mode():
        model(input_ids=CALIB, use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    expected = select(wanda_score(dense_head, (x ** 2).mean(0)), Selection(0.5, Pattern()))
    assert (expected == (head.weight == 0)).float().mean() > 0.999  # float summation order may flip a rare tie


def test_tied_embeddings_are_pruned_with_the_head():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    drain(prune(model, PruneConfig(method="magnitude", prune_head=True), None))
    embed = model.get_input_embeddings().weight
    assert embed is model.lm_head.weight and ((embed == 0).sum(dim=1) == embed.shape[1] // 2).all()


EXACT_CALIB = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(5))


def pruned_events(model, config, calibration=EXACT_CALIB):
    """Every event of a run that must finish."""
    events = list(prune(model, config, calibration))
    assert isinstance(events[-1], ev.RunFinished), events[-1]
    return events


def linear_events(events):
    return {e.name: e for e in events if isinstance(e, ev.LinearPruned)}


@torch.inference_mode()
def input_sq_means(model, linears: dict[str, nn.Module], ids) -> dict[str, torch.Tensor]:
    """mean(x_j^2) over every token of each linear's input, from the model's own forward with our own hooks."""
    seen = {name: [] for name in linears}
    handles = [m.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach().clone()))
               for name, m in linears.items()]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double().pow(2).mean(0) for name, xs in seen.items()}


# (1) every linear's statistics come from its own input
def test_each_linears_wanda_score_uses_its_own_inputs():
    """In a real block, q/k/v, o, gate/up and down each see a different tensor (o, gate and up of the same width
    as q's): each linear's score must be |W| * sqrt(mean x^2) of its own input, measured with our hooks on a model
    whose earlier blocks carry the run's final (pruned) weights and whose later blocks are still dense."""
    model = tiny_model("llama", seed=4)
    dense = copy.deepcopy(model)
    events = linear_events(pruned_events(model, PruneConfig(sparsity=0.5)))
    prefix, pruned_blocks = find_blocks(model)
    _, dense_blocks = find_blocks(dense)
    widths = {weight_out_in(m).shape[1] for m in find_linears(dense_blocks[0]).values()}
    assert len(find_linears(dense_blocks[0])) == 7 and widths == {64, 128}  # o, gate, up share q's width
    for i in range(len(dense_blocks)):
        upstream_pruned = copy.deepcopy(dense)
        _, blocks = find_blocks(upstream_pruned)
        for j in range(i):
            blocks[j].load_state_dict(pruned_blocks[j].state_dict())
        linears = {f"{prefix}.{i}.{name}": m for name, m in find_linears(blocks[i]).items()}
        stats = input_sq_means(upstream_pruned, linears, EXACT_CALIB)
        q = stats[f"{prefix}.{i}.self_attn.q_proj"]
        for other in ("self_attn.o_proj", "mlp.gate_proj"):  # same width as q's input, another tensor
            assert not torch.allclose(stats[f"{prefix}.{i}.{other}"], q, rtol=0.05), other
        for name, linear in linears.items():
            expected = weight_out_in(linear).double().abs() * stats[name].sqrt().unsqueeze(0)
            got = torch.from_numpy(events[name].score_map).double()  # <= 128 x 128: the map is the score itself
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7), (name, (got - expected).abs().max())


# (6) sparsity bookkeeping: achieved (not target) per linear, size-weighted per block, per type and overall
def uneven_llama():
    """A tiny LLaMA whose block 1 has a narrower MLP (96 wide, not 128), with most of its gate already zero."""
    model = tiny_model("llama", seed=6)
    mlp = find_blocks(model)[1][1].mlp
    torch.manual_seed(7)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False), nn.Linear(96, 64, bias=False)
    with torch.no_grad():
        mlp.gate_proj.weight[:80] = 0  # an already sparse layer: 5/6 zeros before pruning
    return model.requires_grad_(False)


def test_sparsity_reports_are_achieved_and_weighted_by_size():
    model = uneven_llama()
    events = pruned_events(model, PruneConfig(method="magnitude", sparsity=0.73, layerwise=True))
    prefix, blocks = find_blocks(model)
    zeros, sizes = {}, {}
    for i, block in enumerate(blocks):
        for name, m in find_linears(block).items():
            zeros[f"{prefix}.{i}.{name}"], sizes[f"{prefix}.{i}.{name}"] = int((m.weight == 0).sum()), m.weight.numel()
    assert len(set(sizes.values())) >= 3 and zeros["model.layers.1.mlp.gate_proj"] == 80 * 64

    for name, e in linear_events(events).items():
        assert e.sparsity == pytest.approx(zeros[name] / sizes[name], abs=1e-12), name
    assert linear_events(events)["model.layers.0.mlp.gate_proj"].sparsity != 0.73  # int(8192 * 0.73) / 8192

    for e in (e for e in events if isinstance(e, ev.BlockFinished)):
        names = [n for n in sizes if n.startswith(f"{prefix}.{e.index}.")]
        assert e.sparsity == pytest.approx(sum(zeros[n] for n in names) / sum(sizes[n] for n in names), abs=1e-12)

    summary = events[-1].summary
    assert summary.achieved_sparsity == pytest.approx(sum(zeros.values()) / sum(sizes.values()), abs=1e-12)
    assert summary.pruned_parameters == sum(sizes.values())
    kinds = {n.rsplit(".", 1)[-1] for n in sizes}
    for kind in kinds:
        names = [n for n in sizes if n.endswith("." + kind)]
        expected = sum(zeros[n] for n in names) / sum(sizes[n] for n in names)
        assert summary.by_type[kind] == pytest.approx(expected, abs=1e-12), kind
    gates = [n for n in sizes if n.endswith(".gate_proj")]
    unweighted = sum(zeros[n] / sizes[n] for n in gates) / len(gates)
    assert abs(summary.by_type["gate_proj"] - unweighted) > 1e-3  # the model tells weighted from unweighted apart
    assert {layer.name: layer.sparsity for layer in summary.layers} == pytest.approx(
        {n: zeros[n] / sizes[n] for n in sizes}, abs=1e-12)


# (7) the LM head's statistic is mean(x^2) over every token of what the model feeds it
def test_lm_head_statistic_is_the_mean_square_of_its_input():
    """The head's score map (128 x 64, so unpooled) is |W| * sqrt(mean x^2), x the final hidden states of the
    pruned blocks after the final norm: a statistic divided by the wrong count scales every score, not the mask."""
    torch.manual_seed(8)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**SMALL, "vocab_size": 128},
                                                               tie_word_embeddings=False)).eval().requires_grad_(False)
    dense_head = model.lm_head.weight.detach().clone()
    calibration = EXACT_CALIB % 128
    events = linear_events(pruned_events(model, PruneConfig(prune_head=True), calibration))
    stats = input_sq_means(model, {"lm_head": model.lm_head}, calibration)["lm_head"]
    expected = dense_head.double().abs() * stats.sqrt().unsqueeze(0)
    got = torch.from_numpy(events["lm_head"].score_map).double()
    assert got.shape == expected.shape == (128, 64)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7), (got / expected).median()


# (8) a cancel with restore off says it did not restore, and leaves the pruned weights as they are
def test_cancel_without_restore_reports_that_nothing_was_restored():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    cancel = threading.Event()
    events = []
    for e in prune(model, PruneConfig(restore_on_abort=False), EXACT_CALIB, cancel=cancel):
        events.append(e)
        if isinstance(e, ev.LinearPruned) and e.done == 3:
            cancel.set()
    assert isinstance(events[-1], ev.RunCancelled)
    assert events[-1].restored is False
    pruned = [e.name for e in events if isinstance(e, ev.LinearPruned)]
    weights, dense_weights = dict(model.named_modules()), dict(dense.named_modules())
    for name in pruned:
        w = weights[name].weight
        assert (w == 0).float().mean() == 0.5 and not torch.equal(w, dense_weights[name].weight), name
