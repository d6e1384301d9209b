"""The run report and the export: save_pretrained safetensors + tokenizer + pruning_report.json + model card, atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import re
import uuid
from pathlib import Path
from typing import Iterator

import torch
import transformers

from .. import __version__
from . import atomic
from .errors import UserError
from .memory import format_bytes
from .speed import export_bytes
from .structured import padded_to_widest

REPORT_NAME = "pruning_report.json"
BUSY = 0.1  # a share of the CPU taken by other work that a speed measurement mentions
MARKER, MARKER_VALUE = "exported_by", "wanda_gui"  # the report key that makes a folder a previous export
FILES_KEY = "exported_files"  # what that export wrote: the only names an overwrite may replace
LOCK_SUFFIX = ".export-lock"
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-[0-9a-z_]{8}$")
LEFTOVER_LOCK = re.compile(r"^\.(?P<name>.+)\.export-lock$")


def versions() -> dict[str, str]:
    return {"wanda_gui": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def make_report(model_info, summary, calibration: dict | None, timings: dict, perplexity: dict | None = None,
                generation: dict | None = None, zero_shot: dict | None = None, counts: dict | None = None,
                speed: dict | None = None) -> dict:
    """Everything PROTOCOL.md's benchmark report lists, as plain JSON-able data; zero_shot: {"dense": ...,
    "pruned": ...}, each core.zeroshot.ZeroShot.as_dict(); counts and speed likewise, each
    core.speed.count_parameters() and measure_speed()."""
    return {
        "model": {"name": model_info.name, "architecture": model_info.architecture, "parameters": model_info.parameters},
        "method": summary.method,
        "pattern": summary.pattern,
        "target_sparsity": summary.target_sparsity,
        "achieved_sparsity": summary.achieved_sparsity,
        "pruned_parameters": summary.pruned_parameters,
        "parameters": {"before": summary.parameters_before, "after": summary.parameters_after},
        "structure": summary.structure,
        "sparsity_by_type": summary.by_type,
        "settings": summary.settings,
        "calibration": calibration,
        "device": model_info.device,
        "dtype": model_info.dtype,
        "seconds": {**timings, "calibration_and_pruning": summary.seconds},
        "peak_memory_bytes": summary.peak_memory_bytes,
        "perplexity": perplexity,
        "zero_shot": zero_shot,
        "generation_tokens_per_second": generation,
        "parameter_counts": counts,
        "speed": speed,
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
    if report.get("structure"):
        lines[2:4] = [structured_card(report), ""]
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
    if report.get("zero_shot"):
        measured = report["zero_shot"]
        lines += ["## Zero-shot accuracy", "", zero_shot_note(measured), "", *zero_shot_table(measured), ""]
    if report.get("parameter_counts") or report.get("speed"):
        lines += ["## What pruning bought", "", *bought(report.get("parameter_counts"), report.get("speed"),
                                                        report.get("export_bytes")), ""]
    lines += [] if report.get("structure") else [
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


def bought_table(parameters: dict | None, speed: dict | None) -> list[str]:
    """Markdown rows, dense against pruned: parameters stored and non-zero and their bytes, and prefill and
    generation speed where measured; the ratio pruned / dense."""
    rows = ["| | dense | pruned | pruned / dense |", "|---|---|---|---|"]

    def row(label: str, dense, pruned, shown) -> None:
        rows.append(f"| {label} | {shown(dense)} | {shown(pruned)} | {f'{pruned / dense:.2f}x' if dense else ''} |")

    if parameters:
        dense, pruned = parameters["dense"], parameters["pruned"]
        for key, label in (("stored", "parameters stored"), ("nonzero", "parameters non-zero"),
                           ("linear_stored", "decoder linears' weights stored"),
                           ("linear_nonzero", "decoder linears' weights non-zero")):
            row(label, dense[key], pruned[key], lambda n: f"{n:,}")
        row("parameters' bytes", dense["bytes"], pruned["bytes"], format_bytes)
    if speed:
        dense, pruned = speed["dense"], speed["pruned"]
        row(f"prefill tokens/s ({dense['prompt_tokens']}-token prompt)", dense["prefill_tokens_per_second"],
            pruned["prefill_tokens_per_second"], lambda v: f"{v:,.1f}")
        row(f"generation tokens/s (batch 1, {dense['new_tokens']} new tokens)", dense["generation_tokens_per_second"],
            pruned["generation_tokens_per_second"], lambda v: f"{v:,.1f}")
    return rows


def bought(parameters: dict | None, speed: dict | None, exported: int | None) -> list[str]:
    """Markdown lines: the table, then what the export's files take, what the storage buys and how speed was
    measured, each where known."""
    lines = [*bought_table(parameters, speed), ""]
    if exported:
        lines.append(f"The export's safetensors files take {format_bytes(exported)} ({exported:,} bytes).")
    elif parameters:
        padded = parameters["pruned"]["stored"] < parameters["dense"]["stored"]
        lines.append("An export's weights take about the pruned model's parameters' bytes" +
                     (" (an adaptive structured export more: it is padded to its widest block)." if padded else "."))
    if parameters:
        lines.append(zeros_note(parameters))
    if speed:
        lines.append(speed_note(speed))
    return lines


def speed_note(speed: dict) -> str:
    """How the speeds were measured, in a line."""
    s = speed["dense"]
    when = ("both in one call, taking turns run by run (so that other work on the machine weighs on both alike)"
            if s["in_turns"] else "the dense model before pruning, the pruned one after")
    return (f"Speed measured on {s['device']}, batch 1, greedy, {when}: the same {s['prompt_tokens']}-token prompt, "
            f"its prefill up to the first new token, then {s['new_tokens'] - 1} more decoding steps (generate with "
            f"min_new_tokens, so the count is exact); a warm-up, then the median of {s['repeats']} runs."
            + busy_note(speed))


def busy_note(speed: dict) -> str:
    """Other work on the CPU slows a measurement there, decoding's many small steps most of all: say how much."""
    shares = [s["other_cpu_share"] for s in speed.values() if s["device"] == "cpu"]
    if not shares or max(shares) < BUSY:
        return ""
    compare = ("compare the two models with each other, not with figures measured elsewhere"
               if speed["dense"]["in_turns"] else "and as the two were measured one after the other, a change in that "
               "work between them moves their ratio too")
    return (f" Other work took up to {max(shares):.0%} of the CPU meanwhile: these figures are slower than the "
            f"machine's own (decoding most, its many small steps each waiting for every thread), {compare}.")


