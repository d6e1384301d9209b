"""2:4 sparse kernels: refused with the reason wherever they cannot run (every machine without an Ampere+ GPU), and,
where they can, the 2:4 linears swapped for sparse tensors for as long as asked and given back exactly. The kernels
themselves need a GPU: here a stand-in converter checks which weights are handed to them."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from wanda_gui.core import sparse24
from wanda_gui.core.architecture import find_blocks, find_linears
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.masks import Pattern
from wanda_gui.core.runs import drain

CALIB = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))


def test_refused_with_the_reason_off_a_capable_gpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert "run 2:4 sparsity only" in sparse24.refusal(cuda, torch.bfloat16, Pattern(4, 8))
    assert "run 2:4 sparsity only" in sparse24.refusal(cpu, torch.float32, Pattern())
    assert "NVIDIA GPU" in sparse24.refusal(cpu, torch.bfloat16, Pattern(2, 4))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    assert "Tesla T4 has 7.5" in sparse24.refusal(cuda, torch.float16, Pattern(2, 4))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert "fp16 or bf16" in sparse24.refusal(cuda, torch.float32, Pattern(2, 4))
    assert sparse24.refusal(cuda, torch.bfloat16, Pattern(2, 4)) is None


def test_two_four_is_read_from_the_weights():
    weight = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]])
    assert sparse24.is_two_four(weight)
    assert not sparse24.is_two_four(torch.tensor([[1.0, 1, 1, 0]]))
    assert not sparse24.is_two_four(torch.ones(2, 6))  # not groups of 4


def test_the_2_4_linears_run_on_the_kernels_inside_and_get_their_dense_weights_back(monkeypatch):
    """Inside: each 2:4 linear's weight is what the converter made of exactly its dense weight; a linear that is not
    2:4 and one whose shape the kernels refuse stay dense. After: the very same Parameters as before."""
    model = tiny_model("llama")
    drain(prune(model, PruneConfig(pattern="2:4", exclude=("*.v_proj",)), CALIB))
    linears = {f"{i}.{n}": m for i, b in enumerate(find_blocks(model)[1]) for n, m in find_linears(b).items()}
    before = {name: linear.weight for name, linear in linears.items()}
    handed = {}

    def stand_in(weight):
        if weight.shape[0] == 128:  # gate/up (128 x 64): off the kernels' tile here
            raise RuntimeError("shape not supported")
        handed[weight.data_ptr()] = weight
        return weight.clone()

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", stand_in)
    with sparse24.sparse_kernels(linears) as sparse:
        assert sorted(sparse) == sorted(n for n in linears if n.endswith(("q_proj", "k_proj", "o_proj", "down_proj")))
        for name, linear in linears.items():
            if name in sparse:
                assert linear.weight is not before[name] and torch.equal(linear.weight, before[name])
            else:
                assert linear.weight is before[name]
    assert all(linear.weight is before[name] for name, linear in linears.items())
    assert len(handed) == 8


def test_a_failure_inside_still_gives_the_dense_weights_back(monkeypatch):
    model = tiny_model("llama")
    drain(prune(model, PruneConfig(pattern="2:4"), CALIB))
    linears = find_linears(find_blocks(model)[1][0])
    before = {name: linear.weight for name, linear in linears.items()}
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda weight: weight.clone())
    with pytest.raises(KeyError):
        with sparse24.sparse_kernels(linears):
            raise KeyError("generation failed")
    assert all(linear.weight is before[name] for name, linear in linears.items())


def test_the_chat_says_why_it_cannot_use_the_kernels_here(tiny_model_dir, text_file):
    """Ticked on a CPU: the chat refuses in words, on its status line; unticked it answers."""
    from gradio_client import Client

    from test_app_api import error_of, load_tiny, prune_args, serving

    with serving() as demo:
        client = Client(demo.local_url, verbose=False)
        load_tiny(client, tiny_model_dir)
        client.predict(*prune_args([text_file], pattern="2:4"), api_name="/prune")
        refused = error_of(lambda: client.predict("Hello", [], [], 4, True, 0.7, 0.9, 0, True, api_name="/chat"))
        assert refused.startswith("2:4 sparse kernels need an NVIDIA GPU") and "Untick 'Pruned column on 2:4" in refused
        answered = client.predict("Hello", [], [], 4, True, 0.7, 0.9, 0, False, api_name="/chat")
        assert answered[2][1]["content"] and not answered[5].startswith("✗")
