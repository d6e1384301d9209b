"""What pruning buys: parameter counts exact, generation counting exactly the tokens asked for, export bytes equal to
the files, the CLI's --speed in the report and the model card, and the results page's panel."""

import json

import pytest
import torch
from conftest import tiny_model
from gradio_client import Client
from test_app_api import load_tiny, prune_args, url  # noqa: F401 (url: the app, a fixture)
from test_cli import run_cli
from torch import nn

from wanda_gui.app.pool import ModelPool
from wanda_gui.app.steps.results import bought_markdown
from wanda_gui.app.workspace import Workspace
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.errors import UserError
from wanda_gui.core.export import speed_note
from wanda_gui.core.speed import (count_parameters, export_bytes, fitting_prompt, measure_speed, measure_speeds,
                                  timed_generation)


def test_a_smaller_linear_changes_the_counts_by_exactly_its_weights():
    model = tiny_model("llama")
    before = count_parameters(model)
    mlp = model.model.layers[0].mlp
    removed = mlp.down_proj.weight.numel() - 96 * 64
    mlp.down_proj = nn.Linear(96, 64, bias=False)  # 32 of its 128 input channels gone
    after = count_parameters(model)
    for key in ("stored", "nonzero", "linear_stored", "linear_nonzero"):
        assert before[key] - after[key] == removed, key
    assert before["bytes"] - after["bytes"] == 4 * removed