def zeros_note(parameters: dict) -> str:
    """What the pruned model's storage buys, honestly."""
    dense, pruned = parameters["dense"], parameters["pruned"]
    if pruned["stored"] >= dense["stored"]:
        return ("The pruned weights are zeros stored densely (unstructured or N:M): they do not shrink the files "
                "(the same bytes as the dense model's), and a dense runtime multiplies every zero, so both run at the "
                "same speed on a CPU (and on a GPU without 2:4 sparse kernels); any difference measured is noise.")
    removed = dense["stored"] - pruned["stored"]
    return (f"The pruned model stores {removed:,} fewer parameters ({removed / dense['stored']:.1%}): its files are "
            "smaller and every runtime computes less.")


def structured_card(report: dict) -> str:
    """What a structured run removed, what the export holds, and who reads it."""
    structure, parameters = report["structure"], report["parameters"]
    blocks = structure["blocks"]
    widths = sorted({(b["kept_heads"], b["kept_channels"]) for b in blocks})
    kept = (f"every block keeps {widths[0][0]} of {blocks[0]['total_heads']} attention heads and {widths[0][1]} of "
            f"{blocks[0]['total_channels']} MLP channels" if structure["uniform"] else
            f"blocks keep {min(w[0] for w in widths)}-{max(w[0] for w in widths)} of {blocks[0]['total_heads']} heads "
            f"and {min(w[1] for w in widths)}-{max(w[1] for w in widths)} of {blocks[0]['total_channels']} MLP channels "
            f"({structure['widths']} widths; each block's in {REPORT_NAME})")
    compensated = [name for name, done in structure["bias_compensation"].items() if done]
    return (f"Structured pruning with **{report['method']}**: {report['achieved_sparsity']:.2%} of the decoder blocks' "
            f"linear weights removed as whole channels and heads ({kept}); the model has {parameters['after']:,} "
            f"parameters, {parameters['before']:,} before. The linears are really smaller: this model is smaller and "
            f"faster on every runtime. " + (f"FLAP's bias compensation is in {' and '.join(compensated)}'s bias. "
                                             if compensated else "") +
            f"Which runtimes read it: {structure['export']}. Load it with `AutoModelForCausalLM.from_pretrained(path)`.")


