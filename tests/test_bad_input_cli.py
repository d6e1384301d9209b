"""Bad input to the CLI: one `error:` line, exit code 2, nothing written, the source model untouched; whatever
needs no model is refused before a model is loaded."""

from __future__ import annotations

import pytest

import wanda_gui.core.models as models
from wanda_gui.cli import main


def snapshot(folder):
    """Every file under the folder with its size and modification time."""
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def files(tmp_path):
    """Text files and folders that bad arguments point at."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    (tmp_path / "short.txt").write_text("just a few words")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    return tmp_path


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI loads a model: these inputs must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(models, "load_model", refuse)


def run(capsys, args):
    """Exit code and stderr of one in-process CLI call."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err


def prune_args(model, out, *extra, calib=None):
    return ["prune", "--model", str(model), "--calib", str(calib) if calib else "builtin", "--nsamples", "2",
            "--seqlen", "16", "--out", str(out), *extra]


# (extra prune arguments, words of the message); each is refused before any model is loaded
BEFORE_LOAD = [
    (["--nsamples", "0"], "--nsamples must be at least 1"),
    (["--nsamples", "-1", "--method", "magnitude"], "--nsamples must be at least 1"),
    (["--seed", "-3"], "--seed must be at least 0"),
    (["--seqlen", "1"], "--seqlen must be at least 2"),
    (["--eval", "--eval-nwindows", "0"], "--eval-nwindows must be at least 1"),
    (["--batch-size", "0"], "Batch size must be at least 1"),
    (["--sparsity", "1.0"], "Sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "Sparsity must be in [0, 1)"),
    (["--sparsity", "nan"], "Sparsity must be in [0, 1)"),
    (["--pattern", "3:2"], "0 < N < M"),
    (["--pattern", "0:4"], "0 < N < M"),
    (["--pattern", "a:b"], "Unknown pattern 'a:b'"),
    (["--layerwise"], "Layer-wide comparison"),
    (["--method", "magnitude", "--layerwise", "--pattern", "2:4"], "does not apply to N:M"),
    (["--device", "mps"], "Unsupported device 'mps'"),
    (["--device", "tpu"], "Unknown device 'tpu'"),
    (["--device", "cuda:7"], "cuda:7"),
]


@pytest.mark.parametrize("extra,message", BEFORE_LOAD, ids=[" ".join(e) for e, _ in BEFORE_LOAD])
def test_prune_settings_are_checked_before_loading(capsys, tmp_path, tiny_model_dir, no_load, extra, message):
    before = snapshot(tiny_model_dir)
    code, err = run(capsys, prune_args(tiny_model_dir, tmp_path / "o", *extra))
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists() and snapshot(tiny_model_dir) == before


CALIBRATION_FILES = [
    ("missing.txt", "Calibration file", "does not exist"),
    ("folder", "is a folder, not a text file", "calibration"),
    ("empty.txt", "Calibration file", "is empty"),
    ("blank.txt", "calibration file(s) hold only blank text", ""),
    ("latin1.txt", "Calibration file", "is not UTF-8"),
]


@pytest.mark.parametrize("name,words,more", CALIBRATION_FILES, ids=[c[0] for c in CALIBRATION_FILES])
def test_calibration_files_are_checked_before_loading(capsys, files, tiny_model_dir, no_load, name, words, more):
    code, err = run(capsys, prune_args(tiny_model_dir, files / "o", calib=files / name))
    assert code == 2 and words in err and more in err, err
    assert not (files / "o").exists()


def test_calibration_file_among_several_is_checked(capsys, files, text_file, tiny_model_dir, no_load):
    code, err = run(capsys, ["prune", "--model", str(tiny_model_dir), "--calib", str(text_file), str(files / "folder"),
                             "--out", str(files / "o")])
    assert code == 2 and "folder, not a text file" in err and not (files / "o").exists()


OUT_TARGETS = [
    (lambda f, m: m, "source model's folder"),
    (lambda f, m: m / "pruned", "source"),
    (lambda f, m: f / "a-file" / "pruned", "a-file"),
    (lambda f, m: f / "a-file", "is a file"),
    (lambda f, m: f / "busy", "not empty"),
]


@pytest.mark.parametrize("target,message", OUT_TARGETS, ids=["source", "inside-source", "under-a-file", "a-file", "busy"])
def test_out_is_checked_before_loading(capsys, files, tiny_model_dir, no_load, target, message):
    out = target(files, tiny_model_dir)
    before_model, before_files = snapshot(tiny_model_dir), snapshot(files)
    code, err = run(capsys, prune_args(tiny_model_dir, out, "--overwrite"))
    assert code == 2 and message in err, err
    assert snapshot(tiny_model_dir) == before_model and snapshot(files) == before_files


def test_unknown_method_and_dtype_are_argparse_errors(capsys, tmp_path, tiny_model_dir, no_load):
    code, err = run(capsys, prune_args(tiny_model_dir, tmp_path / "o", "--method", "random"))
    assert code == 2 and "invalid choice: 'random'" in err and "wanda" in err
    code, err = run(capsys, prune_args(tiny_model_dir, tmp_path / "o", "--dtype", "int8"))
    assert code == 2 and "invalid choice: 'int8'" in err
    assert not (tmp_path / "o").exists()


MODELS = [
    (lambda f, m: f / "no-such-model", "does not exist"),
    (lambda f, m: f / "a-file", "is a file"),
    (lambda f, m: f / "folder", "no config.json"),
]


@pytest.mark.parametrize("model,message", MODELS, ids=["missing", "file", "not-a-model"])
def test_bad_model_sources(capsys, files, model, message):
    before = snapshot(files)
    code, err = run(capsys, prune_args(model(files, None), files / "o"))
    assert code == 2 and message in err, err
    assert snapshot(files) == before


# refused once the model is known: still one line, nothing pruned or written
AFTER_LOAD = [
    (["--include", "*.nothing"], "select no linear layer"),
    (["--pattern", "2:3"], "multiple of 3"),
    (["--seqlen", "4096"], "longer than the model's context (256 tokens)"),
    (["--nsamples", "50000000"], "needs about"),
]


@pytest.mark.parametrize("extra,message", AFTER_LOAD, ids=[" ".join(e) for e, _ in AFTER_LOAD])
def test_prune_settings_checked_against_the_model(capsys, files, tiny_model_dir, extra, message):
    before = snapshot(tiny_model_dir)
    code, err = run(capsys, prune_args(tiny_model_dir, files / "o", *extra, calib=files / "busy" / "notes.txt"))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (files / "o").exists() and snapshot(tiny_model_dir) == before


def test_a_run_that_cannot_fit_is_refused_with_its_numbers(capsys, files, tiny_model_dir):
    code, err = run(capsys, prune_args(tiny_model_dir, files / "o", "--nsamples", "50000000", "--seqlen", "256"))
    assert code == 2 and "calibration activations" in err and "is free on cpu" in err
    assert "lower --nsamples or --seqlen" in err and not (files / "o").exists()


def test_calibration_text_too_short_for_the_windows(capsys, files, tiny_model_dir):
    code, err = run(capsys, prune_args(tiny_model_dir, files / "o", calib=files / "short.txt"))
    assert code == 2 and "too short for windows of 16 tokens" in err and not (files / "o").exists()


EVAL = [
    (["--text", "{f}/missing.txt"], "Evaluation file"),
    (["--text", "{f}/folder"], "is a folder, not a text file; give the evaluation text"),
    (["--text", "{f}/empty.txt"], "Evaluation file"),
    (["--nwindows", "0"], "--nwindows must be at least 1"),
    (["--seqlen", "0"], "--seqlen must be at least 2"),
    (["--device", "gpu"], "Unknown device 'gpu'"),
]


@pytest.mark.parametrize("extra,message", EVAL, ids=[" ".join(e) for e, _ in EVAL])
def test_eval_input_is_checked_before_loading(capsys, files, tiny_model_dir, no_load, extra, message):
    args = ["eval", "--model", str(tiny_model_dir), *[a.format(f=files) for a in extra]]
    code, err = run(capsys, args)
    assert code == 2 and message in err and "alibration" not in err, err


def test_eval_seqlen_longer_than_the_context(capsys, tiny_model_dir):
    code, err = run(capsys, ["eval", "--model", str(tiny_model_dir), "--seqlen", "1024"])
    assert code == 2 and "longer than the model's context" in err


def test_a_run_that_fails_midway_exports_nothing_and_claims_no_restore(capsys, monkeypatch, files, text_file,
                                                                       tiny_model_dir):
    import wanda_gui.core.methods.base as base

    def broken(*args, **kwargs):
        raise RuntimeError("selection broke")
    monkeypatch.setattr(base, "select", broken)
    before = snapshot(tiny_model_dir)
    code, err = run(capsys, prune_args(tiny_model_dir, files / "o", calib=text_file))
    assert code == 2 and "Pruning failed: RuntimeError" in err and "selection broke" in err, err
    assert "Nothing was exported." in err and "restored" not in err
    assert not (files / "o").exists() and snapshot(tiny_model_dir) == before
