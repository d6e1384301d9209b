"""The app with a model bigger than memory: loaded block by block (offload), both models stay on disk, the pruned
one written as it is pruned; the same weights, replies, perplexity and export as a session holding it whole."""

import pytest
import torch
from gradio_client import Client
from safetensors.torch import load_file

from conftest import tiny_model
from test_app_api import SOURCES, prune_args, serving
from wanda_gui.app.policy import app_files_dir
from wanda_gui.app.pool import ModelPool
from wanda_gui.app.workspace import Workspace, pruned_root
from wanda_gui.core import events as ev
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.errors import UserError
from wanda_gui.core.masks import Pattern


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-2 (its LM head tied to the embeddings) with tokenizer."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model("gpt2").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def pruned_folders() -> set[str]:
    return {p.name for p in pruned_root().iterdir()}


def greedy(model, tokenizer, text="The history of the United States", tokens=8) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    return model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)


def on_disk(model) -> bool:
    """Every decoder block's weights are absent (meta): the model holds only what lies outside them."""
    from wanda_gui.core.architecture import find_blocks

    return all(p.is_meta for p in find_blocks(model)[1].parameters())


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "gpt2_dir"])
def test_an_offloaded_session_matches_one_holding_the_model_whole(model_dir, request, text_file, tmp_path):
    folder = request.getfixturevalue(model_dir)
    whole, disk = Workspace(ModelPool()), Workspace(ModelPool())
    whole.load(str(folder), "cpu", None)
    disk.load(str(folder), "cpu", None, memory="offload")
    assert not whole.offloaded and disk.offloaded
    dense_lazy = disk.loaded.lazy
    config = PruneConfig(pattern=Pattern(2, 4))
    for ws in (whole, disk):
        assert isinstance(list(ws.prune(config, str(text_file), 4, 32, 0))[-1], ev.RunFinished)
    assert disk.maps.keys() == whole.maps.keys()

    # The pruned weights went to a private folder, outside the one the app serves files from, equal to the whole run's.
    written = load_file(disk.pruned_folder / "model.safetensors")
    expected = whole.pruned.state_dict()
    assert written and all(torch.equal(written[k], expected[k]) for k in written)
    assert disk.pruned_folder.parent == pruned_root() and app_files_dir() not in disk.pruned_folder.parents
    # Only what lies outside the blocks is held, once for the dense and the pruned model; the blocks stay on disk.
    dense, pruned = disk.dense_model, disk.pruned
    for name in ("transformer.wte.weight", "lm_head.weight") if model_dir == "gpt2_dir" else \
            ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        ptr = dense_lazy.model.get_parameter(name).data_ptr()
        assert dense.get_parameter(name).data_ptr() == ptr == pruned.get_parameter(name).data_ptr(), name
    for model in (dense, pruned, dense_lazy.model):
        assert on_disk(model)

    # Chat reads each block as generation reaches it, and answers as the whole models do.
    tokenizer = whole.loaded.tokenizer
    assert torch.equal(greedy(dense, tokenizer), greedy(whole.loaded.model, tokenizer))
    assert torch.equal(greedy(pruned, tokenizer), greedy(whole.pruned, tokenizer))
    ids = tokenizer("Four score and seven years ago", return_tensors="pt").input_ids
    assert torch.equal(pruned(ids).logits, whole.pruned(ids).logits)
    assert not torch.allclose(pruned(ids).logits, dense(ids).logits)  # it reads the pruned weights, not the dense
    assert on_disk(pruned) and on_disk(dense)  # each block released once generation passed it

    for name, ppl in disk.evaluate(4).items():  # block by block, from disk
        assert ppl.perplexity == pytest.approx(whole.evaluate(4)[name].perplexity, rel=1e-5), name

    out_disk, out_whole = tmp_path / "disk", tmp_path / "whole"
    disk.export(out_disk, False, "overwrite"), whole.export(out_whole, False, "overwrite")
    a, b = load_file(out_disk / "model.safetensors"), load_file(out_whole / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert disk.report()["offload"]["resident_bytes"] == dense_lazy.resident_bytes()

    folder_before = disk.pruned_folder
    disk.drop_pruned()
    assert not folder_before.exists() and disk.pruned is None


def test_a_stopped_offloaded_run_keeps_nothing_and_the_dense_model_still_answers(tiny_model_dir, text_file):
    ws = Workspace(ModelPool())
    ws.load(str(tiny_model_dir), "cpu", None, memory="offload")
    before, folders = greedy(ws.dense_model, ws.loaded.tokenizer), pruned_folders()
    for event in ws.prune(PruneConfig(), str(text_file), 4, 32, 0):
        if isinstance(event, ev.LinearPruned):
            ws.cancel.set()
    assert isinstance(event, ev.RunCancelled) and ws.pruned is None and ws.pruned_folder is None
    assert pruned_folders() == folders  # the half-written pruned weights are gone
    lazy = ws.loaded.lazy
    assert all(p.is_meta for block in lazy.blocks for p in block.parameters())  # the block it stopped in, released
    assert torch.equal(greedy(ws.dense_model, ws.loaded.tokenizer), before)
    ws.close()


def test_automatic_memory_offloads_what_does_not_fit_and_refuses_with_numbers(tiny_model_dir, text_file, monkeypatch):
    """The budget is the most the process may hold: what it holds besides the model counts (pinned here, so that the
    plan's arithmetic is checked to the byte)."""
    from wanda_gui.app import workspace
    from wanda_gui.core import runs

    process = 300 * 1024 ** 2  # the process as the plan sees it, the model's resident part included
    for module in (runs, workspace):
        monkeypatch.setattr(module, "resident_bytes", lambda: process)
    probe = Workspace(ModelPool())
    probe.load(str(tiny_model_dir), "cpu", None, memory="offload")
    lazy, info = probe.loaded.lazy, probe.loaded.info
    whole = process - lazy.resident_bytes() + info.memory_bytes + info.linear_parameters * 4
    by_block = process + lazy.block_bytes()
    assert by_block < whole

    ws = Workspace(ModelPool())
    ws.load(str(tiny_model_dir), "cpu", None, memory="auto", budget=str(whole + 1))
    assert not ws.offloaded
    ws.load(str(tiny_model_dir), "cpu", None, memory="auto", budget=str(whole - 1))
    assert ws.offloaded and ws.dense_model is not None
    with pytest.raises(UserError, match=r"Even block by block this run needs .*\(this process .* but the budget is"):
        ws.load(str(tiny_model_dir), "cpu", None, memory="auto", budget=str(by_block - 1))
    with pytest.raises(UserError, match="choose Memory 'On disk, block by block'"):
        ws.load(str(tiny_model_dir), "cpu", None, memory="memory", budget=str(whole - 1))
    with pytest.raises(UserError, match="memory size"):
        ws.load(str(tiny_model_dir), "cpu", None, memory="auto", budget="lots")

    # The budget bounds the runs too: what a run needs beyond the resident part, two blocks included.
    ws.load(str(tiny_model_dir), "cpu", None, memory="offload", budget=str(by_block + 10_000))
    with pytest.raises(UserError, match=r"a block .* is free on cpu"):
        list(ws.prune(PruneConfig(), str(text_file), 4, 32, 0))


def test_what_cannot_run_from_disk_is_refused_in_words(tiny_model_dir, text_file, tmp_path):
    ws = Workspace(ModelPool())
    ws.load(str(tiny_model_dir), "cpu", None, memory="offload")
    for config, words in ((PruneConfig(prune_head=True), "untick 'Also prune the LM head'"),
                          (PruneConfig(options=("owl",)), r"OWL .*\(without offload\)"),
                          (PruneConfig(options=("reconstruct",)), r"reconstruction .*\(without offload\)")):
        with pytest.raises(UserError, match=words):
            list(ws.prune(config, str(text_file), 4, 32, 0))
    from wanda_gui.core.sweep import RunSpec

    with pytest.raises(UserError, match="loaded block by block from disk"):
        list(ws.compare([RunSpec("wanda", Pattern.parse("unstructured"), 0.5)], str(text_file), 4, 32, 0, 2, tmp_path / "c"))
    assert ws.pruned is None and all(p.is_meta for b in ws.loaded.lazy.blocks for p in b.parameters())


def test_the_page_loads_block_by_block_and_says_so(tiny_model_dir, text_file):
    with serving() as demo:
        client = Client(demo.local_url, verbose=False)
        status = client.predict(SOURCES[1], str(tiny_model_dir), "", "", "", False, "cpu", "auto", "offload", "",
                                api_name="/load")[0]
        assert status.startswith("✓ Loaded") and "Kept on disk, read block by block" in status
        final = client.predict(*prune_args([text_file]), api_name="/prune")
        assert final[0].startswith("✓ Pruned") and "Both models stay on disk" in final[4]
        _, dense, pruned, *_ = client.predict("Hello there", [], [], 6, True, 0.7, 0.9, 0, api_name="/chat")
        assert dense[1]["content"] and pruned[1]["content"] and dense[1]["content"] != pruned[1]["content"]
        # Automatic on a model that fits holds it whole, and says nothing of disks.
        status = client.predict(SOURCES[1], str(tiny_model_dir), "", "", "", False, "cpu", "auto", api_name="/load")[0]
        assert status.startswith("✓ Loaded") and "disk" not in status and "Held whole in memory" in status
