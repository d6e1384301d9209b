"""The app through its API (gradio_client): the whole flow on a tiny model, bad input answered in words."""

import contextlib
import json
import socket
import time

import pytest
import torch
from gradio_client import Client, handle_file
from transformers import AutoModelForCausalLM

from wanda_gui.app.steps.chat import text_of
from wanda_gui.app.steps.method import CALIBRATION
from wanda_gui.app.steps.model import SOURCES
from wanda_gui.core.methods import get_method


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(**options):
    """The app on a free loopback port for the length of a with-block; yields the running demo."""
    from wanda_gui.app.main import launch

    demo = launch(port=free_port(), prevent_thread_lock=True, quiet=True, **options)
    try:
        yield demo
    finally:
        demo.close()


@pytest.fixture(scope="module")
def url():
    with serving() as demo:
        yield demo.local_url


def load_tiny(client, folder):
    return client.predict(SOURCES[1], str(folder), "", "", "", False, "cpu", "auto", api_name="/load")


def prune_args(files, **overrides):
    args = dict(method="Wanda", sparsity=0.5, pattern="unstructured", custom_nm="1:4", calib_kind=CALIBRATION[1],
                files=[handle_file(str(f)) for f in files], dataset="", nsamples=4, seqlen=32, seed=0, include="",
                exclude="", prune_head=False, batch_size=0, wanda_variant=False, options=[], widths="uniform",
                reconstruct_effort="fast")
    args.update(overrides)
    return list(args.values())


def test_whole_flow_load_prune_results_chat_export_reload(url, tiny_model_dir, text_file, tmp_path):
    client = Client(url, verbose=False)
    status, card, *_ = load_tiny(client, tiny_model_dir)
    assert status.startswith("✓ Loaded") and "LlamaForCausalLM" in card and "| Decoder blocks | 2 |" in card

    job = client.submit(*prune_args([text_file]), api_name="/prune")
    updates = list(job)
    final = job.result()
    statuses = [u[0] for u in updates if isinstance(u[0], str)]
    assert any("linear 1/14" in s for s in statuses), statuses  # live per-linear progress
    # The ETA counts blocks (they cost alike), never single linears: none before the first block is done.
    assert all("ETA after the first block" in s for s in statuses if "block 1/2" in s and "linear" in s)
    assert final[0].startswith("✓ Pruned") and "50.00%" in final[0]
    heatmap = json.loads(final[2]["plot"])
    assert heatmap["data"][0]["type"] == "heatmap" and "model.layers.1" in heatmap["layout"]["title"]["text"]
    bars = json.loads(final[1]["plot"])
    assert bars["data"][0]["type"] == "bar" and len(bars["data"][0]["x"]["bdata"] if isinstance(bars["data"][0]["x"], dict) else bars["data"][0]["x"]) > 0
    assert "| layer type | down_proj | gate_proj | k_proj | o_proj | q_proj | up_proj | v_proj |" in final[4]
    assert "| sparsity | " + " | ".join(["50.00%"] * 7) + " |" in final[4] and "do not shrink the files" in final[4]

    layer, why = client.predict("model.layers.0.self_attn.q_proj", api_name="/show_layer")
    assert "model.layers.0.self_attn.q_proj" in json.loads(layer["plot"])["layout"]["title"]["text"]
    assert "Why it works: model.layers.0.self_attn.q_proj" in json.loads(why["plot"])["layout"]["title"]["text"]

    ppl = client.predict(2, api_name="/evaluate")
    assert "| dense |" in ppl and "| pruned |" in ppl and "2 x 256 tokens" in ppl  # the tiny model's context

    prompt, dense, pruned, dense_stats, pruned_stats, chat_status = client.predict(
        "Hello there", [], [], 8, True, 0.7, 0.9, 0, api_name="/chat")
    assert chat_status == ""  # finished, not stopped
    for history, stats in ((dense, dense_stats), (pruned, pruned_stats)):
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert "8 tokens" in stats and "tok/s" in stats
    assert dense[1]["content"] != pruned[1]["content"]  # pruning changed the (random) model's answer

    out = tmp_path / "export"
    message, report, _ = client.predict(str(out), False, api_name="/export")
    assert report["visible"] and message.startswith("✓ Exported")
    assert json.loads(open(report["value"]).read())["achieved_sparsity"] == 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (reloaded.model.layers[1].mlp.down_proj.weight == 0).float().mean() == 0.5
    dense_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, dense_model.model.layers[0].self_attn.q_proj.weight)


