"""Perplexity exactly as PROTOCOL.md defines it."""

import math

import pytest
import torch
from conftest import tiny_model

from wanda_gui.core.calibration import tokenize
from wanda_gui.core.evaluate import perplexity


# (2) perplexity is exp of the mean next-token loss, as transformers computes it
def test_perplexity_is_exp_of_the_mean_of_transformers_own_losses(tiny_tokenizer, text_file):
    """Not the mean of per-window exp(loss), and with labels shifted by one token."""
    model = tiny_model("llama", seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # windows' losses spread widely, so exp(mean) and mean(exp) differ clearly
    text = text_file.read_text()
    seqlen, nwindows = 32, 6
    ids = tokenize(tiny_tokenizer, text)
    windows = ids[: nwindows * seqlen].view(nwindows, seqlen)
    with torch.inference_mode():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in windows]
    expected = math.exp(torch.stack(losses).mean().item())
    mean_of_exp = torch.stack(losses).exp().mean().item()
    assert abs(mean_of_exp - expected) > 1e-3 * expected  # the test can tell the two apart

    result = perplexity(model, tiny_tokenizer, text, seqlen=seqlen, nwindows=nwindows, batch_size=4)
    assert result.nwindows == nwindows and result.tokens == nwindows * seqlen
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
