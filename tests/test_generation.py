"""Streaming chat generation: same text as plain generate, chat template used, a stop really stops."""

import threading
import time

import pytest

from conftest import tiny_model
from wanda_gui.core.errors import UserError
from wanda_gui.core.generation import GenerationSettings, StreamingGeneration, chat_inputs

MESSAGES = [{"role": "user", "content": "Tell me about the union."}]


def drain(run: StreamingGeneration, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not run.done and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.01)


def test_chat_template_is_applied(tiny_tokenizer):
    ids = chat_inputs(tiny_tokenizer, MESSAGES)["input_ids"][0]
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")


def test_streamed_text_equals_plain_greedy_generation(tiny_tokenizer):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None  # a random model would stop at random otherwise
    run = StreamingGeneration(model, tiny_tokenizer, MESSAGES, GenerationSettings(max_new_tokens=20), threading.Event())
    drain(run)
    inputs = chat_inputs(tiny_tokenizer, MESSAGES)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    expected = tiny_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert run.done and run.error is None
    assert run.text == expected and run.streamer.tokens == 20
    assert run.time_to_first_token is not None and run.tokens_per_second > 0 and run.stats().startswith("20 tokens") and run.stats().endswith("done")


def test_stop_ends_the_generation_early(tiny_tokenizer):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    stop = threading.Event()
    run = StreamingGeneration(model, tiny_tokenizer, MESSAGES, GenerationSettings(max_new_tokens=100_000), stop)
    while not run.poll():
        time.sleep(0.01)
    stop.set()
    run.join(timeout=30)
    assert not run._thread.is_alive()
    assert 0 < run.streamer.tokens < 100_000


def test_sampling_with_a_seed_is_reproducible(tiny_tokenizer):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    settings = GenerationSettings(max_new_tokens=12, greedy=False, temperature=1.0, top_p=0.95, seed=5)
    texts = []
    for _ in range(2):
        run = StreamingGeneration(model, tiny_tokenizer, MESSAGES, settings, threading.Event())
        drain(run)
        texts.append(run.text)
    assert texts[0] == texts[1]


@pytest.mark.parametrize("settings,message", [
    (GenerationSettings(max_new_tokens=0), "at least 1"),
    (GenerationSettings(greedy=False, temperature=0), "temperature above 0"),
    (GenerationSettings(greedy=False, top_p=1.5), "top-p"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        settings.generate_kwargs()


def test_empty_prompt_is_refused(tiny_tokenizer):
    with pytest.raises(UserError, match="Type a prompt"):
        chat_inputs(tiny_tokenizer, [{"role": "user", "content": "   "}])