def error_of(call):
    with pytest.raises(Exception) as info:
        call()
    return str(info.value)


def test_bad_input_is_answered_in_words(url, tiny_model_dir, text_file, tmp_path):
    client = Client(url, verbose=False)
    assert "Load a model first" in error_of(lambda: client.predict(*prune_args([text_file]), api_name="/prune"))
    assert "no config.json" in error_of(lambda: client.predict(SOURCES[1], str(tmp_path), "", "", "", False, "cpu",
                                                               "auto", api_name="/load"))
    assert "not in the local hub cache" in error_of(lambda: client.predict(SOURCES[2], "", "nobody/nothing", "", "",
                                                                           False, "cpu", "auto", api_name="/load"))
    load_tiny(client, tiny_model_dir)
    _, dense, pruned, *_ = client.predict("hi", [], [], 8, True, 0.7, 0.9, 0, api_name="/chat")  # before any run:
    assert text_of(dense[1]["content"]) and "No pruned model yet: start pruning" in text_of(pruned[1]["content"])
    assert "multiple of 3" in error_of(lambda: client.predict(*prune_args([text_file], pattern="custom N:M",
                                                                         custom_nm="2:3"), api_name="/prune"))
    assert "0 < N < M" in error_of(lambda: client.predict(*prune_args([text_file], pattern="custom N:M",
                                                                     custom_nm="4:2"), api_name="/prune"))
    # The slider itself refuses values outside its range, in words.
    assert "greater than maximum value 0.95" in error_of(lambda: client.predict(*prune_args([text_file], sparsity=1.0),
                                                                                api_name="/prune"))
    assert "longer than the model's context" in error_of(lambda: client.predict(*prune_args([text_file], seqlen=4096),
                                                                                api_name="/prune"))
    too_big = error_of(lambda: client.predict(*prune_args([text_file], nsamples=10**6, seqlen=256), api_name="/prune"))
    assert "needs about" in too_big and "is free on cpu" in too_big and "lower the samples" in too_big
    client.predict(*prune_args([text_file]), api_name="/prune")
    assert "Type a prompt first" in client.predict("  ", [], [], 8, True, 0.7, 0.9, 0, api_name="/chat")[5]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    for overwrite in (False, True):  # a folder this app did not write is never replaced
        assert "not a previous export" in error_of(lambda: client.predict(str(full), overwrite, api_name="/export"))
    assert (full / "keep.txt").read_text() == "x" and sorted(p.name for p in full.iterdir()) == ["keep.txt"]


