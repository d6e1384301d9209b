"""Perplexity on PROTOCOL.md's evaluation windows."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .architecture import capture_block_inputs, ending_with
from .calibration import builtin_evaluation_text, evaluation_windows, tokenize
from .errors import UserError
from .passes import run_block

if TYPE_CHECKING:
    from .offload import LazyModel


@dataclasses.dataclass
class Perplexity:
    perplexity: float
    seqlen: int
    stride: int
    nwindows: int
    tokens: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.perplexity:.3f} (seqlen {self.seqlen}, stride {self.stride}, {self.nwindows} windows)"


@torch.inference_mode()
def window_losses(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4,
                  cancel: threading.Event | None = None,
                  progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of each window, computed in fp32; progress(windows done, total) after each batch."""
    device = next(model.parameters()).device
    losses = []
    for start in range(0, len(windows), batch_size):
        if cancel is not None and cancel.is_set():
            raise UserError("Evaluation stopped.")
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        losses.append(loss.view(len(ids), -1).mean(dim=1).cpu())
        if progress is not None:
            progress(start + len(ids), len(windows))
    return torch.cat(losses)


@torch.inference_mode()
def blockwise_window_losses(lazy: "LazyModel", windows: torch.Tensor, batch_size: int = 4,
                            cancel: threading.Event | None = None,
                            progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """window_losses for a model whose blocks come in one at a time (core.offload): every window's hidden states
    go through block 0, then block 1..., then the model's own forward finishes them (final norm, head).
    progress(windows, total) moves with the blocks done, in windows' units like window_losses'."""
    device = lazy.device
    hidden, calls = capture_block_inputs(lazy.model, lazy.blocks, windows, batch_size, device)
    for i, block in enumerate(lazy.blocks):
        if cancel is not None and cancel.is_set():
            raise UserError("Evaluation stopped.")
        lazy.load_block(i)
        try:
            run_block(block, hidden, calls[i], batch_size, None)
        finally:
            lazy.release_block(i)
        if progress is not None:
            progress(len(windows) * (i + 1) // (len(lazy.blocks) + 1), len(windows))
    losses, final = [], []
    with ending_with(lazy.blocks, final):
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size].to(device)
            final[:] = [hidden[start:start + batch_size]]
            logits = lazy.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            losses.append(loss.view(len(ids), -1).mean(dim=1).cpu())
    if progress is not None:
        progress(len(windows), len(windows))
    return torch.cat(losses)


def perplexity(model: torch.nn.Module, tokenizer, text: str | None = None, seqlen: int = 512,
               nwindows: int | None = 64, batch_size: int = 4, cancel: threading.Event | None = None,
               progress: Callable[[int, int], None] | None = None, lazy: "LazyModel | None" = None) -> Perplexity:
    """exp(mean over windows of the window's mean cross-entropy); the built-in evaluation text by default.
    lazy: the model is offloaded, and evaluated block by block."""
    started = time.perf_counter()
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    windows = evaluation_windows(tokenize(tokenizer, text if text is not None else builtin_evaluation_text()),
                                 seqlen, nwindows, context)
    losses = (blockwise_window_losses(lazy, windows, batch_size, cancel, progress) if lazy is not None else
              window_losses(model, windows, batch_size, cancel, progress))
    return Perplexity(math.exp(losses.double().mean().item()), seqlen, seqlen, len(windows), windows.numel(),
                      time.perf_counter() - started)
