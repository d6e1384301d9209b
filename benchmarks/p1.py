"""Benchmark setting P1 (PROTOCOL.md): built-in model, Wanda and SparseGPT at 50% unstructured, 2:4 and 4:8,
64 x 512 calibration, evaluation on 64 windows.

Each setting runs in a fresh process so that its memory figures are its own. Prints a table and writes JSON.
Usage: python benchmarks/p1.py [--out benchmarks/p1.json] [--runs wanda:unstructured sparsegpt+owl:unstructured
       sparsegpt+reconstruct:2:4 wanda-variant:unstructured] [--all] [--device cpu]
A run is METHOD[+OPTION[=EFFORT]...]:PATTERN, the options being keys of the registry's OPTIONS (owl, dsnot,
reconstruct...), an effort one of the option's settings (sparsegpt+reconstruct=thorough:2:4);
--all runs every method, alone and with each option it takes, at 50%, 2:4 and 4:8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

from fresh import each_in_fresh_process  # benchmarks/ is on sys.path when a script here runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def matmul_times(device, dtype, n: int = 4096, repeats: int = 5) -> list[float]:
    """FLOP/s of a few dense n x n x n matmuls, measured now on the same device and dtype."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return [2 * n ** 3 / t for t in times]


class PeakRss:
    """Samples the process's resident memory every 20 ms; peak since start()."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


DEFAULT_RUNS = ["wanda:unstructured", "wanda:2:4", "sparsegpt:unstructured", "sparsegpt:2:4", "sparsegpt:4:8",
                "wanda-variant:unstructured", "ria:unstructured", "ria:2:4"]


def config_method(method: str, variant: bool) -> str:
    return "wanda" if variant else method


def machine(device) -> dict:
    """What the figures depend on beyond the code: the processor, its cores, and its bf16 (reconstruction's Adam runs
    in bf16 where devices.native_bf16 says so)."""
    import psutil
    import torch

    from wanda_gui.core.devices import native_bf16

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as info:
                name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
        except OSError:
            name = ""
    return {"processor": name, "cores": psutil.cpu_count(), "amx": torch.cpu._is_amx_tile_supported(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "native_bf16": native_bf16(device)}


def input_widths(model) -> list[int]:
    """The width of every distinct input the decoder blocks' linears read (q/k/v share one, gate/up another), from
    hooks on one short forward."""
    import torch

    from wanda_gui.core.architecture import find_blocks, find_linears

    seen: dict[int, torch.Tensor] = {}  # each input held, so that no id is reused by a later tensor

    def record(module, args) -> None:  # a pre-hook that returned a value would replace the linear's input
        seen.setdefault(id(args[0]), args[0])

    handles = [m.register_forward_pre_hook(record) for block in find_blocks(model)[1] for m in find_linears(block).values()]
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return [x.shape[-1] for x in seen.values()]


def every_run() -> list[str]:
    """Every method alone and with each option it takes, at 50%, 2:4 and 4:8, from the registry."""
    from wanda_gui.core.config import PruneConfig
    from wanda_gui.core.errors import UserError
    from wanda_gui.core.methods import METHODS, OPTIONS

    runs = []
    for method in METHODS:
        for options in [(), *((key,) for key in OPTIONS)]:
            for pattern in ("unstructured", "2:4", "4:8"):
                try:
                    PruneConfig(method=method, pattern=pattern, options=options)
                except UserError:
                    continue
                runs.append(f"{'+'.join((method, *options))}:{pattern}")
    return runs


def generation_speed(loaded) -> float:
    """Generation tokens/s as the app and `prune --speed` measure it (core.speed: batch 1, 128 new tokens after a
    512-token prompt, median of 3)."""
    from wanda_gui.core.speed import measure_speed

    return measure_speed(loaded.model, loaded.tokenizer, loaded.info.device)["generation_tokens_per_second"]


def dense_figures(loaded, nwindows: int, cache: str | None):
    """The dense model's perplexity and generation speed: measured by the first run of a benchmark and read from
    `cache` by the others (they cannot differ: the same model, windows and device)."""
    from wanda_gui.core.evaluate import Perplexity, perplexity

    if cache and os.path.exists(cache):
        saved = json.load(open(cache))
        if saved["perplexity"]["nwindows"] == nwindows:
            return Perplexity(**saved["perplexity"]), saved["tokens_per_second"]
    dense = perplexity(loaded.model, loaded.tokenizer, seqlen=512, nwindows=nwindows)
    speed = generation_speed(loaded)
    if cache:
        json.dump({"perplexity": dense.__dict__, "tokens_per_second": speed}, open(cache, "w"))
    return dense, speed


def run_setting(run: str, device_name: str, dtype_name: str | None, nwindows: int, dense_cache: str | None = None) -> dict:
    import torch

    from wanda_gui.core.calibration import calibration_windows
    from wanda_gui.core.config import PruneConfig, recipe
    from wanda_gui.core.engine import prune
    from wanda_gui.core.runs import drain
    from wanda_gui.core.evaluate import perplexity
    from wanda_gui.core.export import make_report
    from wanda_gui.core.masks import Pattern
    from wanda_gui.core.methods import get_method
    from wanda_gui.core.models import load_model
    from wanda_gui.core.statistics import Hessian

    name, pattern = run.split(":", 1)
    named = recipe(name)
    method = named.pop("method")
    variant = method == "wanda-variant"  # Wanda with the reference's α-variant
    t = time.perf_counter()
    loaded = load_model("builtin", device_name, dtype_name)
    load_seconds = time.perf_counter() - t
    device = torch.device(loaded.info.device)
    windows, calibration = calibration_windows(loaded.tokenizer, "builtin", 64, 512, 0)
    dense, dense_speed = dense_figures(loaded, nwindows, dense_cache)
    dtype = next(loaded.model.parameters()).dtype
    rates = matmul_times(device, dtype)

    import gc

    gc.collect()
    with PeakRss() as rss:
        before = rss.peak
        config = PruneConfig(method="wanda" if variant else method, pattern=Pattern.parse(pattern), wanda_variant=variant,
                             restore_on_abort=False, **named)
        summary = drain(prune(loaded.model, config, windows))
    rates += matmul_times(device, dtype)  # measured on both sides of the prune phase
    rate, median_rate = max(rates), statistics.median(rates)  # the best is the floor: the stricter ratio
    pruned = perplexity(loaded.model, loaded.tokenizer, seqlen=512, nwindows=nwindows)
    pruned_speed = generation_speed(loaded)

    config = loaded.model.config
    tokens = windows.numel()
    linear_flops = 2 * 2 * loaded.info.linear_parameters * tokens
    # a method that builds input Hessians (SparseGPT, ALPS) does 2 x width^2 FLOPs a token for each distinct input
    hessian_flops = 2 * tokens * sum(w * w for w in input_widths(loaded.model)) if \
        get_method(config_method(method, variant)).statistic is Hessian else 0
    attention_flops = 2 * config.num_hidden_layers * 64 * 4 * 512 ** 2 * config.num_attention_heads * config.head_dim
    report = make_report(loaded.info, summary, calibration,
                         {"load": load_seconds, "evaluation": dense.seconds + pruned.seconds},
                         {"dense": dense.__dict__, "pruned": pruned.__dict__},
                         {"dense": dense_speed, "pruned": pruned_speed})
    report.pop("layers")
    report["run"] = run
    report["machine"] = machine(device)
    report["peak_rss_bytes"] = rss.peak
    report["rss_added_by_pruning_bytes"] = rss.peak - before
    if device.type == "cuda":
        report["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    report["floor"] = {
        "matmul_flops_per_second": rate,
        "linear_flops": linear_flops,
        "attention_flops": attention_flops,
        "ratio": summary.seconds / (linear_flops / rate),
        "ratio_with_attention": summary.seconds / ((linear_flops + attention_flops) / rate),
        "hessian_flops": hessian_flops,
        "ratio_own": summary.seconds / ((linear_flops + attention_flops + hessian_flops) / rate),
        "median_matmul_flops_per_second": median_rate,
        "ratio_to_median_matmul": summary.seconds / (linear_flops / median_rate),
    }
    return report


def table(reports: list[dict]) -> str:
    gib = 1024 ** 3
    rows = [("method", "pattern", "sparsity", "prune s", "floor s", "ratio", "(own)", "+RSS GiB", "peak RSS GiB", "ppl dense",
             "ppl pruned", "tok/s dense", "tok/s pruned")]
    for r in reports:
        f = r["floor"]
        rows.append((r.get("run", r["method"]).split(":")[0], r["pattern"], f"{r['achieved_sparsity']:.4f}", f"{r['seconds']['calibration_and_pruning']:.1f}",
                     f"{f['linear_flops'] / f['matmul_flops_per_second']:.1f}", f"{f['ratio']:.2f}",
                     f"{f['ratio_own']:.2f}",
                     f"{r['rss_added_by_pruning_bytes'] / gib:.2f}", f"{r['peak_rss_bytes'] / gib:.2f}",
                     f"{r['perplexity']['dense']['perplexity']:.3f}", f"{r['perplexity']['pruned']['perplexity']:.3f}",
                     f"{r['generation_tokens_per_second']['dense']:.1f}",
                     f"{r['generation_tokens_per_second']['pruned']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="method:pattern, e.g. sparsegpt:2:4")
    parser.add_argument("--all", action="store_true", help="every method, alone and with each option, at 50%%, 2:4, 4:8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--nwindows", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one setting in this process
    parser.add_argument("--dense-cache", default=None, help=argparse.SUPPRESS)  # internal: the dense figures' file
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_setting(args.one, args.device, args.dtype, args.nwindows, args.dense_cache)))
        return 0
    dense_cache = os.path.join(tempfile.mkdtemp(prefix="p1-dense-"), "dense.json")
    dtype = ["--dtype", args.dtype] if args.dtype else []
    reports = each_in_fresh_process(__file__, (
        [run, "--device", args.device, "--nwindows", str(args.nwindows), "--dense-cache", dense_cache, *dtype]
        for run in (every_run() if args.all else args.runs)), args.out,
        show=lambda r: f"{r['run']}: perplexity {r['perplexity']['pruned']['perplexity']:.3f}, "
                       f"prune {r['seconds']['calibration_and_pruning']:.1f} s")
    print(f"P1 on {reports[0]['device']} {reports[0]['dtype']}: 64 x 512 calibration (seed 0), "
          f"eval {args.nwindows} x 512; matmul best {reports[0]['floor']['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s "
          f"(floor = linear FLOPs at the best rate; '(own)' counts attention and a method's Hessians too)")
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
