"""Checks core.estimate against the built-in model: each setting runs in its own process, which measures the wall
seconds of the prune phase and the peak RSS that drawing the calibration windows and pruning add over the RSS
after loading (what a run in the app adds: it draws its windows, copies the pruned linears and prunes).

The loaded weights are memory-mapped from the safetensors file: pages count in RSS only once read. Any first
forward or prune reads them all (about +0.5 GiB of RSS for the built-in model), and that memory is the model's own
(ModelInfo.memory_bytes), not the run's; so the weights are read once before the baseline is taken. The RSS added
over the baseline right after load is reported too (`measured_rss_added_over_load_bytes`).

    python benchmarks/estimate_check.py            # all settings, JSON in benchmarks/estimate-check-cpu.json
    python benchmarks/estimate_check.py --only wanda-16x256

Wall seconds are compared only when the load average was below the core count (the "(busy)" rows: other work
shared the cores, so the time says nothing about the estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fresh import each_in_fresh_process  # benchmarks/ is on sys.path when a script here runs
from p1 import PeakRss

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
# name: (method, nsamples, seqlen, copy) where copy means the app's pruned copy beside the dense model
SETTINGS = {
    "wanda-16x256": ("wanda", 16, 256, False),
    "wanda-64x512": ("wanda", 64, 512, False),
    "wanda-32x1024-app-copy": ("wanda", 32, 1024, True),
    "magnitude": ("magnitude", 0, 0, False),
    "magnitude-app-copy": ("magnitude", 0, 0, True),
}


def measure(name: str) -> dict:
    """Run one setting in this process: estimate first, then the engine on the built-in model."""
    import gc

    import psutil

    from wanda_gui.core.calibration import calibration_windows
    from wanda_gui.core.copies import pruning_copy
    from wanda_gui.core.config import PruneConfig
    from wanda_gui.core.engine import prune, select_linears
    from wanda_gui.core.runs import drain
    from wanda_gui.core.estimate import estimate, matmul_rate
    from wanda_gui.core.models import load_model

    method, nsamples, seqlen, copy = SETTINGS[name]
    loaded = load_model("builtin")
    predicted = estimate(loaded.info, method, nsamples, seqlen, dense_copy=copy)
    config = PruneConfig(method=method, restore_on_abort=False)
    gc.collect()
    after_load = psutil.Process().memory_info().rss
    resident = sum(float(p.sum()) for p in loaded.model.parameters())  # every weight page read once
    before = psutil.Process().memory_info().rss
    with PeakRss() as rss:
        windows = calibration_windows(loaded.tokenizer, "builtin", nsamples, seqlen, 0)[0] if nsamples else None
        model = loaded.model
        if copy:  # as the app does: the pruned linears copied, everything else shared with the dense model
            _, plan = select_linears(model, config)
            model = pruning_copy(model, [m for linears in plan for m in linears.values()])
        started = time.perf_counter()
        summary = drain(prune(model, config, windows))
        seconds = time.perf_counter() - started
    return {
        "setting": name, "method": method, "nsamples": nsamples, "seqlen": seqlen, "app_copy": copy,
        "estimated_seconds": predicted.seconds, "measured_seconds": seconds, "engine_seconds": summary.seconds,
        "estimated_bytes": predicted.extra_bytes, "estimated_parts": predicted.parts,
        "measured_rss_added_bytes": rss.peak - before, "rss_before_bytes": before,
        "measured_rss_added_over_load_bytes": rss.peak - after_load, "weights_checksum": resident,
        "matmul_flops_per_second": matmul_rate(loaded.info.device, loaded.model.dtype),
        "load_average": os.getloadavg()[0], "cpu_threads": __import__("torch").get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def time_checkable(r: dict) -> bool:
    """Wall seconds say something about the estimate only when no other work shared the cores."""
    return r["load_average"] < r.get("cpu_count", os.cpu_count()) + 0.5


def reestimate(reports: list[dict]) -> list[dict]:
    """The memory estimate of the current code for stored measurements (it needs no timing); the time estimate
    stays the one made during the run."""
    from wanda_gui.core.estimate import memory_parts
    from wanda_gui.core.models import load_model

    info = load_model("builtin").info
    for r in reports:
        r["estimated_parts"] = memory_parts(info, r["method"], r["nsamples"], r["seqlen"], r["app_copy"])
        r["estimated_bytes"] = sum(r["estimated_parts"].values())
        r["memory_estimate_recomputed"] = True
    return reports


def ratio_row(r: dict) -> str:
    gib = 1024 ** 3
    time_ratio = f"{r['estimated_seconds'] / r['measured_seconds']:.2f}" if time_checkable(r) else "(busy)"
    return (f"| {r['setting']} | {r['estimated_seconds']:.1f} | {r['measured_seconds']:.1f} | "
            f"{time_ratio} | {r['estimated_bytes'] / gib:.3f} | "
            f"{r['measured_rss_added_bytes'] / gib:.3f} | {r['estimated_bytes'] / max(1, r['measured_rss_added_bytes']):.2f} | "
            f"{r['load_average']:.1f} |")


def table(reports: list[dict]) -> str:
    head = ("| setting | est. s | measured s | est/meas | est. GiB | measured GiB added | est/meas | load avg |\n"
            "|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *map(ratio_row, reports)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", default=str(HERE / "estimate-check-cpu.json"))
    parser.add_argument("--reestimate", nargs="+", metavar="JSON",
                        help="recompute the memory estimates of stored runs with the current code, merged into --out")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    if args.reestimate:
        reports = reestimate([r for path in args.reestimate for r in json.loads(Path(path).read_text())])
        Path(args.out).write_text(json.dumps(reports, indent=2))
        print(table(reports))
        return 0
    reports = each_in_fresh_process(__file__, ([name] for name in args.only), args.out, show=ratio_row)
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
