"""Step 2 · Method and calibration: method, pattern, sparsity, options (methods.OPTIONS), calibration data, the
estimate, and Start/Stop (the run itself shows in the Live step)."""

from __future__ import annotations

import gradio as gr

from ...core.config import WIDTHS, PruneConfig, option_steps
from ...core.errors import UserError
from ...core.estimate import estimate, other_cpu_use
from ...core.masks import Pattern
from ...core.methods import METHODS, OPTIONS, get_method
from ..common import WORK, Page, check_count, served, session, updates, user_errors
from ..policy import ServePolicy
from .live import PRUNE_OUTPUTS, prune_failed, prune_stream

METHOD_NAMES = {method.label: name for name, method in METHODS.items()}  # the page's label -> the method's name
OPTION_NAMES = {option.label: key for key, option in OPTIONS.items()}  # the page's label -> the option's key
PATTERNS = ["unstructured", "2:4", "4:8", "custom N:M", "structured"]
CALIBRATION = ["Built-in corpus (State of the Union, 1900-1999)", "Text files", "Hub dataset"]


def globs(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in (text or "").replace(",", " ").split() if g.strip())


def option_keys(labels) -> tuple[str, ...]:
    """The page's option labels as PruneConfig's option keys."""
    unknown = [label for label in labels or () if label not in OPTION_NAMES]
    if unknown:
        raise UserError(f"Unknown option {unknown[0]!r}: choose from {', '.join(OPTION_NAMES)}.")
    return tuple(OPTION_NAMES[label] for label in labels or ())


def method_name(label: str) -> str:
    """The page's method label (or a method's own name, as API callers send it) as the method's name."""
    return METHOD_NAMES.get(label, label)


def prune_config(method, sparsity, pattern, custom_nm, include, exclude, prune_head, batch_size, wanda_variant,
                 options=(), widths="uniform", reconstruct_effort=None) -> PruneConfig:
    return PruneConfig(method=method_name(method), sparsity=sparsity,
                       pattern=custom_nm if pattern == "custom N:M" else pattern, include=globs(include),
                       exclude=globs(exclude), prune_head=bool(prune_head),
                       batch_size=check_count(batch_size, "Batch size", 0) or None, wanda_variant=bool(wanda_variant),
                       explain=True, options=option_keys(options), widths=widths or "uniform",
                       efforts=efforts_of(options, reconstruct_effort))


def method_choices(pattern: str) -> list[str]:
    """The methods a pattern takes: FLAP only with structured, single-weight methods (SparseGPT, RIA) never."""
    structured = pattern == "structured"
    return [method.label for method in METHODS.values()
            if (method.channel_score is not None if structured else not method.structured_only)]


def pattern_changed(pattern: str, method: str):
    """The method choice the pattern takes (keeping the current one where it can), and the widths shown only for
    the structured pattern."""
    choices = method_choices(pattern)
    return (gr.update(choices=choices, value=method if method in choices else choices[0]),
            gr.update(visible=pattern == "structured"))


def efforts_of(options, reconstruct_effort) -> dict[str, str]:
    """The page's effort choice, for reconstruction when it is on (the choice stays on the page when it is off)."""
    return {"reconstruct": reconstruct_effort} if reconstruct_effort and "reconstruct" in option_keys(options) else {}


def method_description(method: str) -> str:
    """One line under the method choice: what it does, and its paper."""
    return get_method(method_name(method)).description


def calibration_source(policy: ServePolicy, kind, files, dataset):
    if kind == CALIBRATION[0]:
        return "builtin"
    if kind == CALIBRATION[1]:
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        if not paths:
            raise UserError("Upload one or more .txt files for calibration, or pick the built-in corpus.")
        return paths
    if not (dataset or "").strip():
        raise UserError("Type a hub dataset: wikitext2, c4, or NAME[:CONFIG].")
    return policy.calibration_dataset(dataset)


