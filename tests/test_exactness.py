"""Exact values, not just plausible ones: statistics, perplexity, windows, sparsity bookkeeping, export, CLI, cancel.

Each test here was checked against a copy of the package with one bug planted (issue 8) and fails on it.
"""

import copy
import json
import math
import threading

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from torch import nn

from conftest import SMALL, tiny_model
from wanda_gui.core import events as ev
from wanda_gui.core.architecture import find_blocks, find_linears, weight_out_in
from wanda_gui.core.calibration import sample_windows, tokenize
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.runs import drain
from wanda_gui.core.evaluate import perplexity
from wanda_gui.core.export import export_model, make_report
from wanda_gui.core.models import load_model

CALIB = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(5))


def pruned_events(model, config, calibration=CALIB):
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
        stats = input_sq_means(upstream_pruned, linears, CALIB)
        q = stats[f"{prefix}.{i}.self_attn.q_proj"]
        for other in ("self_attn.o_proj", "mlp.gate_proj"):  # same width as q's input, another tensor
            assert not torch.allclose(stats[f"{prefix}.{i}.{other}"], q, rtol=0.05), other
        for name, linear in linears.items():
            expected = weight_out_in(linear).double().abs() * stats[name].sqrt().unsqueeze(0)
            got = torch.from_numpy(events[name].score_map).double()  # <= 128 x 128: the map is the score itself
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7), (name, (got - expected).abs().max())


# (2) perplexity is exp of the mean next-token loss, as transformers computes it
def test_perplexity_is_exp_of_the_mean_of_transformers_own_losses(tiny_tokenizer, text_file):
    """Not the mean of per-window exp(loss), and with labels shifted by one token."""
    model = tiny_model("llama", seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # windows' losses spread widely, so exp(mean) and mean(exp) differ clearly
    text = text_file.read_text()
    seqlen, nwindows = 32, 6
    ids = tokenize(tiny_tokenizer, text)
    windows = ids[: nwindows * seqlen].view(nwindows, seqlen)
    with torch.inference_mode():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in windows]
    expected = math.exp(torch.stack(losses).mean().item())
    mean_of_exp = torch.stack(losses).exp().mean().item()
    assert abs(mean_of_exp - expected) > 1e-3 * expected  # the test can tell the two apart

    result = perplexity(model, tiny_tokenizer, text, seqlen=seqlen, nwindows=nwindows, batch_size=4)
    assert result.nwindows == nwindows and result.tokens == nwindows * seqlen
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


# (3) calibration starts: randint(0, len - seqlen - 1), every start reachable, none beyond
def test_calibration_starts_cover_exactly_the_protocols_range():
    seqlen = 16
    ids = torch.arange(seqlen + 2)  # two possible starts: 0 and 1
    windows = sample_windows(ids, 200, seqlen, seed=3)
    starts = set(windows[:, 0].tolist())
    assert starts == {0, 1}
    assert windows.shape == (200, seqlen) and (windows[:, 1:] - windows[:, :-1] == 1).all()


# (4) the exported config carries no quantization_config, even when the loaded model's had one
def test_export_drops_a_quantization_config(tmp_path, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    loaded.model.config.quantization_config = {"quant_method": "gguf", "bits": 4}  # as a GGUF-loaded model has
    summary = drain(prune(loaded.model, PruneConfig(method="magnitude", sparsity=0.5)))
    report = make_report(loaded.info, summary, None, {"load": 0.0})
    out = export_model(loaded.model, loaded.tokenizer, tmp_path / "out", report, source=loaded.path)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["hidden_size"] == SMALL["hidden_size"]
    tf.AutoModelForCausalLM.from_pretrained(out)  # and it loads as a plain model


# (5) the CLI's --seed draws the calibration windows
def cli_masks(tmp_path, tiny_model_dir, text_file, seed, name):
    """Prune with the CLI in-process; return its report and every exported weight's zero mask."""
    from wanda_gui.cli import main

    out = tmp_path / name
    code = main(["prune", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "2",
                 "--seqlen", "16", "--seed", str(seed), "--out", str(out)])
    assert code == 0
    weights = {}
    for path in sorted(out.glob("*.safetensors")):
        weights.update(load_file(path))
    report = json.loads((out / "pruning_report.json").read_text())
    return report, {k: v == 0 for k, v in weights.items() if "layers." in k and v.dim() == 2}


def test_cli_seed_chooses_the_calibration_windows(tmp_path, tiny_model_dir, text_file):
    report_a, masks_a = cli_masks(tmp_path, tiny_model_dir, text_file, 1, "a")
    report_b, masks_b = cli_masks(tmp_path, tiny_model_dir, text_file, 2, "b")
    _, masks_b2 = cli_masks(tmp_path, tiny_model_dir, text_file, 2, "b2")
    assert report_a["calibration"]["seed"] == 1 and report_b["calibration"]["seed"] == 2
    assert masks_a.keys() == masks_b.keys() and len(masks_a) == 14
    assert all(torch.equal(masks_b[k], masks_b2[k]) for k in masks_b)  # same seed, same masks
    differing = [k for k in masks_a if not torch.equal(masks_a[k], masks_b[k])]
    assert len(differing) >= len(masks_a) // 2, differing  # another seed, other windows, other masks


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
    calibration = CALIB % 128
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
    for e in prune(model, PruneConfig(restore_on_abort=False), CALIB, cancel=cancel):
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
