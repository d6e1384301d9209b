"""Command line: `wanda-gui prune`, `wanda-gui eval`, `wanda-gui sweep`, and `wanda-gui [app]` for the Gradio app."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .core.errors import UserError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin", help="'builtin', a local folder, or a hub id org/name (default: builtin)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--token", default=os.environ.get("HF_TOKEN"), help="hub token (default: $HF_TOKEN)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanda-gui", description="Prune LLMs with Wanda; with no command, open the app.")
    sub = parser.add_subparsers(dest="command")

    from .app.main import add_arguments
    from .core.methods import METHODS, OPTIONS

    add_arguments(sub.add_parser("app", help="open the Gradio app (the default)"))

    prune = sub.add_parser("prune", help="prune a model and export it")
    _add_model_args(prune)
    prune.add_argument("--method", default="wanda", choices=list(METHODS),
                       help="; ".join(m.description for m in METHODS.values()))
    prune.add_argument("--wanda-variant", action="store_true",
                       help="Wanda only: the reference's per-layer alpha search (rows differ in sparsity; slightly worse "
                            "than plain Wanda on the built-in model)")
    for name, step in OPTIONS.items():
        prune.add_argument(f"--{name}", action="store_true", help=step.description)
    prune.add_argument("--sparsity", type=float, default=0.5, help="fraction of each row to zero, in [0, 1) (unstructured)")
    prune.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8 or any N:M")
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
    prune.add_argument("--offload", action="store_true",
                       help="bring the model in block by block from its safetensors and write the export block by "
                            "block: memory holds one block, what lies outside the blocks and the calibration data")
    prune.add_argument("--max-memory", default=None, metavar="SIZE",
                       help="e.g. 3GiB: the memory this run may use (RAM on CPU, the GPU's on CUDA); offloads when the "
                            "model does not fit whole, and refuses up front what cannot fit even block by block")
    prune.add_argument("--out", required=True, help="export folder: new, empty, or a previous export with --overwrite")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace a previous export of this tool (a folder holding anything else is never replaced)")

    ev = sub.add_parser("eval", help="perplexity of a model on the evaluation text")
    _add_model_args(ev)
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
    sweep.add_argument("--patterns", default="unstructured", help="comma-separated: unstructured, 2:4, 4:8 or any N:M")
    sweep.add_argument("--owl", action="store_true", help="OWL's per-block sparsities on every unstructured run")
    sweep.add_argument("--calib", nargs="+", default=["builtin"], metavar="SOURCE",
                       help="builtin, text FILE(s), or hf:NAME[:CONFIG] (wikitext2, c4 or any dataset)")
    sweep.add_argument("--nsamples", type=int, default=64)
    sweep.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--eval-nwindows", type=int, default=64)
    sweep.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length (PROTOCOL: 512)")
    sweep.add_argument("--out", required=True, help="results folder; rerun with the same folder and settings to resume")

    return parser


def _progress(message: str, fraction: float | None) -> None:
    print(f"{message}{f' {fraction:.0%}' if fraction is not None else ''}", file=sys.stderr)


def _load(args, offload: bool = False):
    from .core.models import load_model

    started = time.perf_counter()
    loaded = load_model(os.path.expanduser(args.model), args.device, args.dtype, args.revision, args.token, args.trust_remote_code,
                        progress=_progress, offload=offload)
    return loaded, time.perf_counter() - started


def _at_least(value: int, minimum: int, flag: str) -> None:
    if value < minimum:
        raise UserError(f"{flag} must be at least {minimum}; got {value}.")


def check_model_args(args) -> None:
    """Device and dtype are checked before anything is loaded."""
    from .core.devices import resolve_device, resolve_dtype

    resolve_dtype(args.dtype, resolve_device(args.device))


def source_folder(model: str) -> Path | None:
    """The local model folder --model names, if it is one (the export must stay out of it)."""
    path = Path(model.strip())
    return path if model.strip() != "builtin" and path.is_dir() else None


def check_prune_args(args):
    """Everything about a prune that needs no model, before the model is loaded: the parsed PruneConfig."""
    from .core.calibration import check_text_files, text_file_sources
    from .core.engine import PruneConfig
    from .core.export import check_target
    from .core.methods import OPTIONS
    from .core.offload import parse_bytes, refuse_with_offload

    _at_least(args.nsamples, 1, "--nsamples")
    _at_least(args.seqlen, 2, "--seqlen")
    _at_least(args.seed, 0, "--seed")
    _at_least(args.eval_nwindows, 1, "--eval-nwindows")
    config = PruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, layerwise=args.layerwise,
                         include=tuple(args.include), exclude=tuple(args.exclude), prune_head=args.prune_lm_head,
                         batch_size=args.batch_size, wanda_variant=args.wanda_variant,
                         **{name: getattr(args, name) for name in OPTIONS},
                         restore_on_abort=False)  # a stopped CLI run saves nothing
    check_model_args(args)
    check_text_files(text_file_sources(args.calib), "calibration")
    check_target(Path(args.out).expanduser().absolute(), args.overwrite, source_folder(args.model))
    if args.max_memory is not None:
        parse_bytes(args.max_memory)  # a typo fails here, before anything is loaded
    if args.offload:
        refuse_with_offload(config)
    return config


def cmd_prune(args) -> dict:
    from .core import distributed
    from .core.calibration import calibration_text, check_seqlen, windows_from_text
    from .core.engine import validate
    from .core.estimate import check_eval_fits, check_fits
    from .core.methods import get_method

    config = check_prune_args(args)
    needs_activations = get_method(config.method).needs_activations
    text = calibration_text(args.calib) if needs_activations else None
    if distributed.launched_by_torchrun():  # each rank calibrates on its share; rank 0 evaluates and exports
        if not needs_activations:
            raise UserError(f"{config.method} reads no calibration data: there is nothing to share among torchrun "
                            "processes; run it in one process.")
        if config.reconstruct:
            raise UserError("--reconstruct fits weights on each process's own windows, so the processes would end "
                            "with different models: run it in one process.")
        if args.offload or args.max_memory:
            raise UserError("--offload and --max-memory run in one process for now: drop them, or torchrun.")
        args.device = distributed.start(args.device)
    loaded, load_seconds = _load_within_budget(args, config) if args.max_memory else _load(args, args.offload)
    validate(loaded.model, config)
    check_seqlen(args.seqlen, loaded.info.context_length)
    check_fits(loaded.info, config.method, args.nsamples, args.seqlen, batch_size=config.batch_size,
               hint="lower --nsamples or --seqlen")
    if args.eval:
        check_eval_fits(loaded.info, vocab_size(loaded.model), args.seqlen, hint="lower --seqlen")
    windows, calibration = None, None
    if needs_activations:
        windows, calibration = windows_from_text(loaded.tokenizer, *text, args.nsamples, args.seqlen, args.seed,
                                                 loaded.info.context_length)
    run = _prune_offloaded if loaded.lazy is not None else _prune_in_memory
    report = run(args, config, loaded, windows, calibration, {"load": load_seconds})
    if report and not args.json:
        print(f"{report['method']} {report['pattern']}: achieved sparsity {report['achieved_sparsity']:.2%} over "
              f"{report['pruned_parameters']:,} weights in {report['seconds']['calibration_and_pruning']:.1f} s"
              + (" (offloaded block by block)" if loaded.lazy is not None else ""))
        for key, value in (report["perplexity"] or {}).items():
            print(f"{key} perplexity {value['perplexity']:.3f} (seqlen {value['seqlen']}, {value['nwindows']} windows)")
        print(f"exported to {report['export']}")
    return report


def _load_within_budget(args, config):
    """--max-memory: open the model with empty blocks to size it, then offload or load it whole, as the budget
    allows (refused with the numbers when even block by block is too much)."""
    import psutil

    from .core.devices import format_bytes
    from .core.estimate import evaluation_parts, memory_parts
    from .core.offload import parse_bytes, plan_memory, refuse_with_offload

    budget = parse_bytes(args.max_memory)
    before = psutil.Process().memory_info().rss  # this process so far: Python, torch, transformers
    loaded, seconds = _load(args, offload=True)
    lazy, info = loaded.lazy, loaded.info
    parts = memory_parts(info, config.method, args.nsamples, args.seqlen, dense_copy=False, batch_size=config.batch_size)
    if args.eval:
        hidden = args.eval_nwindows * args.seqlen * info.hidden_size * 4  # an offloaded evaluation's hidden states
        evaluation = {**evaluation_parts(info, vocab_size(loaded.model), args.seqlen), "hidden states": hidden}
        parts = max(parts, evaluation, key=lambda p: sum(p.values()))
    if lazy.device.type == "cpu":
        parts = {"this process before loading": before, **parts}
    offload = plan_memory(info.memory_bytes, lazy.resident_bytes(), lazy.block_bytes(), parts, budget,
                          args.offload, str(lazy.device))
    if not offload:
        del loaded, lazy
        return _load(args, offload=False)
    refuse_with_offload(config)
    if not args.offload:
        print(f"The model ({format_bytes(info.memory_bytes)}) does not fit in --max-memory {args.max_memory} with the "
              "run: pruning it block by block (offload)", file=sys.stderr)
    return loaded, seconds


def _drive(events, lead: bool, debug: bool):
    """Show the engine's events on a progress bar; the summary, or UserError with the reason it stopped."""
    from tqdm import tqdm

    from .core import events as ev

    # The bar counts blocks (two passes each: they cost alike), so its rate and ETA hold; linears do not.
    bar = tqdm(total=None, unit="block", file=sys.stderr, dynamic_ncols=True, disable=not lead)
    try:
        for event in events:
            if isinstance(event, ev.RunStarted):
                bar.reset(total=len(event.blocks))
                bar.set_description(f"{event.method} {event.pattern}")
            elif isinstance(event, ev.LinearPruned):
                bar.set_postfix_str(f"linear {event.done}/{event.total} {event.name.rsplit('.', 1)[-1]} {event.sparsity:.1%}")
            elif isinstance(event, ev.BlockFinished):
                bar.update(1)
            elif isinstance(event, ev.RunFinished):
                return event.summary
            elif isinstance(event, (ev.RunFailed, ev.RunCancelled)):
                if debug and isinstance(event, ev.RunFailed):
                    print(event.detail, file=sys.stderr)
                raise UserError(f"Pruning failed: {event.reason.rstrip('.')}. Nothing was exported.")
    finally:
        bar.close()
    raise UserError("Pruning did not finish. Nothing was exported.")


