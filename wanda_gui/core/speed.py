"""What pruning buys, measured: parameters stored and non-zero, the bytes an export's weights take, and prefill and
generation speed at batch 1, measured the same way for any model so that a dense and a pruned one compare."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from .architecture import find_blocks, find_linears
from .errors import UserError
from .estimate import cpu_times, other_cpu_share
from .generation import GenerationSettings

PROMPT_TOKENS, NEW_TOKENS, REPEATS = 512, 128, 3
WARM_UP_TOKENS = 4  # a warm-up generation: the prompt's prefill and a few steps, so that kernels and caches are ready


class _Clock(BaseStreamer):
    """The moments generate hands over the prompt and then each new token (it moves them to the CPU, so the device
    has finished them; on CUDA it is synchronised again to be sure)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, value) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def prompt_ids(model: nn.Module, tokenizer_or_vocab, tokens: int, seed: int = 0) -> torch.Tensor:
    """A fixed prompt of random token ids (a dense matmul costs the same whatever the tokens), drawn from the
    tokenizer's vocabulary (or a vocabulary size) within the model's embeddings."""
    vocab = tokenizer_or_vocab if isinstance(tokenizer_or_vocab, int) else len(tokenizer_or_vocab)
    vocab = min(vocab, model.get_input_embeddings().num_embeddings)
    return torch.randint(vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))


def fitting_prompt(model: nn.Module, prompt_tokens: int, new_tokens: int) -> int:
    """The prompt's length, shortened when prompt and new tokens together would pass the model's context."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and prompt_tokens + new_tokens > context:
        prompt_tokens = context - new_tokens
    if prompt_tokens < 1 or new_tokens < 2:
        raise UserError(f"Measuring speed needs a prompt of at least 1 token and at least 2 new tokens within the "
                        f"model's context ({context} tokens); got {new_tokens} new tokens.")
    return prompt_tokens


@torch.inference_mode()
def timed_generation(model: nn.Module, ids: torch.Tensor, new_tokens: int, pad: int | None) -> tuple[float, float]:
    """One greedy generation of exactly new_tokens (min_new_tokens holds back the end of text): (seconds of the
    prompt's prefill, up to the first new token; seconds of the other new_tokens - 1 decoding steps)."""
    clock = _Clock(ids.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, streamer=clock, pad_token_id=pad,
                         **GenerationSettings(greedy=True).generate_kwargs())
    produced = out.shape[1] - ids.shape[1]
    if produced != new_tokens or len(clock.times) != new_tokens + 1:
        raise RuntimeError(f"generate produced {produced} tokens where {new_tokens} were asked for")
    return clock.times[1] - clock.times[0], clock.times[-1] - clock.times[1]


def measure_speeds(models: dict[str, nn.Module], tokenizer_or_vocab, device, prompt_tokens: int = PROMPT_TOKENS,
                   new_tokens: int = NEW_TOKENS, repeats: int = REPEATS,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Prefill and generation speed of each model at batch 1 on one device, the same prompt for all: a warm-up each,
    then `repeats` rounds taking the models in turn (so that other work on the machine weighs on all alike), the
    median of each, and the share of the CPU other work took meanwhile. progress(generations done, total)."""
    device = torch.device(device)
    first = next(iter(models.values()))
    prompt_tokens = fitting_prompt(first, prompt_tokens, new_tokens)
    ids = prompt_ids(first, tokenizer_or_vocab, prompt_tokens).to(device)
    pad = None if isinstance(tokenizer_or_vocab, int) else (
        tokenizer_or_vocab.pad_token_id if tokenizer_or_vocab.pad_token_id is not None
        else tokenizer_or_vocab.eos_token_id)
    runs = {name: [] for name in models}
    total, done = len(models) * (repeats + 1), 0
    since = cpu_times()
    for round_ in range(repeats + 1):
        for name, model in models.items():
            timing = timed_generation(model, ids, new_tokens if round_ else WARM_UP_TOKENS, pad)
            if round_:
                runs[name].append(timing)
            done += 1
            if progress is not None:
                progress(done, total)
    others = other_cpu_share(since)
    measured = {}
    for name, timings in runs.items():
        prefill = statistics.median(t[0] for t in timings)
        decode = statistics.median(t[1] for t in timings)
        measured[name] = {"prefill_tokens_per_second": prompt_tokens / prefill,
                          "generation_tokens_per_second": (new_tokens - 1) / decode,
                          "prefill_seconds": prefill, "generation_seconds": decode, "prompt_tokens": prompt_tokens,
                          "new_tokens": new_tokens, "repeats": repeats, "device": str(device),
                          "in_turns": len(models) > 1, "other_cpu_share": others}
    return measured


def measure_speed(model: nn.Module, tokenizer_or_vocab, device, prompt_tokens: int = PROMPT_TOKENS,
                  new_tokens: int = NEW_TOKENS, repeats: int = REPEATS) -> dict:
    """One model's prefill tokens/s (a prompt_tokens prompt up to its first new token) and generation tokens/s (the
    next new_tokens - 1 greedy steps), batch 1, medians of `repeats` after a warm-up."""
    return measure_speeds({"model": model}, tokenizer_or_vocab, device, prompt_tokens, new_tokens, repeats)["model"]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters stored (each tensor once, tied ones too) and non-zero, in the whole model and in its decoder blocks'
    linears, and the bytes they take (what an export's weights take, give or take the files' headers)."""
    parameters = list(model.parameters())  # tied parameters come once
    _, blocks = find_blocks(model)
    linears = {id(m.weight): m.weight for block in blocks for m in find_linears(block).values()}.values()
    return {"stored": sum(p.numel() for p in parameters),
            "nonzero": sum(int(torch.count_nonzero(p)) for p in parameters),
            "linear_stored": sum(w.numel() for w in linears),
            "linear_nonzero": sum(int(torch.count_nonzero(w)) for w in linears),
            "bytes": sum(p.numel() * p.element_size() for p in parameters)}


def export_bytes(folder: Path) -> int:
    """What an export's weights take on disk: its safetensors files."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