@pytest.mark.builtin
def test_builtin_model_flow_with_small_calibration(url, builtin_dir):
    client = Client(url, verbose=False)
    status, card, *_ = client.predict(SOURCES[0], "", "", "", "", False, "cpu", "auto", api_name="/load")
    assert "SmolLM2-135M-Instruct" in status and "| Linears to prune | 210" in card
    final = client.predict("Wanda", 0.5, "2:4", "1:4", CALIBRATION[0], [], "", 8, 128, 0, "", "", False, 0, False,
                           api_name="/prune")
    assert final[0].startswith("✓ Pruned") and "achieved sparsity 50.00%" in final[0]
    _, dense, pruned, *_ = client.predict("What is the capital of France?", [], [], 24, True, 0.7, 0.9, 0,
                                          api_name="/chat")
    dense_answer, pruned_answer = text_of(dense[1]["content"]), text_of(pruned[1]["content"])
    assert "Paris" in dense_answer  # the real model answers; pruning 2:4 changes what it says
    assert pruned_answer and pruned_answer != dense_answer

    # A real Stop ends both streaming replies; the app answers the next prompt normally.
    job = client.submit("Write a long story about a dragon and a knight.", [], [], 400, True, 0.7, 0.9, 0,
                        api_name="/chat")
    for update in job:
        if update[1] and text_of(update[1][-1]["content"]):
            client.predict(api_name="/stop_chat")
            break
    while not job.done():
        time.sleep(0.1)
    last = job.outputs()[-1]
    tokens = [int(stats.split(" tokens")[0]) for stats in last[3:5] if stats]
    assert tokens and max(tokens) < 400
    _, dense, *_ = client.predict("What is the capital of France?", [], [], 24, True, 0.7, 0.9, 0, api_name="/chat")
    assert "Paris" in text_of(dense[1]["content"])

    # Stop during a real run: the pruned copy is discarded, the dense model answers as before.
    job = client.submit("Wanda", 0.5, "unstructured", "1:4", CALIBRATION[0], [], "", 64, 512, 0, "", "", False, 0, False,
                        api_name="/prune")
    for update in job:
        if isinstance(update[0], str) and "/210 (" in update[0]:
            client.predict(api_name="/stop")
            break
    final = job.result()
    assert final[0].startswith("■ Stopped") and "never touched" in final[0]
    _, dense, pruned, *_ = client.predict("What is the capital of France?", [], [], 24, True, 0.7, 0.9, 0,
                                          api_name="/chat")  # after a Stop: the dense model alone, as before
    assert "Paris" in text_of(dense[1]["content"]) and "No pruned model yet" in text_of(pruned[1]["content"])


def test_auth_protects_the_app():
    with serving(auth="alice:secret") as demo:
        with pytest.raises(Exception):
            Client(demo.local_url, verbose=False).predict(api_name="/clear")
        client = Client(demo.local_url, auth=("alice", "secret"), verbose=False)
        assert client.predict(api_name="/clear") == ([], [], "", "", "")


def test_every_method_and_the_wanda_variant_run_from_the_page(url, tiny_model_dir, text_file):
    from wanda_gui.app.steps.method import METHOD_NAMES

    client = Client(url, verbose=False)
    load_tiny(client, tiny_model_dir)
    for label, name in METHOD_NAMES.items():
        pattern = "structured" if get_method(name).structured_only else "unstructured"
        final = client.predict(*prune_args([text_file], method=label, sparsity=0.6, pattern=pattern), api_name="/prune")
        assert final[0].startswith("✓ Pruned") and f"**{name} · {pattern}" in final[4], (label, final[0])
    final = client.predict(*prune_args([text_file], wanda_variant=True), api_name="/prune")
    assert final[0].startswith("✓ Pruned") and "**wanda (α-variant) · unstructured**" in final[4]
    assert "α-variant is a Wanda option" in error_of(lambda: client.predict(
        *prune_args([text_file], method="SparseGPT", wanda_variant=True), api_name="/prune"))
    final = client.predict(*prune_args([text_file], method="SparseGPT", options=["OWL", "DSnoT", "Block reconstruction"]),
                           api_name="/prune")
    assert final[0].startswith("✓ Pruned") and "**sparsegpt + OWL + DSnoT + Block reconstruction · unstructured**" in final[4]
    owl = [t for t in json.loads(final[1]["plot"])["data"] if t.get("name") == "OWL target"]
    assert len(owl) == 1  # the per-block targets OWL chose, on the block chart
    chart = final[6]  # and OWL's own chart: the sparsity chosen per block from its outlier ratio
    assert chart["visible"] and [t["name"] for t in json.loads(chart["value"]["plot"])["data"]] == [
        "chosen sparsity", "outlier ratio (%)", "run target 50%"]
    assert "unstructured pattern with OWL" in error_of(lambda: client.predict(
        *prune_args([text_file], pattern="2:4", options=["OWL"]), api_name="/prune"))
    client.close()


