"""Do runs of the same settings start from the same numbers? Each run, in a fresh process as a benchmark's setting:
load the built-in model, do a benchmark's warm-up (six 4096^3 fp32 matmuls) with a thread sampling the process's
memory every 20 ms (as p1.py's PeakRss), then the calibration's first forward as the engine runs it, up to block 0's
o_proj; it prints digests of the first batch's rotary cosines (which every block's pass replays) and of o_proj's
input. `--unsettled` skips devices.settle_cpu_kernels, to show what it prevents.
Usage: python benchmarks/determinism.py [--runs 8] [--unsettled] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import threading

from fresh import each_in_fresh_process  # benchmarks/ is on sys.path when a script here runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def digest(tensor) -> str:
    return hashlib.md5(tensor.contiguous().float().numpy().tobytes()).hexdigest()[:12]


def first_forward(unsettled: bool) -> dict:
    import psutil
    import torch

    from wanda_gui.core import models
    from wanda_gui.core.architecture import StopForward, capture_block_inputs, find_blocks
    from wanda_gui.core.calibration import calibration_windows

    if unsettled:
        models.settle_cpu_kernels = lambda: None
    loaded = models.load_model("builtin", "cpu", None)
    windows, _ = calibration_windows(loaded.tokenizer, "builtin", 2, 512, 0)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    for _ in range(6):
        a @ b
    stop = threading.Event()

    def sample():
        process = psutil.Process()
        while not stop.wait(0.02):
            process.memory_info()

    threading.Thread(target=sample, daemon=True).start()
    _, blocks = find_blocks(loaded.model)
    seen = {}

    def record(module, args):
        seen["o_proj input"] = digest(args[0])
        raise StopForward

    with torch.inference_mode():
        hidden, calls = capture_block_inputs(loaded.model, blocks, windows, 2, torch.device("cpu"))
        handle = blocks[0].self_attn.o_proj.register_forward_pre_hook(record)
        try:
            calls[0](blocks[0], hidden)
        except StopForward:
            pass
        handle.remove()
    stop.set()
    cos, sin = calls[0].kwargs["position_embeddings"]
    return {"cos": digest(cos), "sin": digest(sin), **seen}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--unsettled", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(first_forward(args.unsettled)))
        return 0
    results = each_in_fresh_process(__file__, [["--unsettled"] if args.unsettled else []] * args.runs, args.out)
    counts = collections.Counter(tuple(sorted(r.items())) for r in results)
    print(f"{len(counts)} distinct result(s) in {args.runs} runs" + (" (unsettled)" if args.unsettled else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
