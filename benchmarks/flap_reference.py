"""The FLAP reference code (CASIA-IVA-Lab/FLAP, An et al., AAAI 2024) measured on benchmark setting P1 (PROTOCOL.md):
its own prune_flap (WIFV metric, UL-UM or AL-AM structure, bias compensation on) on the built-in model, with the
P1 calibration windows (64 x 512, seed 0) and perplexity on the 64 P1 evaluation windows, so that its figures sit
beside ours. Prints a table and writes JSON.

Usage: python benchmarks/flap_reference.py --flap-dir /tmp/flap_ref [--out benchmarks/flap-reference-cpu.json]
       [--runs AL-AM:0.2 AL-AM:0.3 UL-UM:0.2 UL-UM:0.3 UL-UM:0.2667]
--flap-dir is a checkout of https://github.com/CASIA-IVA-Lab/FLAP (measured at 3bb57db, its last commit). A run is
STRUCTURE:PRUNING_RATIO, the ratio being FLAP's --pruning_ratio.

What FLAP's pruning_ratio means: the fraction of the decoder linears' weights (q, k, v, o, gate, up, down) to
remove, counted in whole units: an attention unit weighs 512/3 MLP channels, a channel being 3 x hidden weights
(gate row, up row, down column). AL-AM picks the cut over all blocks and modules so that the kept units weigh
(1 - ratio) of the total: ratio = our measure (fraction of the decoder linears' weights removed), up to one unit.
UL-UM removes int(ratio x units) attention units and int(ratio x 1536) MLP channels from every block: with only 3
key/value groups a block, int(0.2 x 3) = int(0.3 x 3) = 0, so UL-UM removes MLP channels only and removes less than
the ratio says (the JSON gives both); UL-UM:0.2667 removes 409 of 1536 channels a block, 19.97% of the weights,
to compare at equal parameters removed. No UL-UM ratio removes 30%: below 1/3 no group goes and the channels make
at most 25%; from 1/3 on, one group a block (8.3%) and a third of the channels (25%) go, at least 33.3%. FLAP adds
an output bias to o_proj and down_proj (hidden values each): counted apart from the weights.

The reference is read from --flap-dir and patched in memory only (nothing of it is committed here):
  lib/data.py        replaced by get_loaders returning the P1 calibration windows (FLAP reads WikiText-2 from the
                     hub: offline here, and not the protocol); lib/layerwrapper.py runs unmodified.
  lib/prune.py       executed with these text replacements, each checked to match as often as expected:
    1. `W_metric.cuda()` -> `W_metric`: CPU (the thresholds are sorted on the GPU in the reference).
    2. `.type(torch.half)` dropped: the model runs in fp32 (the protocol's dtype); half-precision mean inputs
       would meet fp32 weights in the bias matmul and fail. The reference runs everything in fp16 on a GPU.
    3. `torch.zeros((2048, ...` -> `torch.zeros((len(dataloader), ...`: memory only; the reference allocates 2048
       calibration rows whatever nsamples is (4.8 GB at 512 tokens) and reads only the first nsamples.
    4. grouped-query attention (FLAP assumes num_heads == num_kv_heads and head_dim 128, its issue #14): the
       attention unit becomes a key/value group (3 query heads and their key/value head, 192 o_proj input
       channels): `reshape(-1, 128)` and `repeat_interleave(128)` take 192, and k_proj/v_proj keep the rows of the
       kept groups (`repeat_interleave(64)`), not those of the query mask. The group's weight relative to an MLP
       channel is (2 x 3 + 2) x 64 / 3 = 512/3, FLAP's constant unchanged (checked at run time).
  At run time, on the transformers 5 model (FLAP ships its own modeling_llama.py for transformers 4.28):
    5. o_proj and down_proj get a zero bias, as FLAP's get_llm and modeling file give them, for the compensation.
    6. each self_attn gets num_heads = the number of key/value groups, the units UL-UM counts (transformers 5's
       attention has no such attribute).
    7. a forward pre-hook gives each decoder layer its rotary position_embeddings when FLAP's calls pass only
       attention_mask and position_ids (in transformers 4.28 the attention computed them itself).
Before measuring, check_patches runs them on a tiny random GQA model and checks the result against its definition.
Not used, so not patched: the --unstr (mask only) path, UL-MM/AL-MM (--remove_heads), wanda_sp and mag_sp.

Time only: prune_flap computes its statistics (each o_proj/down_proj input's mean and fluctuation, BiasGPT) on the
dense model, whatever the structure and ratio. The first run computes them with FLAP's own forward passes and
records them as FLAP frees them; later runs in the process give FLAP nsamples = 0 (no forward pass) and BiasGPT
objects holding the recorded statistics, so they differ from a full run in time only (their seconds are selection
and compression; the JSON says which runs replayed). --no-replay runs every one in full: AL-AM 0.3 so run gave the
same blocks and perplexity to the last digit as replayed, in 189 s of calibration and pruning (contended).

flap-reference-cpu.json: `python benchmarks/flap_reference.py --flap-dir /tmp/flap_ref --threads 1`, on 2 CPU cores
shared with other work (load average 9-15): seconds are contended wall time; one thread, as FLAP's batch-1 forward
passes ran 3-4x slower on two threads there.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from wanda_gui.core.architecture import find_blocks, find_linears  # noqa: E402
from wanda_gui.core.calibration import (builtin_evaluation_text, calibration_windows, evaluation_windows,  # noqa: E402
                                        tokenize)
from wanda_gui.core.evaluate import perplexity  # noqa: E402
from wanda_gui.core.models import load_model  # noqa: E402

STRUCTURES = ("UL-UM", "AL-AM")
FLAP_ATTN_UNIT_WEIGHT = 512.0 / 3  # lib/prune.py's weight of one attention unit, in MLP channels


def text_patches(head_dim: int, group_channels: int) -> list[tuple[str, str, int]]:
    """(old, new, expected count) for lib/prune.py: patches 1-4 of the docstring."""
    return [
        ("W_metric.cuda()", "W_metric", 8),
        (".type(torch.half)", "", 2),
        ("inps = torch.zeros((2048,", "inps = torch.zeros((len(dataloader),", 1),
        ("reshape(-1, 128)", f"reshape(-1, {group_channels})", 4),
        ("reshape(len(layers), -1, 128)", f"reshape(len(layers), -1, {group_channels})", 1),
        ("            attn_mask = attn_mask.repeat_interleave(128)",
         f"            kv_mask = attn_mask.repeat_interleave({head_dim})\n"
         f"            attn_mask = attn_mask.repeat_interleave({group_channels})", 2),
        ("layer.self_attn.k_proj.weight.data[torch.where(attn_mask)[0]]",
         "layer.self_attn.k_proj.weight.data[torch.where(kv_mask)[0]]", 1),
        ("layer.self_attn.v_proj.weight.data[torch.where(attn_mask)[0]]",
         "layer.self_attn.v_proj.weight.data[torch.where(kv_mask)[0]]", 1),
        ("layer.self_attn.k_proj.out_features = attn_mask.sum().item()",
         "layer.self_attn.k_proj.out_features = kv_mask.sum().item()", 1),
        ("layer.self_attn.v_proj.out_features = attn_mask.sum().item()",
         "layer.self_attn.v_proj.out_features = kv_mask.sum().item()", 1),
    ]


def load_flap_prune(flap_dir: Path, calibration: list, head_dim: int, group_channels: int) -> types.ModuleType:
    """FLAP's lib.prune, patched in memory, with lib.data answering the P1 calibration windows."""
    package = types.ModuleType("lib")
    package.__path__ = [str(flap_dir / "lib")]
    sys.modules["lib"] = package
    data = types.ModuleType("lib.data")
    data.get_loaders = lambda *args, **kwargs: (calibration, None)
    sys.modules["lib.data"] = data
    importlib.import_module("lib.layerwrapper")
    source = (flap_dir / "lib" / "prune.py").read_text()
    for old, new, count in text_patches(head_dim, group_channels):
        found = source.count(old)
        if found != count:
            raise SystemExit(f"{flap_dir}/lib/prune.py: expected {count} x {old!r}, found {found}: another version?")
        source = source.replace(old, new)
    module = types.ModuleType("lib.prune")
    module.__package__, module.__file__ = "lib", str(flap_dir / "lib" / "prune.py")
    sys.modules["lib.prune"] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


