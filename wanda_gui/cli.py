"""Command line: `wanda-gui prune`, `wanda-gui eval`, `wanda-gui sweep`, and `wanda-gui [app]` for the Gradio app."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .app.main import add_arguments, serve
from .core import distributed
from .core import events as ev
from .core import sweep as sw
from .core.calibration import check_seqlen, read_text_files
from .core.config import WIDTHS, PruneConfig
from .core.errors import UserError
from .core.estimate import check_eval_fits
from .core.evaluate import perplexity
from .core.export import bought, zero_shot_note, zero_shot_table
from .core.memory import parse_bytes
from .core.methods import METHODS, OPTIONS, structured_methods
from .core.passes import Cancelled
from .core.runs import (CalibrationSpec, ModelSource, PruneJob, RunError, list_tasks, prepare_tasks, prune_and_export,
                         vocab_size)
from .core.zeroshot import TaskSpec, task_names


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin", help="'builtin', a local folder, or a hub id org/name (default: builtin)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--token", default=os.environ.get("HF_TOKEN"), help="hub token (default: $HF_TOKEN)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_task_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help=f"zero-shot accuracy {what} on these lm-evaluation-harness tasks, e.g. the Wanda paper's "
                        "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa (offline, their datasets "
                        "must be in the local Hugging Face datasets cache)")
    p.add_argument("--tasks-dir", default=None, metavar="DIR",
                   help="a folder of your own lm-eval task YAMLs, whose task names --tasks may use")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N examples per task (a quick look)")
    p.add_argument("--num-fewshot", type=int, default=0, metavar="K", help="examples shown before each (default 0)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanda-gui", description="Prune LLMs with Wanda; with no command, open the app.")
    sub = parser.add_subparsers(dest="command")
    add_arguments(sub.add_parser("app", help="open the Gradio app (the default)"))

    prune = sub.add_parser("prune", help="prune a model and export it")
    _add_model_args(prune)
    prune.add_argument("--method", default="wanda", choices=list(METHODS),
                       help="; ".join(m.description for m in METHODS.values()))
    prune.add_argument("--wanda-variant", action="store_true",
                       help="Wanda only: the reference's per-layer alpha search (rows differ in sparsity; slightly worse "
                            "than plain Wanda on the built-in model)")
    _add_option_args(prune, "")
    prune.add_argument("--sparsity", type=float, default=0.5,
                       help="fraction of each row to zero, in [0, 1) (unstructured); with --pattern structured, the "
                            "fraction of the decoder linears' weights removed")
    prune.add_argument("--pattern", default="unstructured",
                       help="unstructured, 2:4, 4:8 or any N:M (zeros stored densely), or structured: whole MLP channels "
                            "and attention heads removed, the linears made smaller (methods "
                            f"{', '.join(structured_methods())}; smaller files, faster on every runtime)")
    prune.add_argument("--widths", default="uniform", choices=list(WIDTHS),
                       help="with --pattern structured: " + "; ".join(f"{k}: {v}" for k, v in WIDTHS.items()))
    prune.add_argument("--layerwise", action="store_true", help="magnitude: one threshold per layer instead of per row")
    prune.add_argument("--include", nargs="*", default=[], metavar="GLOB", help="prune only linears whose name matches")
    prune.add_argument("--exclude", nargs="*", default=[], metavar="GLOB", help="skip linears whose name matches")
    prune.add_argument("--prune-lm-head", action="store_true",
                       help="also prune the LM head (and the input embeddings when they are tied to it)")
    prune.add_argument("--calib", nargs="+", default=["builtin"], metavar="SOURCE",
                       help="builtin, text FILE(s), or hf:NAME[:CONFIG] (wikitext2, c4 or any dataset)")
    prune.add_argument("--nsamples", type=int, default=64)
    prune.add_argument("--seqlen", type=int, default=512)
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--batch-size", type=int, default=None, help="windows per block forward (default: by device)")
    prune.add_argument("--eval", action="store_true", help="measure dense and pruned perplexity (PROTOCOL windows)")
    prune.add_argument("--eval-nwindows", type=int, default=64)
    _add_task_args(prune, "of the dense and the pruned model")
    prune.add_argument("--speed", action="store_true",
                       help="measure prefill (a 512-token prompt) and generation (batch 1, 128 new tokens) tokens/s of "
                            "the dense model before pruning and of the pruned one after, on --device")
    prune.add_argument("--offload", action="store_true",
                       help="bring the model in block by block from its safetensors and write the export block by "
                            "block: memory holds one block, what lies outside the blocks and the calibration data")
    prune.add_argument("--max-memory", default=None, metavar="SIZE",
                       help="e.g. 3GiB: the memory this run may use (RAM on CPU, the GPU's on CUDA); offloads when the "
                            "model does not fit whole, and refuses up front what cannot fit even block by block")
    prune.add_argument("--out", required=True, help="export folder: new, empty, or a previous export with --overwrite")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace a previous export of this tool (a folder holding anything else is never replaced)")

    ev = sub.add_parser("eval", help="perplexity of a model on the evaluation text, or zero-shot accuracy (--tasks)")
    _add_model_args(ev)
    _add_task_args(ev, "instead of perplexity (add --perplexity for both)")
    ev.add_argument("--perplexity", action="store_true", help="with --tasks, measure perplexity too")
    ev.add_argument("--list-tasks", action="store_true", help="print the task names --tasks accepts, and exit")
    ev.add_argument("--seqlen", type=int, default=512)
    ev.add_argument("--nwindows", type=int, default=64)
    ev.add_argument("--text", default=None, metavar="FILE", help="evaluate on this text file instead of the built-in text")
    ev.add_argument("--offload", action="store_true",
                    help="bring the model in block by block: memory holds one block and the windows' hidden states")

    sweep = sub.add_parser("sweep", help="compare methods: every method x pattern x sparsity on a fresh copy, resumable")
    _add_model_args(sweep)
    sweep.add_argument("--methods", default="wanda,magnitude", help=f"comma-separated, from {','.join(METHODS)}")
    sweep.add_argument("--sparsities", default="0.3,0.5,0.6,0.7",
                       help="comma-separated fractions in [0, 1) for the unstructured runs (N:M patterns have their own)")
    sweep.add_argument("--patterns", default="unstructured",
                       help="comma-separated: unstructured, structured, 2:4, 4:8 or any N:M")
    _add_option_args(sweep, "on every run it applies to: ")
    sweep.add_argument("--calib", nargs="+", default=["builtin"], metavar="SOURCE",
                       help="builtin, text FILE(s), or hf:NAME[:CONFIG] (wikitext2, c4 or any dataset)")
    sweep.add_argument("--nsamples", type=int, default=64)
    sweep.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--eval-nwindows", type=int, default=64)
    sweep.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length (PROTOCOL: 512)")
    sweep.add_argument("--out", required=True, help="results folder; rerun with the same folder and settings to resume")
    sweep.add_argument("--speed", action="store_true",
                       help="measure each model's prefill and generation tokens/s too (batch 1; a chart against it)")

    return parser


def _progress(message: str, fraction: float | None) -> None:
    print(f"{message}{f' {fraction:.0%}' if fraction is not None else ''}", file=sys.stderr)


def _at_least(value: int, minimum: int, flag: str) -> None:
    if value < minimum:
        raise UserError(f"{flag} must be at least {minimum}; got {value}.")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _fractions(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in _split(text)]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated fractions such as 0.3,0.5; got {text!r}.") from None


def model_source(args):
    return ModelSource(os.path.expanduser(args.model), args.revision, args.token, args.trust_remote_code, args.device,
                       args.dtype)


def calibration_spec(args):
    """The calibration flags, their counts checked."""
    _at_least(args.nsamples, 1, "--nsamples")
    _at_least(args.seqlen, 2, "--seqlen")
    _at_least(args.seed, 0, "--seed")
    return CalibrationSpec(tuple(args.calib), args.nsamples, args.seqlen, args.seed)


def task_spec(args):
    """The zero-shot flags, or None without --tasks."""
    if args.tasks is None:
        if args.tasks_dir is not None or args.limit is not None or args.num_fewshot:
            raise UserError("--tasks-dir, --limit and --num-fewshot go with --tasks: name the tasks to measure.")
        return None
    return TaskSpec(task_names(args.tasks), Path(args.tasks_dir).expanduser().absolute() if args.tasks_dir else None,
                    args.limit, args.num_fewshot)


def _add_option_args(parser, prefix: str) -> None:
    """Each option's flag, and --<key>-effort for an option with named settings (methods.OPTIONS)."""
    for key, option in OPTIONS.items():
        parser.add_argument(f"--{key}", action="store_true", help=prefix + option.description)
        if option.efforts:
            parser.add_argument(f"--{key}-effort", choices=list(option.efforts), default=None,
                                help=f"with --{key}: " + "; ".join(f"{name}: {note}" for name, (note, _) in
                                                                   option.efforts.items()) + f" (default {next(iter(option.efforts))})")