@user_errors()
def estimate_text(method, nsamples, seqlen, options, reconstruct_effort, request: gr.Request):
    ws = session(request)
    if ws.loaded is None:
        return "Load a model to see an estimate."
    device = ws.loaded.info.device
    keys = tuple(key for key in option_keys(options) if OPTIONS[key].needs_activations <= get_method(
        method_name(method)).needs_activations)  # Start refuses the rest in words; the estimate leaves them out
    steps = option_steps(keys, {k: e for k, e in efforts_of(options, reconstruct_effort).items() if k in keys})
    e = estimate(ws.loaded.info, method_name(method), check_count(nsamples, "Samples"),
                 check_count(seqlen, "Sequence length", 2), not ws.offloaded,
                 busy=other_cpu_use() if device == "cpu" else 0.0, steps=steps)
    return f"Estimate on {device}: {e} ({e.breakdown()})."


def sparsity_label(pattern_choice: str, custom_nm: str):
    """The slider applies to unstructured pruning only; N:M fixes the sparsity at 1 - N/M."""
    if pattern_choice == "unstructured":
        return gr.update(interactive=True, label="Sparsity (unstructured)")
    if pattern_choice == "structured":
        return gr.update(interactive=True, label="Fraction of the block linears' weights removed (structured)")
    try:
        pattern = Pattern.parse(custom_nm if pattern_choice == "custom N:M" else pattern_choice)
        fixed = f"{pattern.sparsity(0):.0%}, set by {pattern}"
    except UserError:
        fixed = "set by the N:M pattern"
    return gr.update(interactive=False, label=f"Sparsity ({fixed})")


def layout(page: Page) -> None:
    add = page.add
    with gr.Column(scale=1, elem_classes="step"):
        gr.Markdown("### 2 · Prune")
        with gr.Row():
            # every method, so that an API caller may send FLAP with the structured pattern; the page narrows the
            # choice to the pattern's methods as it loads and whenever the pattern changes
            add("method", gr.Radio(list(METHOD_NAMES), value="Wanda", label="Method", elem_id="method"))
            add("pattern", gr.Radio(PATTERNS, value="unstructured", label="Pattern", elem_id="pattern",
                                    info="structured removes whole MLP channels and attention heads: a really smaller, "
                                         "faster model"))
        add("method_note", gr.Markdown(method_description("Wanda"), elem_id="method-note"))
        add("custom_nm", gr.Textbox(label="Custom N:M", value="1:4", visible=False, elem_id="custom-nm"))
        add("widths", gr.Radio(list(WIDTHS), value="uniform", label="Widths (structured)", visible=False,
                               info=" · ".join(f"{k}: {v}" for k, v in WIDTHS.items()), elem_id="widths"))
        add("sparsity", gr.Slider(0.0, 0.95, value=0.5, step=0.05, label="Sparsity (unstructured)",
                                  info="Fraction of each output row set to zero. N:M patterns zero 1 - N/M.",
                                  elem_id="sparsity"))
        add("calib_kind", gr.Radio(CALIBRATION, value=CALIBRATION[0], label="Calibration data", elem_id="calib"))
        add("files", gr.File(label="Text files", file_count="multiple", file_types=[".txt"], visible=False,
                             elem_id="calib-files"))
        add("dataset", gr.Textbox(label="Hub dataset", placeholder="wikitext2, c4, or NAME[:CONFIG]", visible=False))
        with gr.Row():
            add("nsamples", gr.Number(64, label="Samples", precision=0, minimum=1, elem_id="nsamples"))
            add("seqlen", gr.Number(512, label="Sequence length", precision=0, minimum=2, elem_id="seqlen"))
            add("seed", gr.Number(0, label="Seed", precision=0, minimum=0))
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                add("include", gr.Textbox(label="Only linears matching", placeholder="e.g. *.mlp.*  (globs on names)"))
                add("exclude", gr.Textbox(label="Skip linears matching", placeholder="e.g. *down_proj"))
            with gr.Row():
                add("prune_head", gr.Checkbox(label="Also prune the LM head (tied models: the embeddings too)",
                                              value=False))
                add("batch_size", gr.Number(0, label="Batch (windows per forward; 0 = auto)", precision=0, minimum=0))
            add("wanda_variant", gr.Checkbox(label="Wanda α-variant (the reference's per-layer α search; rows then "
                                             "differ in sparsity; slightly worse than plain Wanda on the built-in "
                                             "model: 51.6 vs 50.6 perplexity on P1)", value=False,
                                             elem_id="wanda-variant"))
        add("options", gr.CheckboxGroup(list(OPTION_NAMES), value=[], label="Options (on top of the method)",
                                        elem_id="options"))
        gr.Markdown(options_note(), elem_id="options-note")
        efforts = OPTIONS["reconstruct"].efforts
        add("reconstruct_effort", gr.Radio(list(efforts), value=next(iter(efforts)), label="Reconstruction effort",
                                           info="; ".join(f"{name}: {note}" for name, (note, _) in efforts.items()) +
                                           ". The estimate below counts it.", elem_id="reconstruct-effort"))
        add("estimate", gr.Markdown("Load a model to see an estimate.", elem_id="estimate"))
        with gr.Row():
            add("start_btn", gr.Button("Start pruning", variant="primary", interactive=False, elem_id="start"))
            add("stop_btn", gr.Button("Stop", variant="stop", interactive=False, elem_id="stop"))