class Statistics:
    """FLAP's BiasGPT statistics in the order prune_flap frees them: recorded by one run, replayed by the next."""

    def __init__(self, base: type):
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        recorded = self.recorded

        class Recording(base):
            def free(self):
                recorded.append((self.fluc_inp.clone(), self.baseline_inp.clone()))
                super().free()

        self.recording = Recording
        self.base = base

    def replaying(self) -> type:
        replay = iter(self.recorded)

        class Replaying(self.base):
            def __init__(self, layer, metric):
                super().__init__(layer, metric)
                self.fluc_inp, self.baseline_inp = next(replay)

        return Replaying


def prepare_for_flap(model: nn.Module, seqlen: int) -> list:
    """Patches 5-7 of the docstring; returns the hook handles to remove after pruning."""
    config = model.config
    for layer in model.model.layers:
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
        layer.self_attn.num_heads = config.num_key_value_heads
    model.seqlen = seqlen
    rotary = model.model.rotary_emb

    def add_position_embeddings(module, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            kwargs["position_embeddings"] = rotary(args[0], kwargs["position_ids"])
        return args, kwargs

    return [layer.register_forward_pre_hook(add_position_embeddings, with_kwargs=True) for layer in model.model.layers]


def kept_rows(pruned: torch.Tensor, dense: torch.Tensor, size: int) -> torch.Tensor:
    """Which size-row slices of dense survive in pruned (FLAP keeps them in order)."""
    slices = dense.view(-1, size, dense.shape[1])
    return torch.stack([(slices == row).all(-1).all(-1) for row in pruned.view(-1, size, dense.shape[1])]).any(0)


@torch.no_grad()
def check_patches(flap_dir: Path) -> None:
    """FLAP, patched, on a tiny random GQA LLaMA (3 query heads a key/value group, head_dim 64): the pruned model's
    logits equal the dense model's with every removed head's output and MLP channel held at its calibration mean,
    which is what FLAP's bias compensation stands for; so the key/value rows kept belong to the query heads kept."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=384, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64)
    dense = LlamaForCausalLM(config).eval()
    calib, ids = torch.randint(0, 256, (8, 32)), torch.randint(0, 256, (2, 32))
    for structure, ratio in (("AL-AM", 0.3), ("UL-UM", 0.5)):
        model = copy.deepcopy(dense)
        flap = load_flap_prune(flap_dir, [(w[None], None) for w in calib], 64, 192)
        statistics = Statistics(flap.BiasGPT)
        flap.BiasGPT = statistics.recording
        hooks = prepare_for_flap(model, calib.shape[1])
        flap.prune_flap(types.SimpleNamespace(metrics="WIFV", structure=structure, pruning_ratio=ratio, nsamples=8,
                                              remove_heads=-1, unstr=False, seed=0), model, None, torch.device("cpu"))
        for h in hooks:
            h.remove()
        held = []
        for i, (pruned, layer) in enumerate(zip(model.model.layers, dense.model.layers)):
            groups = kept_rows(pruned.self_attn.k_proj.weight, layer.self_attn.k_proj.weight, 64)
            channels = kept_rows(pruned.mlp.up_proj.weight, layer.mlp.up_proj.weight, 1)
            for linear, kept, (_, mean) in ((layer.self_attn.o_proj, groups.repeat_interleave(192),
                                             statistics.recorded[2 * i]),
                                            (layer.mlp.down_proj, channels, statistics.recorded[2 * i + 1])):
                held.append(linear.register_forward_pre_hook(lambda m, a, k=kept, v=mean: (torch.where(k, a[0], v),)))
        expected = dense(ids).logits
        for h in held:
            h.remove()
        if not torch.allclose(model(ids).logits, expected, atol=1e-4):
            raise SystemExit(f"The patched FLAP ({structure}) does not prune whole key/value groups consistently.")


def decoder_linear_weights(model: nn.Module) -> int:
    _, blocks = find_blocks(model)
    return sum(m.weight.numel() for b in blocks for m in find_linears(b).values())


def added_biases(model: nn.Module) -> int:
    _, blocks = find_blocks(model)
    return sum(m.bias.numel() for b in blocks for m in find_linears(b).values() if m.bias is not None)


def sha256_int32(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def run(flap_dir: Path, structure: str, ratio: float, calib: torch.Tensor, tokenizer, nwindows: int,
        statistics: Statistics | None, replay: bool) -> tuple[dict, Statistics]:
    """One FLAP run; replay: take the statistics recorded by an earlier run instead of computing them."""
    started = time.perf_counter()
    loaded = load_model("builtin", device="cpu", dtype="fp32")
    model, config = loaded.model, loaded.model.config
    load_seconds = time.perf_counter() - started
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group_heads = config.num_attention_heads // config.num_key_value_heads
    group_channels = group_heads * head_dim
    group_weight = (2 * group_heads + 2) * head_dim / 3  # a group's q, k, v, o weights in MLP channels (3 x hidden)
    if not math.isclose(group_weight, FLAP_ATTN_UNIT_WEIGHT):
        raise SystemExit(f"An attention unit weighs {group_weight:.2f} MLP channels here, FLAP assumes 512/3: "
                         "its AL-AM ratio would not be the fraction of weights removed.")
    flap = load_flap_prune(flap_dir, [(w.unsqueeze(0), None) for w in calib], head_dim, group_channels)
    units_before, channels_before = config.num_key_value_heads, config.intermediate_size
    params_before, weights_before = sum(p.numel() for p in model.parameters()), decoder_linear_weights(model)
    hooks = prepare_for_flap(model, calib.shape[1])
    replayed = replay and statistics is not None
    if not replayed:
        statistics = Statistics(flap.BiasGPT)
    flap.BiasGPT = statistics.replaying() if replayed else statistics.recording
    args = types.SimpleNamespace(metrics="WIFV", structure=structure, pruning_ratio=ratio,
                                 nsamples=0 if replayed else len(calib), remove_heads=-1, unstr=False, seed=0)
    started = time.perf_counter()
    flap.prune_flap(args, model, tokenizer, torch.device("cpu"))
    prune_seconds = time.perf_counter() - started
    for h in hooks:
        h.remove()
    kept_groups = [layer.self_attn.k_proj.out_features // head_dim for layer in model.model.layers]
    kept_channels = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    if min(kept_groups) == 0:
        raise SystemExit(f"{structure} {ratio}: a block kept no attention group; transformers 5's attention cannot "
                         "run it (FLAP's own modeling file would output the o_proj bias alone).")
    weights_after, biases = decoder_linear_weights(model), added_biases(model)
    ppl = perplexity(model, tokenizer, seqlen=calib.shape[1], nwindows=nwindows)
    units_total = len(kept_groups) * (units_before * group_weight + channels_before)
    units_kept = sum(g * group_weight + c for g, c in zip(kept_groups, kept_channels))
    return {
        "structure": structure,
        "statistics": "replayed from the first run" if replayed else "computed",
        "metric": "WIFV",
        "bias_compensation": True,
        "flap_pruning_ratio": ratio,
        "flap_units_removed_fraction": 1 - units_kept / units_total,
        "decoder_linear_weights_before": weights_before,
        "decoder_linear_weights_after": weights_after,
        "removed_fraction_decoder_linears": 1 - weights_after / weights_before,
        "added_bias_parameters": biases,
        "parameters_before": params_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "kv_groups_kept_per_block": kept_groups,
        "mlp_channels_kept_per_block": kept_channels,
        "kv_groups_removed_fraction": 1 - sum(kept_groups) / (units_before * len(kept_groups)),
        "mlp_channels_removed_fraction": 1 - sum(kept_channels) / (channels_before * len(kept_channels)),
        "perplexity": ppl.perplexity,
        "seconds": {"load": load_seconds, "calibration_and_pruning": prune_seconds, "evaluation": ppl.seconds},
    }, statistics


def table(report: dict) -> str:
    lines = ["| structure | FLAP ratio | removed (decoder linears) | kv groups kept | MLP channels kept | perplexity | "
             "prune s | eval s |", "|---|---|---|---|---|---|---|---|"]
    dense = report["dense"]
    lines.append(f"| dense | 0 | 0.000 | {dense['kv_groups']} x {dense['blocks']} | {dense['mlp_channels']} x "
                 f"{dense['blocks']} | {dense['perplexity']:.3f} | | {dense['seconds']:.0f} |")
    for r in report["runs"]:
        lines.append(f"| {r['structure']} | {r['flap_pruning_ratio']} | {r['removed_fraction_decoder_linears']:.3f} | "
                     f"{sum(r['kv_groups_kept_per_block'])} | {sum(r['mlp_channels_kept_per_block'])} | "
                     f"{r['perplexity']:.3f} | {r['seconds']['calibration_and_pruning']:.0f}"
                     f"{' (replayed)' if r['statistics'] != 'computed' else ''} | "
                     f"{r['seconds']['evaluation']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flap-dir", type=Path, required=True, help="a checkout of CASIA-IVA-Lab/FLAP")
    parser.add_argument("--out", default="benchmarks/flap-reference-cpu.json")
    parser.add_argument("--runs", nargs="+",
                        default=["AL-AM:0.2", "AL-AM:0.3", "UL-UM:0.2", "UL-UM:0.3", "UL-UM:0.2667"])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nwindows", type=int, default=64)
    parser.add_argument("--no-replay", action="store_true", help="compute FLAP's statistics in every run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    runs = [(s, float(r)) for s, r in (spec.split(":") for spec in args.runs)]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.flap_dir / "lib" / "prune.py").is_file():
        raise SystemExit(f"{args.flap_dir} holds no lib/prune.py: give a checkout of CASIA-IVA-Lab/FLAP.")
    if any(s not in STRUCTURES for s, _ in runs):
        raise SystemExit(f"Structures measured here: {', '.join(STRUCTURES)}.")
    check_patches(args.flap_dir)
    commit = subprocess.run(["git", "-C", str(args.flap_dir), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None

    dense_model = load_model("builtin", device="cpu", dtype="fp32")
    tokenizer, config = dense_model.tokenizer, dense_model.model.config
    calib, calib_info = calibration_windows(tokenizer, "builtin", args.nsamples, args.seqlen, args.seed)
    evaluation = evaluation_windows(tokenize(tokenizer, builtin_evaluation_text()), args.seqlen, args.nwindows)
    dense_ppl = perplexity(dense_model.model, tokenizer, seqlen=args.seqlen, nwindows=args.nwindows)
    print(f"dense perplexity {dense_ppl}", flush=True)
    del dense_model
    report = {
        "model": "SmolLM2-135M-Instruct (built-in, fp32)",
        "reference": {"repository": "CASIA-IVA-Lab/FLAP", "commit": commit, "function": "lib.prune.prune_flap",
                      "patches": "see benchmarks/flap_reference.py's docstring"},
        "calibration": {**calib_info, "sha256_int32": sha256_int32(calib)},
        "evaluation": {"source": "builtin", "seqlen": args.seqlen, "stride": args.seqlen, "nwindows": len(evaluation),
                       "sha256_int32": sha256_int32(evaluation)},
        "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
        "note": "seconds are wall time on 2 CPU cores shared with other work while measured; a run whose "
                "statistics were replayed times FLAP's selection and compression only",
        "dense": {"perplexity": dense_ppl.perplexity, "seconds": dense_ppl.seconds, "blocks": config.num_hidden_layers,
                  "kv_groups": config.num_key_value_heads, "mlp_channels": config.intermediate_size},
        "runs": [],
    }
    statistics = None
    for structure, ratio in runs:
        result, statistics = run(args.flap_dir, structure, ratio, calib, tokenizer, args.nwindows, statistics,
                                 not args.no_replay)
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("per_block")}), flush=True)
        report["runs"].append(result)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # each finished run kept, as p1.py does
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