def chosen_options(args) -> tuple[str, ...]:
    return tuple(key for key in OPTIONS if getattr(args, key))


def chosen_efforts(args) -> dict[str, str]:
    """The efforts named on the command line, by option key (PruneConfig refuses one whose option is off)."""
    return {key: getattr(args, f"{key}_effort") for key, option in OPTIONS.items()
            if option.efforts and getattr(args, f"{key}_effort")}


def prune_job(args):
    """The prune flags as the engine's job: everything after this reads the job, not the flags."""
    calibration = calibration_spec(args)
    _at_least(args.eval_nwindows, 1, "--eval-nwindows")
    config = PruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, layerwise=args.layerwise,
                         include=tuple(args.include), exclude=tuple(args.exclude), prune_head=args.prune_lm_head,
                         batch_size=args.batch_size, wanda_variant=args.wanda_variant,
                         options=chosen_options(args), efforts=chosen_efforts(args), restore_on_abort=False,
                         widths=args.widths)
    return PruneJob(model_source(args), config, calibration, Path(args.out).expanduser().absolute(), args.overwrite,
                    args.eval_nwindows if args.eval else None, "offload" if args.offload else "memory",
                    parse_bytes(args.max_memory) if args.max_memory is not None else None, task_spec(args),
                    args.speed)


