"""Step 2 · Method and calibration: method, pattern, sparsity, options (OWL, DSnoT, block reconstruction), calibration
data, the estimate, and Start/Stop (the run itself shows in the Live step)."""

from __future__ import annotations

import gradio as gr

from ...core.errors import UserError
from ..common import Page, check_count, session, user_errors
from ..policy import ServePolicy

METHOD_NAMES = {"Wanda": "wanda", "Magnitude": "magnitude", "SparseGPT": "sparsegpt", "RIA": "ria"}
OPTION_NAMES = {"OWL": "owl", "DSnoT": "dsnot", "Block reconstruction": "reconstruct"}  # PruneConfig's fields
PATTERNS = ["unstructured", "2:4", "4:8", "custom N:M"]
CALIBRATION = ["Built-in corpus (State of the Union, 1900-1999)", "Text files", "Hub dataset"]


def globs(text: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in (text or "").replace(",", " ").split() if g.strip())


def option_fields(options) -> dict[str, bool]:
    """The page's option labels as PruneConfig's boolean fields."""
    unknown = [o for o in options or () if o not in OPTION_NAMES]
    if unknown:
        raise UserError(f"Unknown option {unknown[0]!r}: choose from {', '.join(OPTION_NAMES)}.")
    return {OPTION_NAMES[o]: True for o in options or ()}


def prune_config(method, sparsity, pattern_choice, custom_nm, include, exclude, prune_head, batch_size, wanda_variant,
                 options=()):
    from ...core.engine import PruneConfig

    return PruneConfig(method=method, sparsity=sparsity, pattern=custom_nm if pattern_choice == "custom N:M" else pattern_choice,
                       include=globs(include), exclude=globs(exclude), prune_head=bool(prune_head),
                       batch_size=check_count(batch_size, "Batch size", 0) or None, wanda_variant=bool(wanda_variant),
                       explain=True, **option_fields(options))


def method_description(name: str) -> str:
    """One line under the method choice: what it does, and its paper."""
    from ...core.methods import get_method

    return get_method(name).description


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
def estimate_text(method, nsamples, seqlen, request: gr.Request):
    from ...core.estimate import estimate

    ws = session(request)
    if ws.loaded is None:
        return "Load a model to see an estimate."
    e = estimate(ws.loaded.info, method.lower(), check_count(nsamples, "Samples"), check_count(seqlen, "Sequence length", 2),
                 not ws.offloaded)
    return f"Estimate on {ws.loaded.info.device}: {e} ({e.breakdown()})."


def sparsity_label(pattern_choice: str, custom_nm: str):
    """The slider applies to unstructured pruning only; N:M fixes the sparsity at 1 - N/M."""
    from ...core.masks import Pattern

    if pattern_choice == "unstructured":
        return gr.update(interactive=True, label="Sparsity (unstructured)")
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
            add("method", gr.Radio(list(METHOD_NAMES), value="Wanda", label="Method", elem_id="method"))
            add("pattern", gr.Radio(PATTERNS, value="unstructured", label="Pattern", elem_id="pattern"))
        add("method_note", gr.Markdown(method_description("Wanda"), elem_id="method-note"))
        add("custom_nm", gr.Textbox(label="Custom N:M", value="1:4", visible=False, elem_id="custom-nm"))
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
        add("estimate", gr.Markdown("Load a model to see an estimate.", elem_id="estimate"))
        with gr.Row():
            add("start_btn", gr.Button("Start pruning", variant="primary", interactive=False, elem_id="start"))
            add("stop_btn", gr.Button("Stop", variant="stop", interactive=False, elem_id="stop"))


def options_note() -> str:
    """The options' own one-line descriptions (the same as --help's), one per line."""
    from ...core.methods import OPTIONS

    return "\n".join(f"- {OPTIONS[field].description}" for field in OPTION_NAMES.values())


def wire(page: Page) -> None:
    page["pattern"].change(lambda p: gr.update(visible=p == "custom N:M"), page["pattern"], page["custom_nm"],
                           queue=False, api_visibility="private")
    for name in ("pattern", "custom_nm"):
        page[name].change(sparsity_label, page.out(("pattern", "custom_nm")), page["sparsity"], queue=False,
                          api_visibility="private")
    page["method"].change(method_description, page["method"], page["method_note"], queue=False,
                          api_visibility="private")
    page["calib_kind"].change(lambda k: (gr.update(visible=k == CALIBRATION[1]), gr.update(visible=k == CALIBRATION[2])),
                              page["calib_kind"], page.out(("files", "dataset")), queue=False, api_visibility="private")
    estimate_inputs = page.out(("method", "nsamples", "seqlen"))
    page.events["load"].then(estimate_text, estimate_inputs, page["estimate"], api_visibility="private")
    for name in ("method", "nsamples", "seqlen"):
        page[name].change(estimate_text, estimate_inputs, page["estimate"], api_visibility="private")