def options_note() -> str:
    """The options' own one-line descriptions (the same as --help's), one per line."""
    return "\n".join(f"- {option.description}" for option in OPTIONS.values())


@user_errors(prune_failed)
def prune(method, sparsity, pattern, custom_nm, calib_kind, files, dataset, nsamples, seqlen, seed, include, exclude,
          prune_head, batch_size, wanda_variant, options, widths, reconstruct_effort=None,
          request: gr.Request = None):
    """Start: prune the session's model as the page says; step 3 shows the run."""
    ws = session(request)
    ws.require_model()
    config = prune_config(method, sparsity, pattern, custom_nm, include, exclude, prune_head, batch_size,
                          wanda_variant, options, widths, reconstruct_effort)
    source = calibration_source(served(request).policy, calib_kind, files, dataset)
    nsamples, seqlen = check_count(nsamples, "Samples"), check_count(seqlen, "Sequence length", 2)
    seed = check_count(seed, "Seed", 0)
    for shown in prune_stream(ws, ws.prune(config, source, nsamples, seqlen, seed), config.method):
        yield updates(PRUNE_OUTPUTS, **shown)


def stop_pruning(request: gr.Request):
    """Ask the run to stop; its own stream then says what became of the model (no race with that message)."""
    session(request).cancel.set()
    return gr.update(interactive=False)


def wire(page: Page) -> None:
    page["pattern"].change(lambda p: gr.update(visible=p == "custom N:M"), page["pattern"], page["custom_nm"],
                           queue=False, api_visibility="private")
    page["pattern"].change(pattern_changed, page.out(("pattern", "method")), page.out(("method", "widths")),
                           queue=False, api_visibility="private")
    for name in ("pattern", "custom_nm"):
        page[name].change(sparsity_label, page.out(("pattern", "custom_nm")), page["sparsity"], queue=False,
                          api_visibility="private")
    page["method"].change(method_description, page["method"], page["method_note"], queue=False,
                          api_visibility="private")
    page["calib_kind"].change(lambda k: (gr.update(visible=k == CALIBRATION[1]), gr.update(visible=k == CALIBRATION[2])),
                              page["calib_kind"], page.out(("files", "dataset")), queue=False, api_visibility="private")
    page.events["load"].then(estimate_text, page.inputs_of(estimate_text), page["estimate"], api_visibility="private")
    for name in ("method", "nsamples", "seqlen", "options", "reconstruct_effort"):
        page[name].change(estimate_text, page.inputs_of(estimate_text), page["estimate"], api_visibility="private")
    page.queued(page["start_btn"].click, "prune_status", "start pruning", prune, page.out(PRUNE_OUTPUTS),
                api_name="prune", **WORK)
    page["stop_btn"].click(stop_pruning, None, page["stop_btn"], api_name="stop", queue=False)