def _prune_in_memory(args, config, loaded, windows, calibration, timings) -> dict:
    from .core import distributed
    from .core.engine import prune
    from .core.evaluate import perplexity
    from .core.export import export_model, make_report

    lead = distributed.rank() == 0
    ppl = {}
    if args.eval and lead:
        ppl["dense"] = perplexity(loaded.model, loaded.tokenizer, seqlen=args.seqlen, nwindows=args.eval_nwindows)
        print(f"dense perplexity {ppl['dense']}", file=sys.stderr)
    share = windows if windows is None else distributed.shard(windows)
    shares = distributed.gather(0 if share is None else len(share))
    summary = _drive(prune(loaded.model, config, share, model_name=loaded.name), lead, args.debug)
    if not lead:
        return {}
    if args.eval:
        ppl["pruned"] = perplexity(loaded.model, loaded.tokenizer, seqlen=args.seqlen, nwindows=args.eval_nwindows)
        timings["evaluation"] = ppl["dense"].seconds + ppl["pruned"].seconds
        print(f"pruned perplexity {ppl['pruned']}", file=sys.stderr)
    if distributed.active():
        calibration = {**calibration, "processes": distributed.world_size(), "samples_per_process": shares}
    report = make_report(loaded.info, summary, calibration, timings, {k: v.__dict__ for k, v in ppl.items()} or None)
    out = export_model(loaded.model, loaded.tokenizer, Path(args.out).expanduser(), report, args.overwrite, source=loaded.path)
    report["export"] = str(out)
    return report


