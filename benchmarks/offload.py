"""Models bigger than memory, measured: a 1B-class LLaMA (random weights, fp32, > 4 GB of safetensors) pruned with
Wanda 50% through the CLI block by block under `--max-memory 2GiB` and in memory, each in its own process; the peak
resident memory of each (the kernel's own count, wait4's ru_maxrss), whether the two exports are identical, and
whether plain `from_pretrained` reads the streamed one. The built-in model (P1) in memory gives the other
no-offload figure.

Usage: python benchmarks/offload.py [--nsamples 16] [--seqlen 512] [--skip-p1] [--out benchmarks/offload-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=2048)  # TinyLlama-1.1B's blocks


def build(folder: Path) -> Path:
    """The 1B-class model once, with the built-in model's tokenizer (its vocabulary sets the embeddings)."""
    import torch
    import transformers as tf

    from wanda_gui.core.models import builtin_model_dir

    if (folder / "config.json").exists():
        return folder
    tokenizer = tf.AutoTokenizer.from_pretrained(builtin_model_dir())
    config = tf.LlamaConfig(**SHAPE, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


# The run is started by a small launcher: a child forked from this (by then large) process would count this
# process's memory in its own peak; the launcher's child starts small, and the launcher reports its peak.
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)")


def run(args: list[str]) -> dict:
    """One CLI run in its own process: its JSON report, wall seconds and peak resident bytes."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        with open(Path(tmp) / "out", "w+") as out, open(Path(tmp) / "err", "w+") as err:
            code = subprocess.run([sys.executable, "-c", LAUNCHER, str(peak), sys.executable, "-m", "wanda_gui", *args,
                                   "--json"], stdout=out, stderr=err, text=True).returncode
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if code:
            raise SystemExit(f"{' '.join(args)} failed:\n{stderr[-3000:]}")
        return {"report": json.loads(stdout), "seconds": time.perf_counter() - started,
                "peak_rss_bytes": int(peak.read_text()) * 1024}


def identical(a: Path, b: Path) -> dict:
    """Same tensor names, same zeros (masks), same values, reading one tensor at a time."""
    from safetensors import safe_open

    names_a = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"] if \
        (a / "model.safetensors.index.json").exists() else None
    files = lambda folder: sorted(folder.glob("*.safetensors"))
    keys, masks_differ, values_differ = 0, 0, 0
    opened_b = [safe_open(f, "pt") for f in files(b)]
    where_b = {k: f for f in opened_b for k in f.keys()}
    for fa in files(a):
        with safe_open(fa, "pt") as f:
            for key in f.keys():
                x, y = f.get_tensor(key), where_b[key].get_tensor(key)
                keys += 1
                masks_differ += int(((x == 0) != (y == 0)).sum())
                values_differ += int(not __import__("torch").equal(x, y))
    return {"tensors": keys, "same_names": keys == len(where_b), "mask_positions_differing": masks_differ,
            "tensors_with_different_values": values_differ, "index": names_a is not None}


def reloads(folder: Path, reference: Path) -> bool:
    """Plain transformers loads the streamed export, and its weights equal the in-memory export's."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file

    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    state = model.state_dict()
    ok = True
    for f in sorted(reference.glob("*.safetensors")):
        for key, value in load_file(f).items():
            ok &= torch.equal(state[key], value)
    return bool(ok)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-memory", default="2GiB")
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/wanda_gui/bench"))
    parser.add_argument("--skip-p1", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from wanda_gui.core.models import builtin_model_dir

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build(work / "llama-1b-class")
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    common = ["prune", "--model", str(model), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--overwrite"]
    result = {"model": {"config": SHAPE, "safetensors_bytes": model_bytes}, "nsamples": args.nsamples,
              "seqlen": args.seqlen, "calibration_activation_bytes": args.nsamples * args.seqlen * SHAPE["hidden_size"] * 4}
    offloaded = run([*common, "--offload", "--max-memory", args.max_memory, "--out", str(work / "offloaded")])
    print(f"offloaded: peak RSS {offloaded['peak_rss_bytes'] / 2**30:.2f} GiB, {offloaded['seconds']:.0f} s", flush=True)
    whole = run([*common, "--out", str(work / "in-memory")])
    print(f"in memory: peak RSS {whole['peak_rss_bytes'] / 2**30:.2f} GiB, {whole['seconds']:.0f} s", flush=True)
    for name, r in (("offloaded", offloaded), ("in_memory", whole)):
        result[name] = {"peak_rss_bytes": r["peak_rss_bytes"], "seconds": r["seconds"],
                        "prune_seconds": r["report"]["seconds"]["calibration_and_pruning"],
                        "achieved_sparsity": r["report"]["achieved_sparsity"], "offload": r["report"].get("offload")}
    result["offloaded"]["max_memory"] = args.max_memory
    result["offloaded"]["peak_minus_calibration_bytes"] = offloaded["peak_rss_bytes"] - result["calibration_activation_bytes"]
    result["in_memory"]["peak_minus_model_bytes"] = whole["peak_rss_bytes"] - model_bytes
    if not args.skip_p1:
        builtin = builtin_model_dir()
        p1 = run(["prune", "--model", str(builtin), "--nsamples", "64", "--seqlen", "512", "--overwrite",
                  "--out", str(work / "p1")])
        size = sum(f.stat().st_size for f in builtin.glob("*.safetensors"))
        result["p1_in_memory"] = {"peak_rss_bytes": p1["peak_rss_bytes"], "model_bytes": size,
                                  "peak_minus_model_bytes": p1["peak_rss_bytes"] - size, "seconds": p1["seconds"]}
        print(f"P1 in memory: peak RSS {p1['peak_rss_bytes'] / 2**30:.2f} GiB (model {size / 2**30:.2f} GiB)", flush=True)
    result["exports"] = identical(work / "offloaded", work / "in-memory")
    result["exports"]["streamed_export_reloads_equal"] = reloads(work / "offloaded", work / "in-memory")
    print(json.dumps(result["exports"]), flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