def test_a_structured_run_shrinks_the_model_and_shows_each_blocks_widths(url, tiny_model_dir, text_file, tmp_path):
    client = Client(url, verbose=False)
    load_tiny(client, tiny_model_dir)
    job = client.submit(*prune_args([text_file], method="FLAP", pattern="structured", sparsity=0.5, widths="adaptive"),
                        api_name="/prune")
    updates = list(job)
    final = job.result()
    assert any("block 1/2: kept" in u[0] and "MLP channels" in u[0] for u in updates if isinstance(u[0], str))
    assert final[0].startswith("✓ Pruned") and "parameters" in final[0]
    widths = json.loads(final[2]["plot"])  # the live view's map: kept channels and heads per block
    assert [t["name"] for t in widths["data"]] == ["MLP channels kept", "attention heads kept"]
    assert "**flap · structured (adaptive widths)**" in final[4] and "→" in final[4]
    assert "FLAP scores" not in final[4] and "single weights" in error_of(lambda: client.predict(
        *prune_args([text_file], method="SparseGPT", pattern="structured"), api_name="/prune"))
    assert "What pruning bought" in final[4] and "fewer parameters" in final[4]
    message, _, results = client.predict(str(tmp_path / "export"), False, api_name="/export")
    size = sum(f.stat().st_size for f in (tmp_path / "export").glob("*.safetensors"))
    assert message.startswith("✓ Exported") and f"({size:,} bytes)" in results
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")  # padded to the widest block
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in dense.parameters())
    assert len(reloaded.config.structured_widths["intermediate_size"]) == 2
    client.close()


def test_the_why_view_marks_the_planted_outlier_of_the_layer_being_pruned(url, tmp_path, tiny_tokenizer, text_file):
    """A tiny model whose block-1 attention inputs have one huge feature: the live view marks exactly it."""
    import torch

    from tests.conftest import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[7] = 300.0
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    client = Client(url, verbose=False)
    load_tiny(client, tmp_path / "m")
    job = client.submit(*prune_args([text_file]), api_name="/prune")
    live = [json.loads(u[5]["plot"]) for u in job if isinstance(u[5], dict) and u[5].get("plot")]
    assert live, "the why view updates while the run goes"
    picked, why = client.predict("model.layers.1.self_attn.q_proj", api_name="/show_layer")
    figure = json.loads(why["plot"])
    outliers = next(t for t in figure["data"] if t.get("name", "").startswith("outliers"))
    xs = outliers["x"]["bdata"] if isinstance(outliers["x"], dict) else outliers["x"]
    if isinstance(xs, str):
        import base64

        import numpy as np

        xs = np.frombuffer(base64.b64decode(xs), dtype=outliers["x"]["dtype"]).tolist()
    assert list(xs) == [7] and figure["layout"]["yaxis"]["type"] == "log"
    assert "of positions differ" in json.dumps(figure["layout"]["annotations"])
    client.close()


def test_a_value_the_page_would_never_send_is_refused_and_logged_in_one_line(url, text_file, capfd, caplog):
    """An API caller's out-of-range slider or unknown choice: refused in words, and the server's log says so in one
    line, not with Gradio's traceback."""
    client = Client(url, verbose=False)
    capfd.readouterr()
    assert "greater than maximum value 0.95" in error_of(lambda: client.predict(*prune_args([text_file], sparsity=1.0),
                                                                                api_name="/prune"))
    assert "not in the list of choices" in error_of(lambda: client.predict(*prune_args([text_file], method="Nope"),
                                                                           api_name="/prune"))
    stderr = capfd.readouterr().err
    assert "Traceback" not in stderr, stderr
    lines = [r.getMessage() for r in caplog.records if r.name == "wanda_gui"]
    assert [line.split(":")[0] for line in lines] == ["rejected a value for 'Sparsity (unstructured)'",
                                                      "rejected a value for 'Method'"], lines
