"""The app's Memory choice, measured: one session (the app's Workspace, what the page drives) loads a model whole or
block by block from disk, prunes it with Wanda 50%, and generates with the dense and the pruned model. Each setting
runs in a process of its own; reported: resident memory after loading, its peak while pruning and while chatting,
and the chat's tokens per second.

Usage: python benchmarks/app_offload.py [--model builtin|FOLDER] [--nsamples 16] [--seqlen 256] [--tokens 16]
       [--modes memory offload] [--out benchmarks/app-offload-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fresh import each_in_fresh_process  # noqa: E402


def measure(model: str, mode: str, nsamples: int, seqlen: int, tokens: int) -> dict:
    import psutil
    import torch

    from p1 import PeakRss
    from wanda_gui.app.pool import ModelPool
    from wanda_gui.app.workspace import Workspace
    from wanda_gui.core.config import PruneConfig

    gib = 1024 ** 3
    ws = Workspace(ModelPool())
    with PeakRss() as load:
        ws.load(model, "cpu", None, memory=mode)
    after_load = psutil.Process().memory_info().rss
    with PeakRss() as pruning:
        events = list(ws.prune(PruneConfig(restore_on_abort=False), "builtin", nsamples, seqlen, 0))
    assert type(events[-1]).__name__ == "RunFinished", events[-1]
    ids = ws.loaded.tokenizer("The history of the United States", return_tensors="pt").input_ids
    speed = {}
    with PeakRss() as chat:
        for name, m in (("dense", ws.dense_model), ("pruned", ws.pruned)):
            with torch.inference_mode():
                m.generate(ids, max_new_tokens=1, do_sample=False)  # warm
                started = time.perf_counter()
                out = m.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            speed[name] = round((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started), 2)
    info = ws.loaded.info
    return {"model": info.name, "mode": mode, "offloaded": ws.offloaded, "model_gib": round(info.memory_bytes / gib, 3),
            "resident_gib": round(ws.loaded.lazy.resident_bytes() / gib, 3) if ws.offloaded else None,
            "rss_after_load_gib": round(after_load / gib, 3), "peak_rss_load_gib": round(load.peak / gib, 3),
            "peak_rss_prune_gib": round(pruning.peak / gib, 3), "peak_rss_chat_gib": round(chat.peak / gib, 3),
            "chat_tokens_per_second": speed, "prune_seconds": round(events[-1].summary.seconds, 1),
            "calibration": {"nsamples": nsamples, "seqlen": seqlen}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["memory", "offload"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one mode in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.nsamples, args.seqlen, args.tokens)))
        return 0
    each_in_fresh_process(__file__, ([
        mode, "--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--tokens", str(args.tokens)] for mode in args.modes), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