def _prune_offloaded(args, config, loaded, windows, calibration, timings) -> dict:
    """Block by block: each block is read, pruned, written into the export's shards and released; perplexity
    (asked for) is measured block by block too, the pruned one from the shards just written."""
    from .core.engine import prune
    from .core.evaluate import perplexity
    from .core.export import StreamedWeights, export_into, make_report, write_rest
    from .core.offload import Checkpoint, Offload

    lazy, out = loaded.lazy, Path(args.out).expanduser().absolute()
    ppl = {}
    with export_into(out, args.overwrite, loaded.path) as folder, StreamedWeights(folder, lazy.specs()) as weights:
        if args.eval:
            ppl["dense"] = perplexity(lazy.model, loaded.tokenizer, seqlen=args.seqlen, nwindows=args.eval_nwindows,
                                      lazy=lazy)
            print(f"dense perplexity {ppl['dense']}", file=sys.stderr)
        summary = _drive(prune(lazy.model, config, windows, model_name=loaded.name,
                               steps=(Offload(lazy, weights.write),)), True, args.debug)
        weights.write(lazy.resident_tensors())
        weights.finish()
        if args.eval:
            lazy.checkpoint = Checkpoint(folder)
            ppl["pruned"] = perplexity(lazy.model, loaded.tokenizer, seqlen=args.seqlen, nwindows=args.eval_nwindows,
                                       lazy=lazy)
            timings["evaluation"] = ppl["dense"].seconds + ppl["pruned"].seconds
            print(f"pruned perplexity {ppl['pruned']}", file=sys.stderr)
        report = make_report(loaded.info, summary, calibration, timings, {k: v.__dict__ for k, v in ppl.items()} or None)
        report["offload"] = {"block_bytes": lazy.block_bytes(), "resident_bytes": lazy.resident_bytes(),
                             "max_memory": args.max_memory}
        write_rest(lazy.model, loaded.tokenizer, folder, report)
    report["export"] = str(out)
    return report


