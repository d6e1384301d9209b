"""Export: reloadable with plain transformers, identical weights, report and card, atomic, never over the source."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from wanda_gui.core.engine import PruneConfig, prune, run_to_end
from wanda_gui.core.errors import UserError
from wanda_gui.core.export import REPORT_NAME, export_model, make_report
from wanda_gui.core.models import load_model

CALIB = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def pruned(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    summary = run_to_end(prune(loaded.model, PruneConfig(sparsity=0.5), CALIB))
    report = make_report(loaded.info, summary, {"source": "test", "nsamples": 4, "seqlen": 32, "seed": 0}, {"load": 0.1})
    return loaded, report


def test_export_round_trips_with_plain_transformers(tmp_path, pruned):
    loaded, report = pruned
    out = export_model(loaded.model, loaded.tokenizer, tmp_path / "out", report, source=loaded.path)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    original = loaded.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert (reloaded.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(out.glob("*.safetensors")) and (out / "tokenizer.json").exists()


def test_report_and_card_say_what_was_done(tmp_path, pruned):
    loaded, report = pruned
    out = export_model(loaded.model, loaded.tokenizer, tmp_path / "out", report)
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["method"] == "wanda" and saved["pattern"] == "unstructured"
    assert saved["achieved_sparsity"] == pytest.approx(0.5)
    assert len(saved["layers"]) == 14 and all(layer["sparsity"] == pytest.approx(0.5) for layer in saved["layers"])
    assert saved["calibration"]["nsamples"] == 4 and set(saved["versions"]) >= {"torch", "transformers", "wanda_gui"}
    card = (out / "README.md").read_text()
    assert "do **not** shrink the files" in card and "50.00%" in card


def test_non_empty_target_is_refused_unless_overwrite(tmp_path, pruned):
    loaded, report = pruned
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        export_model(loaded.model, loaded.tokenizer, target, report)
    assert (target / "keep.txt").read_text() == "precious"
    export_model(loaded.model, loaded.tokenizer, target, report, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / REPORT_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old folder left behind


def test_source_folder_is_never_overwritten(pruned):
    loaded, report = pruned
    before = {p.name: p.stat().st_mtime_ns for p in loaded.path.iterdir()}
    with pytest.raises(UserError, match="source model"):
        export_model(loaded.model, loaded.tokenizer, loaded.path, report, overwrite=True, source=loaded.path)
    assert {p.name: p.stat().st_mtime_ns for p in loaded.path.iterdir()} == before


def test_failed_export_leaves_no_partial_folder(tmp_path, pruned, monkeypatch):
    loaded, report = pruned

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", broken_save)
    with pytest.raises(UserError, match="No space left.*Nothing was left half-written"):
        export_model(loaded.model, loaded.tokenizer, tmp_path / "out", report)
    assert list(tmp_path.iterdir()) == []