class Bar:
    """The engine's events on a progress bar that counts blocks (two passes each: they cost alike, so its rate and
    ETA hold; linears do not)."""

    def __init__(self, shown: bool):
        self.shown, self.bar = shown, None

    def __call__(self, event) -> None:
        if isinstance(event, ev.RunStarted):  # made here, so that nothing is drawn before the run starts
            self.bar = tqdm(total=len(event.blocks), unit="block", file=sys.stderr, dynamic_ncols=True,
                            disable=not self.shown, desc=f"{event.method} {event.pattern}")
        elif isinstance(event, ev.LinearPruned):
            self.bar.set_postfix_str(f"linear {event.done}/{event.total} {event.name.rsplit('.', 1)[-1]} "
                                     f"{event.sparsity:.1%}")
        elif isinstance(event, ev.BlockShrunk) and self.shown:
            tqdm.write(f"block {event.index}: kept {event.kept_heads}/{event.total_heads} heads, "
                           f"{event.kept_channels}/{event.total_channels} MLP channels, "
                           f"{event.parameters_after:,}/{event.parameters_before:,} linear weights", file=sys.stderr)
        elif isinstance(event, ev.BlockFinished):
            self.bar.update(1)


class TaskBar:
    """Zero-shot progress: a bar per model and task, counting its requests."""

    def __init__(self):
        self.bar, self.shown = None, None

    def __call__(self, model: str, where) -> None:
        if not where.total:  # its requests are being built (lm_eval draws a bar of its own for that)
            return
        if self.shown != (model, where.task):
            self.close()
            self.shown = (model, where.task)
            self.bar = tqdm(total=where.total, unit="request", file=sys.stderr, dynamic_ncols=True,
                            desc=f"{model} {where.task} ({where.number + 1}/{where.tasks})")
        self.bar.update(where.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_zero_shot(measured: dict) -> None:
    print(zero_shot_note(measured))
    print("\n".join(zero_shot_table(measured)))


def cmd_prune(args) -> dict:
    job = prune_job(args)
    bar, task_bar = Bar(distributed.rank() == 0), TaskBar()
    try:
        report = prune_and_export(job, bar, _progress, log=lambda line: print(line, file=sys.stderr),
                                  on_task=task_bar)
    except (RunError, Cancelled) as e:
        if args.debug and isinstance(e, RunError):
            print(e.detail, file=sys.stderr)
        raise UserError(f"Pruning failed: {str(e).rstrip('.')}. Nothing was exported.") from None
    finally:
        if bar.bar is not None:
            bar.bar.close()
        task_bar.close()
    if report and not args.json:
        print(f"{report['method']} {report['pattern']}: achieved sparsity {report['achieved_sparsity']:.2%} over "
              f"{report['pruned_parameters']:,} weights in {report['seconds']['calibration_and_pruning']:.1f} s"
              + (" (offloaded block by block)" if "offload" in report else ""))
        if report["structure"]:
            print(f"parameters {report['parameters']['before']:,} -> {report['parameters']['after']:,}; "
                  f"export: {report['structure']['export']}")
        for key, value in (report["perplexity"] or {}).items():
            print(f"{key} perplexity {value['perplexity']:.3f} (seqlen {value['seqlen']}, {value['nwindows']} windows)")
        if report["zero_shot"]:
            print_zero_shot(report["zero_shot"])
        if report["parameter_counts"]:
            print("\n".join(bought(report["parameter_counts"], report["speed"], report["export_bytes"])))
        print(f"exported to {report['export']}")
    return report


def cmd_eval(args) -> dict | None:
    """Perplexity, or with --tasks zero-shot accuracy (and perplexity too with --perplexity). The tasks are found
    and their datasets read before the model loads."""
    if args.list_tasks:
        names = list_tasks(Path(args.tasks_dir).expanduser() if args.tasks_dir else None)
        if args.json:
            return {"tasks": names}
        print("\n".join(names))
        return None
    _at_least(args.seqlen, 2, "--seqlen")
    _at_least(args.nwindows, 1, "--nwindows")
    spec = task_spec(args)
    if spec is not None and args.offload:
        raise UserError("Zero-shot tasks run every example through the whole model: drop --offload to use --tasks.")
    source = model_source(args)
    source.check()
    text = read_text_files([args.text], "evaluation") if args.text else None
    tasks = prepare_tasks(spec) if spec is not None else None
    started = time.perf_counter()
    loaded = source.load(args.offload, _progress)
    out = {"model": loaded.name, "device": loaded.info.device, "dtype": loaded.info.dtype,
           "load_seconds": time.perf_counter() - started}
    if tasks is None or args.perplexity:
        check_seqlen(args.seqlen, loaded.info.context_length)
        check_eval_fits(loaded.info, vocab_size(loaded.model), args.seqlen, hint="lower --seqlen")
        result = perplexity(loaded.model, loaded.tokenizer, text, args.seqlen, args.nwindows, lazy=loaded.lazy)
        out.update(result.__dict__)
        if not args.json:
            print(f"{loaded.name}: perplexity {result}")
    if tasks is not None:
        bar = TaskBar()
        try:
            measured = {"accuracy": tasks.evaluate(loaded.model, loaded.tokenizer,
                                                   progress=lambda where: bar(loaded.name, where)).as_dict()}
        finally:
            bar.close()
        out["zero_shot"] = measured["accuracy"]
        if not args.json:
            print_zero_shot(measured)
    return out


def cmd_sweep(args) -> dict:
    calibration = calibration_spec(args)
    _at_least(args.eval_nwindows, 1, "--eval-nwindows")
    _at_least(args.eval_seqlen, 2, "--eval-seqlen")
    job = sw.SweepJob(model_source(args), calibration,
                      sw.sweep_runs(_split(args.methods), _fractions(args.sparsities, "--sparsities"),
                                    _split(args.patterns), chosen_options(args), chosen_efforts(args)),
                      Path(args.out).expanduser().absolute(), args.eval_nwindows, args.eval_seqlen, args.speed)
    bar = None
    try:
        for event in sw.run_job(job, _progress):
            if isinstance(event, sw.SweepStarted):
                bar = tqdm(total=event.total, unit="run", file=sys.stderr, dynamic_ncols=True)
            elif isinstance(event, sw.RunSkipped):
                bar.update(1)
            elif isinstance(event, sw.RunStarting):
                bar.set_description(event.spec.key)
            elif isinstance(event, sw.RunProgress):
                bar.set_postfix_str(f"linear {event.done}/{event.total}")
            elif isinstance(event, sw.RunDone):
                bar.update(1)
                bar.set_postfix_str(f"perplexity {event.row['perplexity']:.2f}")
            elif isinstance(event, sw.SweepFinished):
                finished = event
    finally:
        if bar is not None:
            bar.close()
    if not args.json:
        for row in finished.rows:
            speed = row.get("generation_tokens_per_second")
            print(f"{row['key']:<30} sparsity {row['achieved_sparsity']:.4f}  perplexity {row['perplexity']:.3f}  "
                  f"prune {row['prune_seconds']:.1f} s  {row['parameters']:,} parameters" +
                  (f"  generation {speed:.1f} tok/s" if speed is not None else ""))
        print(f"results in {job.out}: {sw.RESULTS_CSV}, {sw.RESULTS_JSON}, {sw.CHART_HTML}")
    return {"out": str(job.out), "header": finished.header, "rows": finished.rows}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("app", "prune", "eval", "sweep", "-h", "--help"):
        argv = ["app", *argv]  # `wanda-gui` alone, or with app options, opens the app
    args = _parser().parse_args(argv)
    try:
        if args.command == "app":
            serve(args)
            return 0
        result = {"prune": cmd_prune, "eval": cmd_eval, "sweep": cmd_sweep}[args.command](args)
        if args.json and result:
            print(json.dumps(result, indent=2))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        distributed.stop()


if __name__ == "__main__":
    sys.exit(main())
