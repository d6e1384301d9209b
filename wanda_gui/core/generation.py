"""Streaming chat generation with transformers' generate + TextIteratorStreamer, stoppable, with speed figures."""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .errors import UserError


@dataclasses.dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if self.max_new_tokens < 1:
            raise UserError("Max new tokens must be at least 1.")
        if self.greedy:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise UserError("Sampling needs a temperature above 0 and a top-p in (0, 1].")
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


def chat_inputs(tokenizer, messages: list[dict]) -> dict:
    """The model's chat template when it has one; otherwise a plain 'role: text' transcript."""
    if not messages or not str(messages[-1].get("content", "")).strip():
        raise UserError("Type a prompt first.")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer(transcript, return_tensors="pt")


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _CountingStreamer(TextIteratorStreamer):
    """Counts generated tokens and notes when the first one arrived."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, timeout=0.0, skip_special_tokens=True)
        self.tokens = 0
        self.first_token_at: float | None = None

    def put(self, value):
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.tokens += value.numel()
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        super().put(value)


class StreamingGeneration:
    """One reply generated on a background thread; poll() collects the text produced so far without blocking."""

    def __init__(self, model, tokenizer, messages: list[dict], settings: GenerationSettings, stop: threading.Event,
                 around: contextlib.AbstractContextManager | None = None):
        """around: a context the generation runs in, on its thread (the pruned model's 2:4 sparse kernels)."""
        device = next(model.parameters()).device
        inputs = chat_inputs(tokenizer, messages).to(device)
        self.streamer = _CountingStreamer(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._kwargs = dict(**inputs, max_new_tokens=settings.max_new_tokens, streamer=self.streamer, pad_token_id=pad,
                            stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]), **settings.generate_kwargs())
        self._seed = None if settings.greedy else settings.seed
        self._stop = stop
        self._model = model
        self._around = around if around is not None else contextlib.nullcontext()
        self.text = ""
        self.error: str | None = None
        self.done = False
        self.started = time.perf_counter()
        self.finished: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._seed is not None:
                torch.manual_seed(self._seed)
            with torch.inference_mode(), self._around:
                self._model.generate(**self._kwargs)
        except Exception as e:  # shown in the reply's column instead of killing the other one
            self.error = f"{type(e).__name__}: {e}"
            self.streamer.end()
        finally:
            self.finished = time.perf_counter()

    def poll(self) -> bool:
        """Take whatever text is ready; True when something changed."""
        changed = False
        while True:
            try:
                self.text += next(self.streamer)
                changed = True
            except queue.Empty:
                return changed
            except StopIteration:
                self.done = changed = True
                return changed

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.streamer.first_token_at is None else self.streamer.first_token_at - self.started

    @property
    def tokens_per_second(self) -> float | None:
        first = self.streamer.first_token_at
        end = self.finished or time.perf_counter()
        if first is None or self.streamer.tokens < 2 or end <= first:
            return None
        return (self.streamer.tokens - 1) / (end - first)

    def stats(self) -> str:
        ttft, tps = self.time_to_first_token, self.tokens_per_second
        parts = [f"{self.streamer.tokens} tokens"]
        if ttft is not None:
            parts.append(f"first token {ttft:.2f} s")
        if tps is not None:
            parts.append(f"{tps:.1f} tok/s")
        parts.append(("stopped" if self._stop.is_set() else "done") if self.done else "streaming…")
        return " · ".join(parts)
