"""What structured pruning buys on P1 (PROTOCOL.md): the built-in model, 64 x 512 calibration (seed 0), perplexity on
the 64 evaluation windows; for 10, 20, 30 and 50% of the decoder linears' weights removed, Wanda-sp, FLAP and
FLAP + block reconstruction, each with uniform and adaptive widths: perplexity, parameters, export bytes, and prefill
(512 tokens) and generation (batch 1, 128 new tokens) tokens/s of the pruned model against the dense one, measured the
same way in this one process. Writes JSON (after every run) and prints a table.

Usage: python benchmarks/structured.py [--out benchmarks/structured-cpu.json] [--device cpu] [--quick]
--quick: tiny sizes (4 x 64 calibration, 2 evaluation windows, 20% only, three runs, 64-token prompt, 8 new tokens),
to check that the script works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from wanda_gui.core.calibration import builtin_evaluation_text, calibration_windows, tokenize  # noqa: E402
from wanda_gui.core.config import PruneConfig  # noqa: E402
from wanda_gui.core.engine import prune  # noqa: E402
from wanda_gui.core.evaluate import perplexity  # noqa: E402
from wanda_gui.core.export import export_model, make_report  # noqa: E402
from wanda_gui.core.models import load_model  # noqa: E402
from wanda_gui.core.runs import drain, pruned_copy  # noqa: E402

RUNS = ["wanda:uniform", "flap:uniform", "flap+reconstruct:uniform", "wanda:adaptive", "flap:adaptive",
        "flap+reconstruct:adaptive"]
QUICK_RUNS = ["wanda:uniform", "flap:adaptive", "flap+reconstruct:uniform"]
SPARSITIES = [0.1, 0.2, 0.3, 0.5]


@torch.inference_mode()
def measure_speed(model, tokenizer, device, prompt_tokens: int = 512, new_tokens: int = 128) -> dict:
    """Prefill tokens/s (one forward over a prompt of `prompt_tokens` tokens of the evaluation text) and greedy
    generation tokens/s (batch 1, `new_tokens` after a short prompt), each the best of three after a warm-up. (Until
    wanda_gui/core/speed.py is merged; the lead folds this into it.)"""
    ids = tokenize(tokenizer, builtin_evaluation_text())[:prompt_tokens][None].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def best(run) -> float:
        run()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        return min(times)

    prefill = best(lambda: model(input_ids=ids, use_cache=False))
    short = ids[:, :16]
    generation = best(lambda: model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=new_tokens,
                                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad))
    return {"prefill_tokens_per_s": prompt_tokens / prefill, "generation_tokens_per_s": new_tokens / generation}


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
    args = parser.parse_args()
    nsamples, seqlen, nwindows, prompt, new = (4, 64, 2, 64, 8) if args.quick else (64, 512, 64, 512, 128)
    runs, sparsities = (QUICK_RUNS, [0.2]) if args.quick else (RUNS, SPARSITIES)

    loaded = load_model("builtin", args.device, None)
    device = torch.device(loaded.info.device)
    windows, calibration = calibration_windows(loaded.tokenizer, "builtin", nsamples, seqlen, 0)
    dense_model, tokenizer = loaded.model, loaded.tokenizer
    dense = {"perplexity": perplexity(dense_model, tokenizer, seqlen=512, nwindows=nwindows).perplexity,
             "parameters": sum(p.numel() for p in dense_model.parameters()),
             "export_bytes": saved_bytes(dense_model), **measure_speed(dense_model, tokenizer, device, prompt, new)}
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
            method, *options = name.split("+")
            config = PruneConfig(method=method, sparsity=sparsity, pattern="structured", widths=widths,
                                 options=tuple(options), restore_on_abort=False)
            model = pruned_copy(dense_model, config)
            summary = drain(prune(model, config, windows))
            row = {"run": run, "method": method, "options": options, "widths": widths, "sparsity": sparsity,
                   "achieved": summary.achieved_sparsity, "prune_seconds": summary.seconds,
                   "perplexity": perplexity(model, tokenizer, seqlen=512, nwindows=nwindows).perplexity,
                   "parameters": summary.parameters_after,
                   "export_bytes": export_bytes(model, tokenizer,
                                                make_report(loaded.info, summary, calibration, {})),
                   **measure_speed(model, tokenizer, device, prompt, new)}
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