def vocab_size(model) -> int:
    """Width of the logits, which a perplexity batch holds several times over."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size


def cmd_eval(args) -> dict:
    from .core.calibration import check_seqlen, read_text_files
    from .core.estimate import check_eval_fits
    from .core.evaluate import perplexity

    _at_least(args.seqlen, 2, "--seqlen")
    _at_least(args.nwindows, 1, "--nwindows")
    check_model_args(args)
    text = read_text_files([args.text], "evaluation") if args.text else None
    loaded, load_seconds = _load(args, args.offload)
    check_seqlen(args.seqlen, loaded.info.context_length)
    check_eval_fits(loaded.info, vocab_size(loaded.model), args.seqlen, hint="lower --seqlen")
    result = perplexity(loaded.model, loaded.tokenizer, text, args.seqlen, args.nwindows, lazy=loaded.lazy)
    if not args.json:
        print(f"{loaded.name}: perplexity {result}")
    return {"model": loaded.name, "device": loaded.info.device, "dtype": loaded.info.dtype,
            "load_seconds": load_seconds, **result.__dict__}


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _fractions(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in _split(text)]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated fractions such as 0.3,0.5; got {text!r}.") from None


def check_sweep_args(args):
    """Everything about a sweep that needs no model, before the model is loaded: its runs and output folder."""
    from .core.calibration import check_text_files, text_file_sources
    from .core.sweep import check_out_dir, plan

    specs = plan(_split(args.methods), _fractions(args.sparsities, "--sparsities"), _split(args.patterns), args.owl)
    _at_least(args.nsamples, 1, "--nsamples")
    _at_least(args.seqlen, 2, "--seqlen")
    _at_least(args.seed, 0, "--seed")
    _at_least(args.eval_nwindows, 1, "--eval-nwindows")
    _at_least(args.eval_seqlen, 2, "--eval-seqlen")
    check_model_args(args)
    check_text_files(text_file_sources(args.calib), "calibration")
    out = Path(args.out).expanduser().absolute()
    check_out_dir(out)
    return specs, out


def cmd_sweep(args) -> dict:
    from tqdm import tqdm

    from .core import sweep as sw
    from .core.calibration import calibration_text, check_seqlen, windows_from_text
    from .core.estimate import check_eval_fits, check_fits

    specs, out = check_sweep_args(args)
    text = calibration_text(args.calib)
    loaded, _ = _load(args)
    check_seqlen(args.seqlen, loaded.info.context_length)
    check_seqlen(args.eval_seqlen, loaded.info.context_length)
    for method in dict.fromkeys(s.method for s in specs):
        check_fits(loaded.info, method, args.nsamples, args.seqlen, dense_copy=True, hint="lower --nsamples or --seqlen")
    check_eval_fits(loaded.info, vocab_size(loaded.model), args.eval_seqlen, hint="lower --eval-seqlen")
    windows, calibration = windows_from_text(loaded.tokenizer, *text, args.nsamples, args.seqlen, args.seed,
                                             loaded.info.context_length)
    bar, finished = None, None
    try:
        for event in sw.run_sweep(loaded, specs, windows, calibration, args.eval_nwindows, out,
                                  eval_seqlen=args.eval_seqlen):
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
            print(f"{row['key']:<30} sparsity {row['achieved_sparsity']:.4f}  perplexity {row['perplexity']:.3f}")
        print(f"results in {out}: {sw.RESULTS_CSV}, {sw.RESULTS_JSON}, {sw.CHART_HTML}")
    return {"out": str(out), "header": sw.sweep_header(loaded, calibration, args.eval_seqlen, args.eval_nwindows),
            "rows": finished.rows}


def cmd_app(args) -> None:
    from .app.main import serve

    serve(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("app", "prune", "eval", "sweep", "-h", "--help"):
        argv = ["app", *argv]  # `wanda-gui` alone, or with app options, opens the app
    args = _parser().parse_args(argv)
    try:
        if args.command == "app":
            cmd_app(args)
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
        from .core.distributed import stop

        stop()


if __name__ == "__main__":
    sys.exit(main())
