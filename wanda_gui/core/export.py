"""The run report and the export: save_pretrained safetensors + tokenizer + pruning_report.json + model card, atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from .errors import UserError

REPORT_NAME = "pruning_report.json"


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"wanda_gui": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def make_report(model_info, summary, calibration: dict | None, timings: dict, perplexity: dict | None = None,
                generation: dict | None = None) -> dict:
    """Everything PROTOCOL.md's benchmark report lists, as plain JSON-able data."""
    return {
        "model": {"name": model_info.name, "architecture": model_info.architecture, "parameters": model_info.parameters},
        "method": summary.method,
        "pattern": summary.pattern,
        "target_sparsity": summary.target_sparsity,
        "achieved_sparsity": summary.achieved_sparsity,
        "pruned_parameters": summary.pruned_parameters,
        "sparsity_by_type": summary.by_type,
        "settings": summary.settings,
        "calibration": calibration,
        "device": model_info.device,
        "dtype": model_info.dtype,
        "seconds": {**timings, "calibration_and_pruning": summary.seconds},
        "peak_memory_bytes": summary.peak_memory_bytes,
        "perplexity": perplexity,
        "generation_tokens_per_second": generation,
        "layers": [dataclasses.asdict(layer) for layer in summary.layers],
        "versions": versions(),
    }


def model_card(report: dict) -> str:
    """A README saying what was done, what was measured, and what sparsity does and does not buy."""
    ppl = report.get("perplexity") or {}
    calib = report.get("calibration") or {}
    lines = [
        f"# {report['model']['name']}, pruned with {report['method']} ({report['pattern']})",
        "",
        f"Pruned by wanda_gui with **{report['method']}** ([Wanda: Sun et al. 2023](https://arxiv.org/abs/2306.11695)), pattern "
        f"**{report['pattern']}**, target sparsity {report['target_sparsity']:.1%}, achieved "
        f"{report['achieved_sparsity']:.2%} over {report['pruned_parameters']:,} weights of the decoder blocks' linear "
        "layers" + (" and the LM head (with the input embeddings, where tied to it)." if report["settings"]["prune_head"]
                    else "; the embeddings and the LM head are dense.") +
        " No weight was retrained or updated: pruned weights are zeros.",
        "",
    ]
    if calib:
        lines += [f"Calibration: {calib.get('source')}, {calib.get('nsamples')} windows of {calib.get('seqlen')} tokens, "
                  f"seed {calib.get('seed')}.", ""]
    if ppl:
        lines += ["| | perplexity |", "|---|---|"]
        for key in ("dense", "pruned"):
            if ppl.get(key):
                p = ppl[key]
                lines.append(f"| {key} | {p['perplexity']:.3f} (seqlen {p['seqlen']}, stride {p['stride']}, {p['nwindows']} windows) |")
        lines.append("")
    lines += [
        "## What the zeros buy",
        "The weights are stored densely in safetensors: the zeros do **not** shrink the files, and a dense runtime "
        "does **not** run any faster. 2:4 patterns can be accelerated on NVIDIA Ampere and newer GPUs with "
        "semi-structured sparse kernels (modest, shape-dependent gains); unstructured sparsity needs a sparse runtime "
        "to pay off. Load it like any model: `AutoModelForCausalLM.from_pretrained(path)`.",
        "",
        f"Details, per-layer sparsity and versions: `{REPORT_NAME}`.",
        "",
    ]
    return "\n".join(lines)


def check_target(out: Path, overwrite: bool, source: Path | None) -> None:
    if source is not None and out.resolve() == Path(source).resolve():
        raise UserError(f"{out} is the source model's folder; export somewhere else (the source is never overwritten).")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file; choose a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; choose an empty folder or allow overwriting (--overwrite).")


def export_model(model: torch.nn.Module, tokenizer, out: str | Path, report: dict, overwrite: bool = False,
                 source: Path | None = None) -> Path:
    """Write model, tokenizer, report and card into a temporary sibling folder, then rename it into place."""
    out = Path(out).expanduser().absolute()
    check_target(out, overwrite, source)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise UserError(f"Cannot write to {out.parent}: {e.strerror}.") from None
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        if config.pop("quantization_config", None) is not None:  # zeros stored densely are not a quantization
            config_path.write_text(json.dumps(config, indent=2))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        (tmp / "README.md").write_text(model_card(report))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Export to {out} failed: {e.strerror or e}. Nothing was left half-written.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