def zero_shot_note(measured: dict) -> str:
    """How the accuracies were measured, in a line."""
    any_model = next(iter(measured.values()))
    limit = any_model["limit"]
    return (f"Accuracy (acc, ± its standard error, in %) measured with {any_model['harness']}, "
            f"{any_model['num_fewshot']}-shot, on {f'the first {limit} examples' if limit else 'every example'} of "
            "each task; the mean is over the tasks.")


def zero_shot_table(measured: dict) -> list[str]:
    """Markdown rows: each task's accuracy for each model measured (e.g. dense and pruned, as ZeroShot.as_dict()
    gives them), pruned minus dense in points where both were measured, and the mean over the tasks."""
    models = list(measured)
    both = "dense" in measured and "pruned" in measured
    tasks = list(dict.fromkeys(task for results in measured.values() for task in results["tasks"]))

    def accuracy(found: dict | None) -> str:
        if found is None:
            return ""
        error = f" ± {100 * found['acc_stderr']:.2f}" if found["acc_stderr"] is not None else ""
        return f"{100 * found['acc']:.2f}{error}"

    def row(first: str, cells: list[str]) -> str:
        return "| " + " | ".join([first, *cells]) + " |"

    rows = [row("task", [*models, *(["difference"] if both else [])]), "|---" * (len(models) + both + 1) + "|"]
    for task in tasks:
        cells = [accuracy(measured[model]["tasks"].get(task)) for model in models]
        if both:
            dense, pruned = (measured[model]["tasks"].get(task) for model in ("dense", "pruned"))
            cells.append(f"{100 * (pruned['acc'] - dense['acc']):+.2f}" if dense and pruned else "")
        rows.append(row(task, cells))
    means = [f"**{100 * measured[model]['mean_acc']:.2f}**" for model in models]
    if both:
        means.append(f"{100 * (measured['pruned']['mean_acc'] - measured['dense']['mean_acc']):+.2f}")
    rows.append(row("**mean**", means))
    return rows


def check_target(out: Path, overwrite: bool, source: Path | None = None, *, overwrite_control: str = "--overwrite",
                 list_contents: bool = True) -> None:
    """Refuse, before any work, every target whose export would destroy what this tool did not write.
    list_contents: the refusal of a foreign folder names a few of its files (a server's visitors are told nothing
    of its files)."""
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
        holds = f" (it holds {shown})" if list_contents else ""
        raise UserError(f"{out} is not empty and is not a previous export of wanda_gui{holds}; "
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
                 source: Path | None = None, *, overwrite_control: str = "--overwrite",
                 list_contents: bool = True) -> Path:
    """Write model, tokenizer, report and card into a temporary sibling folder, then rename it into place."""
    with export_into(out, overwrite, source, overwrite_control=overwrite_control,
                     list_contents=list_contents) as folder:
        with padded_to_widest(model):  # per-block widths as no config can say them (core.structured)
            model.save_pretrained(folder)
        write_rest(model, tokenizer, folder, report)
    return Path(out).absolute()


