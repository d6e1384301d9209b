"""The run report and the export: save_pretrained safetensors + tokenizer + pruning_report.json + model card, atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import re
import uuid
from pathlib import Path

import torch

from . import atomic
from .errors import UserError

REPORT_NAME = "pruning_report.json"
MARKER, MARKER_VALUE = "exported_by", "wanda_gui"  # the report key that makes a folder a previous export
FILES_KEY = "exported_files"  # what that export wrote: the only names an overwrite may replace
LOCK_SUFFIX = ".export-lock"
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-[0-9a-z_]{8}$")
LEFTOVER_LOCK = re.compile(r"^\.(?P<name>.+)\.export-lock$")


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


def check_target(out: Path, overwrite: bool, source: Path | None = None, *, overwrite_control: str = "--overwrite") -> None:
    """Refuse, before any work, every target whose export would destroy what this tool did not write."""
    out = Path(out).absolute()
    _check_not_in_a_file(out)
    if source is not None:
        _check_apart_from_source(out, Path(source))
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link; give the folder itself.")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file; choose a folder.")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    ours = export_files(out)
    if ours is None or not set(entries) <= ours:
        foreign = [name for name in entries if ours is None or name not in ours]
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{out} is not empty and is not a previous export of wanda_gui (it holds {shown}); "
                        f"choose an empty or new folder. {overwrite_control} only replaces a previous export, "
                        "so nothing here was touched.")
    if not overwrite:
        raise UserError(f"{out} holds a previous export; tick {overwrite_control} to replace it, or choose another folder.")


def _check_not_in_a_file(out: Path) -> None:
    """A target below a file can never be created; say which file is in the way."""
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UserError(f"{parent} is a file, so {out} cannot be created inside it; choose a folder.")
            return


def _check_apart_from_source(out: Path, source: Path) -> None:
    """The export may neither be the source folder, nor lie inside it, nor contain it."""
    target, src = out.resolve(), source.resolve()
    if target == src:
        raise UserError(f"{out} is the source model's folder; export somewhere else (the source is never overwritten).")
    if src in target.parents:
        raise UserError(f"{out} is inside the source model's folder {source}; export somewhere outside it.")
    if target in src.parents:
        raise UserError(f"{out} contains the source model's folder {source}; export somewhere else.")


def export_files(folder: Path) -> set[str] | None:
    """The names a previous export of this tool wrote into folder, as its report lists them; None if it is not one."""
    try:
        report = json.loads((folder / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get(MARKER) != MARKER_VALUE:
        return None
    return set(report.get(FILES_KEY) or ()) | {REPORT_NAME}


def export_model(model: torch.nn.Module, tokenizer, out: str | Path, report: dict, overwrite: bool = False,
                 source: Path | None = None, *, overwrite_control: str = "--overwrite") -> Path:
    """Write model, tokenizer, report and card into a temporary sibling folder, then rename it into place.

    The target's lock is held from the checks to the rename: a second export to it fails instead of racing,
    and leftovers of exports killed earlier in the same parent folder are cleared first.
    """
    out = Path(out).absolute()
    check_target(out, overwrite, source, overwrite_control=overwrite_control)
    try:
        created = atomic.make_parents(out.parent)
    except OSError as e:
        raise UserError(f"Cannot create {out.parent}: {e.strerror}.") from None
    try:
        with atomic.held(lock_path(out)):
            remove_leftovers(out.parent, out.name)
            check_target(out, overwrite, source, overwrite_control=overwrite_control)
            _write_and_swap(model, tokenizer, out, report)
    except atomic.Busy:
        atomic.remove_empty(created)
        raise UserError(f"Another export to {out} is running; wait for it to finish or choose another folder.") from None
    except OSError as e:
        atomic.remove_empty(created)
        raise UserError(f"Cannot write to {out.parent}: {e.strerror or e}. Nothing was left half-written.") from None
    except BaseException:
        atomic.remove_empty(created)
        raise
    return out


def _write_and_swap(model, tokenizer, out: Path, report: dict) -> None:
    """Write everything into `.NAME.partial-…`, then swap it with the target (kept as `.NAME.old-…` until done)."""
    tmp = leftover_path(out, "partial")
    tmp.mkdir()
    try:
        _write_export(model, tokenizer, tmp, report)
        if out.exists():
            old = leftover_path(out, "old")
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


def _write_export(model, tokenizer, folder: Path, report: dict) -> None:
    """Weights, tokenizer, a config without quantization, the report (with the file list) and the card."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:  # zeros stored densely are not a quantization
        config_path.write_text(json.dumps(config, indent=2))
    files = sorted({p.name for p in folder.iterdir()} | {REPORT_NAME, "README.md"})
    (folder / REPORT_NAME).write_text(json.dumps({**report, MARKER: MARKER_VALUE, FILES_KEY: files}, indent=2))
    (folder / "README.md").write_text(model_card(report))
    atomic.normal_modes(folder)


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}{LOCK_SUFFIX}")


def leftover_path(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{uuid.uuid4().hex[:8]}")


def remove_leftovers(parent: Path, own: str) -> None:
    """Remove `.NAME.partial-…` / `.NAME.old-…` folders and lock files of exports whose process no longer runs.

    Every writer holds `.NAME.export-lock` while such folders of its own exist; the caller holds its own (`own`).
    """
    folders: dict[str, list[Path]] = {}
    for entry in parent.iterdir():
        match = LEFTOVER.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            folders.setdefault(match["name"], []).append(entry)
        elif (match := LEFTOVER_LOCK.match(entry.name)) and entry.is_file():
            folders.setdefault(match["name"], [])
    for name, leftovers in folders.items():
        lock = parent / f".{name}{LOCK_SUFFIX}"
        if name == own or not lock.exists():
            _clear(parent / name, leftovers)
        elif (fd := atomic.try_lock(lock, create=False)) is not None:
            _clear(parent / name, leftovers)
            atomic.release(lock, fd)


def _clear(out: Path, leftovers: list[Path]) -> None:
    """Remove a dead export's folders; if it died between its two renames, put the previous export back first."""
    olds = [p for p in leftovers if ".old-" in p.name and _complete(p)]
    if olds and not out.exists() and not out.is_symlink():
        os.replace(max(olds, key=lambda p: p.stat().st_ctime), out)
    for path in leftovers:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def _complete(folder: Path) -> bool:
    """A previous export with every file its report lists (an old folder half-removed is not one)."""
    files = export_files(folder)
    return files is not None and all((folder / name).exists() for name in files)
