"""The prune phase against its matmul floor on a model built from a config with random weights: the shapes, not
the values, set the cost, so this measures any size without downloading it (a 1B-class LLaMA by default).

floor = 2 passes x 2 FLOPs x (parameters in pruned linears) x (calibration tokens) / (best dense matmul rate
measured now on the same device and dtype); ratio = prune seconds / floor (PROTOCOL.md).
Usage: python benchmarks/floor.py --shape llama-1b --device cuda --dtype bf16 --nsamples 64 --seqlen 512
       [--methods wanda sparsegpt] [--out benchmarks/floor-cuda.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # LLaMA-architecture configs: the built-in model's (P1's shapes) and a Llama-3.2-1B-like one
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main() -> int:
    import torch
    import transformers as tf

    from p1 import PeakRss, matmul_times
    from wanda_gui.core.architecture import find_linears
    from wanda_gui.core.config import PruneConfig
    from wanda_gui.core.engine import prune
    from wanda_gui.core.runs import drain

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama-1b", choices=list(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["wanda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    config = tf.LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096)
    torch.manual_seed(0)
    with device:
        model = tf.LlamaForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    linear_parameters = sum(m.weight.numel() for block in model.model.layers for m in find_linears(block).values())
    calibration = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    tokens = calibration.numel()
    flops = 2 * 2 * linear_parameters * tokens
    results = []
    for method in args.methods:
        rates = matmul_times(device, dtype)
        with PeakRss() as rss:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            summary = drain(prune(model, PruneConfig(method=method, restore_on_abort=False), calibration))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        rates += matmul_times(device, dtype)
        rate = max(rates)
        result = {
            "shape": args.shape, "method": method, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype, "statistics_dtype": "float32", "parameters": sum(p.numel() for p in model.parameters()),
            "linear_parameters": linear_parameters, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "prune_seconds": seconds, "engine_seconds": summary.seconds, "achieved_sparsity": summary.achieved_sparsity,
            "matmul_flops_per_second": rate, "floor_seconds": flops / rate, "ratio": seconds / (flops / rate),
            "peak_rss_bytes": rss.peak,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        }
        results.append(result)
        print(f"{args.shape} {method} {args.dtype} on {result['device']}: prune {seconds:.1f} s, floor "
              f"{result['floor_seconds']:.1f} s at {rate / 1e12:.1f} TFLOP/s, ratio {result['ratio']:.2f}", flush=True)
        with torch.no_grad():  # the next method starts from fresh random weights again
            torch.manual_seed(0)
            with device:
                model = tf.LlamaForCausalLM(config).to(dtype).eval()
            model.requires_grad_(False)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
