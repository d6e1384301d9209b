"""Export: reloadable with plain transformers, identical weights, report and card, atomic, never over the source."""

import json
import os
import re
import shutil
import stat

import pytest
import torch
import transformers as tf
from conftest import SMALL
from transformers import AutoModelForCausalLM

from wanda_gui.core import atomic
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.errors import UserError
from wanda_gui.core.export import REPORT_NAME, check_target, export_model, make_report
from wanda_gui.core.models import load_model
from wanda_gui.core.runs import drain

CALIB = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def pruned(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    summary = drain(prune(loaded.model, PruneConfig(sparsity=0.5), CALIB))
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


def tree(folder):
    """Every path under folder with its mode and content: what must be left exactly as it was."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_of_unrelated_files_is_never_replaced(tmp_path, pruned, overwrite):
    loaded, report = pruned
    target = tmp_path / "out"
    (target / "photos").mkdir(parents=True)
    (target / "nested" / "deeper").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    (target / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    (target / "nested" / "deeper" / "file.md").write_text("# mine")
    (target / ".hidden").write_text("secret")
    target.chmod(0o750)
    before = tree(target)
    with pytest.raises(UserError, match="is not empty and is not a previous export.*nothing here was touched"):
        export_model(loaded.model, loaded.tokenizer, target, report, overwrite=overwrite,
                     overwrite_control="the 'Replace a previous export' box")
    assert tree(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_previous_export_is_replaced_only_when_asked(tmp_path, pruned):
    loaded, report = pruned
    target = tmp_path / "out"
    export_model(loaded.model, loaded.tokenizer, target, {**report, "method": "first"})
    saved = json.loads((target / REPORT_NAME).read_text())
    assert saved["exported_by"] == "wanda_gui" and "README.md" in saved["exported_files"]
    with pytest.raises(UserError, match="holds a previous export; tick the 'Replace a previous export' box to replace it"):
        export_model(loaded.model, loaded.tokenizer, target, report, overwrite_control="the 'Replace a previous export' box")
    assert json.loads((target / REPORT_NAME).read_text())["method"] == "first"
    export_model(loaded.model, loaded.tokenizer, target, report, overwrite=True)
    assert json.loads((target / REPORT_NAME).read_text())["method"] == "wanda"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary, old or lock file left behind


def test_previous_export_with_a_file_added_is_not_replaced(tmp_path, pruned):
    loaded, report = pruned
    target = export_model(loaded.model, loaded.tokenizer, tmp_path / "out", report)
    (target / "my-notes.txt").write_text("added by hand")
    before = tree(target)
    with pytest.raises(UserError, match="not a previous export of wanda_gui \\(it holds my-notes.txt\\)"):
        export_model(loaded.model, loaded.tokenizer, target, report, overwrite=True)
    assert tree(target) == before


def test_empty_folder_is_used_without_overwrite(tmp_path, pruned):
    loaded, report = pruned
    (tmp_path / "out").mkdir()
    out = export_model(loaded.model, loaded.tokenizer, tmp_path / "out", report)
    assert (out / REPORT_NAME).exists() and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_exported_modes_follow_the_umask(tmp_path, pruned, mask):
    loaded, report = pruned
    old = os.umask(mask)
    try:
        out = export_model(loaded.model, loaded.tokenizer, tmp_path / "new" / "out", report)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    files = list(out.iterdir())
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~mask for p in files}


@pytest.mark.parametrize("make,where,message", [
    (lambda t: (t / "f").write_text("x"), lambda t: t / "f" / "out", "is a file, so .* cannot be created inside it"),
    (lambda t: (t / "f").write_text("x"), lambda t: t / "f" / "a" / "b", "is a file, so .* cannot be created inside it"),
    (lambda t: (t / "f").write_text("x"), lambda t: t / "f", "exists and is a file"),
    (lambda t: (t / "real").mkdir(), lambda t: (t / "link").symlink_to(t / "real") or t / "link", "symbolic link"),
])
def test_impossible_targets_are_refused_before_any_model(tmp_path, make, where, message):
    make(tmp_path)
    target = where(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(UserError, match=message):
        check_target(target, True, None)
    assert tree(tmp_path) == before


def test_target_and_source_must_not_overlap(tmp_path, tiny_model_dir):
    source = tmp_path / "model"
    shutil.copytree(tiny_model_dir, source)
    with pytest.raises(UserError, match="is the source model's folder"):
        check_target(source, True, source)
    with pytest.raises(UserError, match="is inside the source model's folder"):
        check_target(source / "pruned", False, source)
    with pytest.raises(UserError, match="contains the source model's folder"):
        check_target(tmp_path, True, source)
    (tmp_path / "link").symlink_to(source)
    with pytest.raises(UserError, match="is inside the source model's folder"):
        check_target(tmp_path / "link" / "pruned", False, source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "model"]


def test_leftovers_of_dead_exports_in_the_parent_are_removed(tmp_path, pruned):
    loaded, report = pruned
    for name in (".out.partial-abcd1234", ".other.partial-x_y12345", ".other.old-0123abcd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("half")
    (tmp_path / ".other.export-lock").write_text("")  # its writer was killed: nobody holds it
    (tmp_path / ".mine.partial-notours").mkdir()  # not a name we write: kept
    (tmp_path / ".keep.old-abcd1234").write_text("a file, not a folder we write: kept")
    export_model(loaded.model, loaded.tokenizer, tmp_path / "out", report)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.old-abcd1234", ".mine.partial-notours", "out"]


def test_export_killed_between_its_renames_gets_the_previous_export_back(tmp_path, pruned):
    loaded, report = pruned
    previous = export_model(loaded.model, loaded.tokenizer, tmp_path / "out", {**report, "method": "first"})
    previous.rename(tmp_path / ".out.old-deadbeef")
    (tmp_path / ".out.partial-deadbeef").mkdir()
    export_model(loaded.model, loaded.tokenizer, tmp_path / "other", report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["method"] == "first"


def test_leftovers_of_a_running_export_are_kept(tmp_path, pruned):
    loaded, report = pruned
    (tmp_path / ".busy.partial-abcd1234").mkdir()
    fd = atomic.try_lock(tmp_path / ".busy.export-lock")
    try:
        export_model(loaded.model, loaded.tokenizer, tmp_path / "out", report)
        with pytest.raises(UserError, match=f"Another export to {re.escape(str(tmp_path / 'busy'))} is running"):
            export_model(loaded.model, loaded.tokenizer, tmp_path / "busy", report)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".busy.export-lock", ".busy.partial-abcd1234", "out"]
    finally:
        atomic.release(tmp_path / ".busy.export-lock", fd)


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


# (4) the exported config carries no quantization_config, even when the loaded model's had one
def test_export_drops_a_quantization_config(tmp_path, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    loaded.model.config.quantization_config = {"quant_method": "gguf", "bits": 4}  # as a GGUF-loaded model has
    summary = drain(prune(loaded.model, PruneConfig(method="magnitude", sparsity=0.5)))
    report = make_report(loaded.info, summary, None, {"load": 0.0})
    out = export_model(loaded.model, loaded.tokenizer, tmp_path / "out", report, source=loaded.path)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["hidden_size"] == SMALL["hidden_size"]
    tf.AutoModelForCausalLM.from_pretrained(out)  # and it loads as a plain model


def test_a_lock_file_replaced_while_waiting_is_locked_where_it_now_is(tmp_path, monkeypatch):
    """A holder that finishes unlinks its lock file; a waiter that opened the old file before that must not take
    the lock on it (it guards nothing) but on the file now at the path, which a third writer may have made."""
    path = tmp_path / ".out.export-lock"
    real_open, raced = os.open, []

    def open_then_race(name, flags, mode=0o777):
        fd = real_open(name, flags, mode)
        if not raced:  # between our open and our flock: the old holder unlinks its file, another writer makes one
            raced.append(os.fstat(fd).st_ino)
            os.unlink(name)
            os.close(real_open(name, os.O_CREAT | os.O_RDWR, 0o666))
        return fd

    monkeypatch.setattr(atomic.os, "open", open_then_race)
    fd = atomic.try_lock(path)
    monkeypatch.undo()
    try:
        assert raced and os.fstat(fd).st_ino == os.stat(path).st_ino != raced[0]
    finally:
        atomic.release(path, fd)
