"""Step 5 · Chat side by side: one prompt to the dense and the pruned model, both replies streamed at once."""

from __future__ import annotations

import functools
import time

import gradio as gr
import torch

from ...core.errors import UserError
from ...core.devices import DTYPES
from ...core.generation import GenerationSettings, StreamingGeneration
from ...core.sparse24 import refusal, sparse_kernels
from ..common import CHATTING, Page, check_count, session, updates, user_errors

EXAMPLES = ["What is the capital of France?", "Write a haiku about autumn leaves.",
            "Explain in two sentences why the sky is blue.", "List three uses of a paperclip."]
CHAT_OUTPUTS = ("prompt", "dense_chat", "pruned_chat", "dense_stats", "pruned_stats", "chat_status")


def text_of(content) -> str:
    """A chat message's text, whether a string or Gradio's list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(text_of(c) for c in content or [])


def plain_history(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": text_of(m["content"])} for m in history or []]


SPEED_NOTE = ("<small>tok/s, alike in both columns: the tokens after the first over the seconds since it. The two "
              "columns generate at once and share the device (one finishing first leaves the other more of it): for "
              "each model's own speed, measured in turns, use **Measure speed** in step 4.</small>")
SPARSE_LABEL = "Pruned column on 2:4 sparse kernels"
NO_DENSE = "(The dense model was not kept: no memory for a copy. Reload to chat with it.)"
NO_PRUNED = "(No pruned model yet: start pruning in step 2, then ask again to compare the two.)"


def chat_failed(ws, message: str):
    return updates(CHAT_OUTPUTS, chat_status=f"✗ {message}")


def sparse_kernels_for(ws, wanted: bool):
    """The pruned model's 2:4 linears on sparse kernels, when asked for and the model and device allow; else the
    reason, in words."""
    if not wanted or ws.pruned is None:
        return None
    info = ws.require_model().info
    reason = refusal(torch.device(info.device), DTYPES[info.dtype], ws.summary.pattern)
    if reason:
        raise UserError(f"{reason} Untick '{SPARSE_LABEL}' to chat on the dense kernels.")
    return sparse_kernels(ws.pruned_linears())


@user_errors(chat_failed)
def chat(prompt, dense_chat, pruned_chat, max_new, greedy, temperature, top_p, chat_seed, sparse_chat=False,
         request: gr.Request = None):
    """Send one prompt to both models (the dense one alone before a run) and stream the replies at once,
    round-robin on this thread."""
    ws = session(request)
    out = functools.partial(updates, CHAT_OUTPUTS)
    if not (prompt or "").strip():
        yield out(chat_status="Type a prompt first.")
        return
    loaded = ws.require_model()
    if ws.activity in ("pruning", "comparing methods", "measuring speed"):  # the chat would disturb the timings
        stop = "" if ws.activity == "measuring speed" else " (or press its Stop)"
        raise UserError(f"This session is {ws.activity}; chat once it has finished{stop}.")
    settings = GenerationSettings(check_count(max_new, "Max new tokens"), bool(greedy), float(temperature),
                                  float(top_p), check_count(chat_seed, "Seed", 0))
    around = sparse_kernels_for(ws, bool(sparse_chat))
    ws.stop_chat.clear()
    columns = [(dense_chat, ws.dense_model, NO_DENSE, None), (pruned_chat, ws.pruned, NO_PRUNED, around)]
    runs, histories = [], []
    for history, model, missing, kernels in columns:
        history = plain_history(history) + [{"role": "user", "content": prompt}]
        runs.append(StreamingGeneration(model, loaded.tokenizer, history, settings, ws.stop_chat, kernels)
                    if model is not None else None)
        histories.append(history + [{"role": "assistant", "content": "" if model is not None else missing}])
    yield out(prompt="", dense_chat=histories[0], pruned_chat=histories[1], chat_status="… Generating…")
    try:
        while True:
            changed = False
            for run, history in zip(runs, histories):
                if run is not None and run.poll():
                    history[-1]["content"] = run.text + (f"\n\n⚠ {run.error}" if run.error else "")
                    changed = True
            if changed:
                yield out(dense_chat=histories[0], pruned_chat=histories[1], **stats(runs))
            if all(run is None or run.done for run in runs):
                break
            time.sleep(0.03)
        for column, run in zip(("dense", "pruned"), runs):
            if run is not None and run.tokens_per_second is not None:
                ws.record_generation(column, run.tokens_per_second)
        yield out(dense_chat=histories[0], pruned_chat=histories[1], **stats(runs),
                  chat_status="■ Stopped." if ws.stop_chat.is_set() else "")
    finally:
        ws.stop_chat.set()  # a Stop, a closed tab or an error ends both generations
        for run in runs:
            if run is not None:
                run.join(timeout=5)


def stats(runs) -> dict:
    return {f"{column}_stats": run.stats() if run is not None else "" for column, run in zip(("dense", "pruned"), runs)}


def stop_chat(request: gr.Request):
    session(request).stop_chat.set()
    return "■ Stopped."


def layout(page: Page) -> None:
    add = page.add
    with gr.Column(elem_classes="step"):
        gr.Markdown("### 5 · Chat side by side")
        with gr.Row():
            with gr.Column():
                add("dense_chat", gr.Chatbot(label="Dense", height=380, buttons=["copy"], elem_id="dense-chat",
                                             placeholder="The original model answers here."))
                add("dense_stats", gr.Markdown(elem_id="dense-stats"))
            with gr.Column():
                add("pruned_chat", gr.Chatbot(label="Pruned", height=380, buttons=["copy"], elem_id="pruned-chat",
                                              placeholder="The pruned model answers here."))
                add("pruned_stats", gr.Markdown(elem_id="pruned-stats"))
        with gr.Row():
            add("prompt", gr.Textbox(show_label=False, placeholder="Ask both models something (the dense one alone before pruning)…",
                                     scale=6, elem_id="prompt"))
            add("send_btn", gr.Button("Send", variant="primary", interactive=False, scale=1, elem_id="send"))
            add("chat_stop", gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop"))
            add("clear_btn", gr.Button("Clear", scale=1, elem_id="clear"))
        add("chat_status", gr.Markdown(elem_id="chat-status"))
        gr.Markdown(SPEED_NOTE, elem_id="chat-speed-note")
        gr.Examples(EXAMPLES, inputs=page["prompt"], label="Example prompts")
        with gr.Accordion("Generation settings (shared by both columns)", open=False):
            with gr.Row():
                add("max_new", gr.Slider(1, 512, value=128, step=1, label="Max new tokens"))
                add("greedy", gr.Checkbox(value=True, label="Greedy (deterministic)"))
                add("temperature", gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature"))
                add("top_p", gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p"))
                add("chat_seed", gr.Number(0, label="Seed", precision=0, minimum=0))
            add("sparse_chat", gr.Checkbox(value=False, label=SPARSE_LABEL,
                                           info="NVIDIA GPUs of compute capability 8.0+, fp16/bf16, a 2:4 run: "
                                                "refused with the reason elsewhere", elem_id="sparse-chat"))


def wire(page: Page) -> None:
    send_event = page.queued(page["send_btn"].click, "chat_status", "answer", chat, page.out(CHAT_OUTPUTS),
                             api_name="chat", **CHATTING)
    submit_event = page.queued(page["prompt"].submit, "chat_status", "answer", chat, page.out(CHAT_OUTPUTS),
                               api_visibility="private", **CHATTING)
    page["chat_stop"].click(stop_chat, None, page["chat_status"], cancels=[send_event, submit_event],
                            api_name="stop_chat", queue=False)
    page["clear_btn"].click(lambda: ([], [], "", "", ""), None,
                            page.out(("dense_chat", "pruned_chat", "dense_stats", "pruned_stats", "chat_status")),
                            api_name="clear", queue=False)