@contextlib.contextmanager
def export_into(out: str | Path, overwrite: bool = False, source: Path | None = None, *,
                overwrite_control: str = "--overwrite", list_contents: bool = True) -> Iterator[Path]:
    """Give the caller an empty `.NAME.partial-…` folder to fill; when its block ends normally, swap it in for the
    target (kept as `.NAME.old-…` until done), otherwise remove it.

    The target's lock is held from the checks to the rename (for a streamed export, the whole run): a second
    export to it fails instead of racing, and leftovers of exports killed earlier in the same parent folder are
    cleared first.
    """
    out = Path(out).absolute()
    check_target(out, overwrite, source, overwrite_control=overwrite_control, list_contents=list_contents)
    try:
        created = atomic.make_parents(out.parent)
    except OSError as e:
        raise UserError(f"Cannot create {out.parent}: {e.strerror}.") from None
    try:
        with atomic.held(lock_path(out)):
            remove_leftovers(out.parent, out.name)
            check_target(out, overwrite, source, overwrite_control=overwrite_control, list_contents=list_contents)
            tmp = leftover_path(out, "partial")
            tmp.mkdir()
            try:
                yield tmp
                atomic.normal_modes(tmp)
                if out.exists():
                    old = leftover_path(out, "old")
                    os.replace(out, old)
                    os.replace(tmp, out)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing left if it was swapped in
    except atomic.Busy:
        atomic.remove_empty(created)
        raise UserError(f"Another export to {out} is running; wait for it to finish or choose another folder.") from None
    except OSError as e:
        atomic.remove_empty(created)
        raise UserError(f"Export to {out} failed: {e.strerror or e}. Nothing was left half-written.") from None
    except BaseException:
        atomic.remove_empty(created)
        raise


def write_rest(model, tokenizer, folder: Path, report: dict) -> None:
    """Everything beside the weights: the config without quantization, generation config, tokenizer, the report
    (with the file list and the weights' bytes, which the caller's report gets too) and the card."""
    if not (folder / "config.json").exists():  # a streamed export wrote only the weights
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:  # zeros stored densely are not a quantization
        config_path.write_text(json.dumps(config, indent=2))
    files = sorted({p.name for p in folder.iterdir()} | {REPORT_NAME, "README.md"})
    report["export_bytes"] = export_bytes(folder)  # the caller's report says it too
    (folder / REPORT_NAME).write_text(json.dumps({**report, MARKER: MARKER_VALUE, FILES_KEY: files}, indent=2))
    (folder / "README.md").write_text(model_card(report))


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
MAX_SHARD_BYTES = 50 * 1000 ** 3  # save_pretrained's default max_shard_size, "50GB"


class StreamedWeights:
    """safetensors files laid out as save_pretrained lays them out (one model.safetensors, or numbered shards and
    an index), written while the model is pruned: every tensor's dtype and shape is known before the run, so the
    headers go first and each tensor is written into its place when its block is done. Never the whole model
    in memory."""

    def __init__(self, folder: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        sizes = {key: math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                 for key, (dtype, shape) in specs.items()}
        shards: list[list[str]] = [[]]
        filled = 0
        for key, size in sizes.items():
            if shards[-1] and filled + size > max_shard_bytes:
                shards.append([])
                filled = 0
            shards[-1].append(key)
            filled += size
        self.folder, self.specs, self.total = Path(folder), specs, sum(sizes.values())
        self.names = (["model.safetensors"] if len(shards) == 1 else
                      [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        self.files = []
        self.place: dict[str, tuple[int, int]] = {}  # key -> (file, byte position)
        for number, (name, keys) in enumerate(zip(self.names, shards)):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for key in keys:
                dtype, shape = specs[key]
                header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                               "data_offsets": [offset, offset + sizes[key]]}
                offset += sizes[key]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            f = open(self.folder / name, "wb")
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
            self.files.append(f)
            for key in keys:
                self.place[key] = (number, 8 + len(raw) + header[key]["data_offsets"][0])
        self.pending = set(specs)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            if key not in self.pending:
                raise RuntimeError(f"{key} is not awaited by the streamed export (unknown, or written twice)")
            if (tensor.dtype, tuple(tensor.shape)) != self.specs[key]:
                raise RuntimeError(f"{key} changed dtype or shape during the run")
            number, position = self.place[key]
            f = self.files[number]
            f.seek(position)
            f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            self.pending.discard(key)

    def __enter__(self) -> "StreamedWeights":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files:
            f.close()

    def finish(self) -> None:
        """Check every tensor was written, close the files and write the index when there are shards."""
        self.__exit__()
        if self.pending:
            raise RuntimeError(f"the streamed export misses {len(self.pending)} tensors, e.g. {sorted(self.pending)[0]}")
        if len(self.names) > 1:
            weight_map = {key: self.names[number] for key, (number, _) in self.place.items()}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


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