def test_zeros_count_as_stored_not_as_nonzero_and_tied_weights_once():
    model = tiny_model("gpt2")  # tied embeddings and head, Conv1D linears
    counts = count_parameters(model)
    assert counts["stored"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert counts["linear_stored"] == sum(b.attn.c_attn.weight.numel() + b.attn.c_proj.weight.numel() +
                                          b.mlp.c_fc.weight.numel() + b.mlp.c_proj.weight.numel()
                                          for b in model.transformer.h)
    weight = model.transformer.h[1].mlp.c_fc.weight
    weight[:5] = 0  # Conv1D: (in, out), 5 input rows of 256 weights
    zeroed = count_parameters(model)
    assert zeroed["stored"] == counts["stored"] and zeroed["bytes"] == counts["bytes"]
    assert counts["nonzero"] - zeroed["nonzero"] == counts["linear_nonzero"] - zeroed["linear_nonzero"] == 5 * 256


def test_generation_makes_exactly_the_tokens_asked_for_even_when_the_model_would_stop():
    model = tiny_model("llama")
    eos = 7
    model.generation_config.eos_token_id = eos
    model.lm_head.register_forward_hook(lambda m, args, out: out.index_fill(-1, torch.tensor([eos]), 1e4))
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    stopped = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert stopped.shape[1] == ids.shape[1] + 1  # without min_new_tokens it ends at once
    prefill, decode = timed_generation(model, ids, 12, pad=0)  # raises unless exactly 12 came
    assert prefill > 0 and decode > 0
    speed = measure_speed(model, 512, "cpu", prompt_tokens=16, new_tokens=12, repeats=2)
    assert speed["new_tokens"] == 12 and speed["prompt_tokens"] == 16 and speed["repeats"] == 2
    assert speed["prefill_tokens_per_second"] == pytest.approx(16 / speed["prefill_seconds"])
    assert speed["generation_tokens_per_second"] == pytest.approx(11 / speed["generation_seconds"])


def test_models_are_measured_alike_and_in_turns():
    models = {"dense": tiny_model("qwen2"), "pruned": tiny_model("qwen2", seed=1)}
    calls = []
    for name, model in models.items():
        model.register_forward_pre_hook(lambda m, args, name=name: calls.append(name) if not calls or
                                        calls[-1] != name else None)
    done = []
    measured = measure_speeds(models, 512, "cpu", prompt_tokens=8, new_tokens=4, repeats=2,
                              progress=lambda i, total: done.append((i, total)))
    assert calls == ["dense", "pruned"] * 3  # a warm-up each, then two rounds in turn
    assert done[-1] == (6, 6)
    for speed in measured.values():
        assert speed["prefill_tokens_per_second"] > 0 and speed["generation_tokens_per_second"] > 0
        assert 0 <= speed["other_cpu_share"] <= 1


def test_the_speed_note_says_when_other_work_took_the_cpu():
    speed = {"prompt_tokens": 8, "new_tokens": 4, "repeats": 3, "device": "cpu", "in_turns": True,
             "other_cpu_share": 0.05}
    assert "Other work" not in speed_note({"dense": speed, "pruned": speed})
    busy = {**speed, "other_cpu_share": 0.6}
    assert "Other work took up to 60% of the CPU" in speed_note({"dense": speed, "pruned": busy})
    alone = {**busy, "in_turns": False}
    assert "one after the other" in speed_note({"dense": alone, "pruned": alone})
    gpu = {**busy, "device": "cuda:0"}
    assert "Other work" not in speed_note({"dense": gpu, "pruned": gpu})


def test_the_prompt_is_shortened_to_the_context_and_impossible_lengths_refused():
    model = tiny_model("llama")  # context 256
    assert fitting_prompt(model, 512, 128) == 128
    assert fitting_prompt(model, 64, 128) == 64
    with pytest.raises(UserError, match="context"):
        fitting_prompt(model, 512, 256)


def test_export_bytes_are_the_safetensors_files(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert files and export_bytes(tmp_path) == sum(f.stat().st_size for f in files)
    assert 0 < export_bytes(tmp_path) - count_parameters(model)["bytes"] < 64 * 1024  # the header alone


def test_cli_speed_measures_both_models_and_reports_what_was_bought(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "o"
    result = run_cli("prune", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4",
                     "--seqlen", "32", "--speed", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "generation tokens/s (batch 1, 128 new tokens)" in result.stdout and "zeros stored densely" in result.stdout
    report = json.loads((out / "pruning_report.json").read_text())
    for name in ("dense", "pruned"):
        speed = report["speed"][name]
        assert speed["new_tokens"] == 128 and speed["prompt_tokens"] == 128  # 256 tokens of context in all
        assert speed["prefill_tokens_per_second"] > 0 and speed["generation_tokens_per_second"] > 0
    dense, pruned = report["parameter_counts"]["dense"], report["parameter_counts"]["pruned"]
    assert pruned["stored"] == dense["stored"] and pruned["linear_nonzero"] == dense["linear_stored"] // 2
    assert dense["nonzero"] - pruned["nonzero"] == dense["linear_nonzero"] - pruned["linear_nonzero"]
    assert report["export_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert "What pruning bought" in (out / "README.md").read_text()


def test_cli_speed_is_refused_with_offload_before_loading(tmp_path, tiny_model_dir):
    result = run_cli("prune", "--model", str(tiny_model_dir), "--offload", "--speed", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "--speed" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_results_panel_counts_after_a_prune_and_measures_and_exports_on_request(url, tiny_model_dir, text_file,
                                                                                     tmp_path):
    client = Client(url, verbose=False)
    load_tiny(client, tiny_model_dir)
    results = client.predict(*prune_args([text_file]), api_name="/prune")[4]
    assert "What pruning bought" in results and "Measure speed" in results and "tokens/s" not in results
    assert "| parameters stored | 139,584 | 139,584 | 1.00x |" in results  # zeros stored densely: nothing removed
    assert "| decoder linears' weights non-zero | 73,728 | 36,864 | 0.50x |" in results
    assert "do not shrink the files" in results

    job = client.submit(api_name="/measure_speed")
    statuses = [update[0] for update in job]
    status, results, *_ = job.result()
    assert any("generation 8/8" in s for s in statuses), statuses  # (a warm-up + 3 runs) x 2 models
    assert status.startswith("✓") and "generation tokens/s (batch 1, 128 new tokens)" in results
    assert "prefill tokens/s (128-token prompt)" in results and "taking turns" in results

    message, _, results = client.predict(str(tmp_path / "out"), False, api_name="/export")
    size = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert message.startswith("✓") and f"({size:,} bytes)" in results and "tokens/s" in results
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert set(report["speed"]) == {"dense", "pruned"} and report["export_bytes"] == size
    assert report["parameter_counts"]["pruned"]["linear_nonzero"] == 36_864


def test_a_session_kept_on_disk_says_why_it_counts_and_measures_nothing(tiny_model_dir, text_file):
    ws = Workspace(ModelPool())
    ws.load(str(tiny_model_dir), "cpu", None, memory="offload")
    list(ws.prune(PruneConfig(), str(text_file), 4, 32, 0))
    assert ws.counts is None and "read block by block from disk" in bought_markdown(ws)
    with pytest.raises(UserError, match="it would time the disk"):
        ws.measure_speed()
    assert ws.speed == {}
