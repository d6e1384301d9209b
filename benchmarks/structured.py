"""What structured pruning buys on P1 (PROTOCOL.md): the built-in model, 64 x 512 calibration (seed 0), perplexity on
the 64 evaluation windows; for 10, 20, 30 and 50% of the decoder linears' weights removed, Wanda-sp, FLAP and
FLAP + block reconstruction, each with uniform and adaptive widths: perplexity, parameters, export bytes, and prefill
(512 tokens) and generation (batch 1, 128 new tokens) tokens/s of the pruned model against the dense one, measured the
same way in this one process. Writes JSON (after every run) and prints a table.

Usage: python benchmarks/structured.py [--out benchmarks/structured-cpu.json] [--device cpu] [--quick]
       [--runs flap:uniform flap+reconstruct:adaptive ...] [--sparsities 0.2 0.5]
--quick: tiny sizes (4 x 64 calibration, 2 evaluation windows, 20% only, three runs, 64-token prompt, 8 new tokens),
to check that the script works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from wanda_gui.core.calibration import calibration_windows  # noqa: E402
from wanda_gui.core.config import PruneConfig, recipe  # noqa: E402
from wanda_gui.core.engine import prune  # noqa: E402
from wanda_gui.core.evaluate import perplexity  # noqa: E402
from wanda_gui.core.export import export_model, make_report  # noqa: E402
from wanda_gui.core.models import load_model  # noqa: E402
from wanda_gui.core.runs import drain, pruned_copy  # noqa: E402
from wanda_gui.core.speed import measure_speed  # noqa: E402

RUNS = ["wanda:uniform", "flap:uniform", "flap+reconstruct:uniform", "wanda:adaptive", "flap:adaptive",
        "flap+reconstruct:adaptive"]
QUICK_RUNS = ["wanda:uniform", "flap:adaptive", "flap+reconstruct:uniform"]
SPARSITIES = [0.1, 0.2, 0.3, 0.5]


def speed(model, tokenizer, device, prompt_tokens: int, new_tokens: int) -> dict:
    """Prefill and generation tokens/s as the app and `prune --speed` measure them (core.speed: batch 1, greedy,
    exactly new_tokens after a prompt_tokens prompt, the median of 3 after a warm-up)."""
    measured = measure_speed(model, tokenizer, device, prompt_tokens, new_tokens)
    return {"prefill_tokens_per_s": measured["prefill_tokens_per_second"],
            "generation_tokens_per_s": measured["generation_tokens_per_second"],
            "other_cpu_share": measured["other_cpu_share"]}


def saved_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def export_bytes(model, tokenizer, report: dict) -> int:
    """The safetensors bytes save_pretrained writes for the model (an adaptive one padded to its widest block)."""
    with tempfile.TemporaryDirectory() as folder:
        out = export_model(model, tokenizer, Path(folder) / "export", report)
        return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the JSON here (after every run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--runs", nargs="+", default=None, help="METHOD[+OPTION]:WIDTHS (default: all six)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None, help="default: 0.1 0.2 0.3 0.5")
    args = parser.parse_args()
    nsamples, seqlen, nwindows, prompt, new = (4, 64, 2, 64, 8) if args.quick else (64, 512, 64, 512, 128)
    runs, sparsities = (QUICK_RUNS, [0.2]) if args.quick else (RUNS, SPARSITIES)
    runs, sparsities = args.runs or runs, args.sparsities or sparsities

    loaded = load_model("builtin", args.device, None)
    device = torch.device(loaded.info.device)
    windows, calibration = calibration_windows(loaded.tokenizer, "builtin", nsamples, seqlen, 0)
    dense_model, tokenizer = loaded.model, loaded.tokenizer
    dense = {"perplexity": perplexity(dense_model, tokenizer, seqlen=512, nwindows=nwindows).perplexity,
             "parameters": sum(p.numel() for p in dense_model.parameters()),
             "export_bytes": saved_bytes(dense_model), **speed(dense_model, tokenizer, device, prompt, new)}
    result = {"setting": {"model": loaded.name, "device": str(device), "dtype": loaded.info.dtype,
                          "calibration": calibration, "eval": {"seqlen": 512, "stride": 512, "nwindows": nwindows},
                          "speed": {"prompt_tokens": prompt, "new_tokens": new, "batch": 1}, "quick": args.quick},
              "dense": dense, "runs": []}
    print(f"dense: perplexity {dense['perplexity']:.3f}, {dense['parameters']:,} parameters, prefill "
          f"{dense['prefill_tokens_per_s']:.0f} tok/s, generation {dense['generation_tokens_per_s']:.1f} tok/s",
          file=sys.stderr)
    for sparsity in sparsities:
        for run in runs:
            name, widths = run.split(":")
            named = recipe(name)
            method, options = named["method"], list(named["options"])
            config = PruneConfig(sparsity=sparsity, pattern="structured", widths=widths, restore_on_abort=False,
                                 **named)
            model = pruned_copy(dense_model, config)
            summary = drain(prune(model, config, windows))
            row = {"run": run, "method": method, "options": options, "widths": widths, "sparsity": sparsity,
                   "achieved": summary.achieved_sparsity, "prune_seconds": summary.seconds,
                   "perplexity": perplexity(model, tokenizer, seqlen=512, nwindows=nwindows).perplexity,
                   "parameters": summary.parameters_after,
                   "export_bytes": export_bytes(model, tokenizer,
                                                make_report(loaded.info, summary, calibration, {})),
                   **speed(model, tokenizer, device, prompt, new)}
            row["generation_speedup"] = row["generation_tokens_per_s"] / dense["generation_tokens_per_s"]
            row["prefill_speedup"] = row["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"]
            result["runs"].append(row)
            ratio = row["perplexity"] / dense["perplexity"]
            print(f"{run:<28} {sparsity:.0%}: ppl {row['perplexity']:.3f} ({ratio:.2f}x), "
                  f"{row['parameters']:,} params, export {row['export_bytes'] / 1e6:.1f} MB, prefill "
                  f"{row['prefill_speedup']:.2f}x, generation {row['generation_speedup']:.2f}x, "
                  f"pruned in {row['prune_seconds']:.1f} s", file=sys.stderr)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
            del model
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
