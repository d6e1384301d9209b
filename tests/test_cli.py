"""The command line: a real subprocess, JSON out, one clear line and a non-zero exit for bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_models import make_hub_cache


def run_cli(*args, env=None, timeout=300):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "wanda_gui", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def test_prune_exports_and_prints_json(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "pruned"
    result = run_cli("prune", "--model", str(tiny_model_dir), "--pattern", "2:4", "--calib", str(text_file),
                     "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pattern"] == "2:4" and report["achieved_sparsity"] == pytest.approx(0.5)
    assert report["calibration"] == {"source": "file:calib.txt", "nsamples": 4, "seqlen": 32, "seed": 0}
    assert (out / "pruning_report.json").exists()
    assert "linear" in result.stderr and "2/2 [" in result.stderr  # the tqdm bar counts the 2 blocks


def test_prune_with_eval_reports_both_perplexities(tmp_path, tiny_model_dir, text_file):
    result = run_cli("prune", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4",
                     "--seqlen", "32", "--eval", "--eval-nwindows", "4", "--prune-lm-head", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "dense perplexity" in result.stdout and "pruned perplexity" in result.stdout
    report = json.loads((tmp_path / "o" / "pruning_report.json").read_text())
    assert report["perplexity"]["dense"]["nwindows"] == 4 and report["perplexity"]["pruned"]["seqlen"] == 32
    assert report["settings"]["prune_head"] and report["layers"][-1]["name"] == "lm_head"
    assert "and the LM head" in (tmp_path / "o" / "README.md").read_text()


def test_eval_reads_a_hub_id_from_the_offline_cache(tmp_path, tiny_model_dir):
    make_hub_cache(tmp_path, "tiny-org/tiny", tiny_model_dir)
    result = run_cli("eval", "--model", "tiny-org/tiny", "--seqlen", "32", "--nwindows", "3", "--json",
                     env={"HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["nwindows"] == 3 and report["perplexity"] > 1


@pytest.mark.parametrize("args,message", [
    (["prune", "--sparsity", "1.5"], "Sparsity must be in"),
    (["prune", "--pattern", "2:3"], "multiple of 3"),
    (["prune", "--pattern", "5:4"], "0 < N < M"),
    (["prune", "--seqlen", "4096"], "longer than the model's context"),
    (["prune", "--calib", "/nonexistent.txt"], "does not exist"),
    (["prune", "--device", "cuda:7"], "cuda:7"),
    (["eval", "--model", "nobody/nothing"], "not in the local hub cache"),
    (["eval", "--model", "/tmp"], "not a model folder"),
])
def test_bad_input_gets_one_clear_line(tmp_path, tiny_model_dir, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_model_dir)]
    if args[0] == "prune":
        args = [*args, "--nsamples", "2", "--out", str(tmp_path / "o")]
        if "--seqlen" not in args:
            args = [*args, "--seqlen", "32"]
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_before_any_work(tmp_path, tiny_model_dir):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    result = run_cli("prune", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "--overwrite" in result.stderr


def test_app_auth_needs_user_and_password():
    result = run_cli("app", "--auth", "nopassword")
    assert result.returncode == 2 and "--auth takes USER:PASS" in result.stderr


def test_every_method_and_the_wanda_variant_from_the_command_line(tmp_path, tiny_model_dir, text_file, capsys):
    from wanda_gui.cli import main
    from wanda_gui.core.methods import METHODS

    for name in (*METHODS, "wanda-variant"):
        out = tmp_path / name
        flags = ["--method", "wanda", "--wanda-variant"] if name == "wanda-variant" else ["--method", name]
        if name in METHODS and METHODS[name].structured_only:  # FLAP: whole channels and heads only
            flags += ["--pattern", "structured"]
        assert main(["prune", "--model", str(tiny_model_dir), *flags, "--sparsity", "0.6", "--calib", str(text_file),
                     "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--json"]) == 0
        report = json.loads((out / "pruning_report.json").read_text())
        assert report["method"] == name.split("-")[0] and report["settings"]["wanda_variant"] == (name == "wanda-variant")
        assert abs(report["achieved_sparsity"] - 0.6) < 0.01, (name, report["achieved_sparsity"])
    capsys.readouterr()
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "sparsegpt", "--wanda-variant",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "α-variant is a Wanda option" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_sweep_writes_results_and_resumes_without_rerunning(tmp_path, tiny_model_dir, text_file, capsys):
    from wanda_gui.cli import main

    args = ["sweep", "--model", str(tiny_model_dir), "--methods", "wanda,magnitude", "--sparsities", "0.3,0.6",
            "--patterns", "unstructured,2:4", "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--eval-seqlen", "32", "--eval-nwindows", "3", "--out", str(tmp_path / "sweep"), "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    keys = sorted(r["key"] for r in first["rows"])
    assert len(keys) == 1 + 2 * 3 and "wanda|2:4|0.5" in keys and "magnitude|unstructured|0.6" in keys
    assert {"results.json", "results.csv", "chart.html"} <= {p.name for p in (tmp_path / "sweep").iterdir()}
    mtime = (tmp_path / "sweep" / "results.json").stat().st_mtime_ns
    assert main(args) == 0  # resumed: every run is already there
    assert sorted(r["key"] for r in json.loads(capsys.readouterr().out)["rows"]) == keys
    assert main([*args[:-3], "--seed", "3", "--out", str(tmp_path / "sweep")]) == 2
    assert "seed" in capsys.readouterr().err and (tmp_path / "sweep" / "results.json").stat().st_mtime_ns == mtime


# (5) the CLI's --seed draws the calibration windows
def cli_masks(tmp_path, tiny_model_dir, text_file, seed, name):
    """Prune with the CLI in-process; return its report and every exported weight's zero mask."""
    from wanda_gui.cli import main

    out = tmp_path / name
    code = main(["prune", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "2",
                 "--seqlen", "16", "--seed", str(seed), "--out", str(out)])
    assert code == 0
    weights = {}
    for path in sorted(out.glob("*.safetensors")):
        weights.update(load_file(path))
    report = json.loads((out / "pruning_report.json").read_text())
    return report, {k: v == 0 for k, v in weights.items() if "layers." in k and v.dim() == 2}


def test_cli_seed_chooses_the_calibration_windows(tmp_path, tiny_model_dir, text_file):
    report_a, masks_a = cli_masks(tmp_path, tiny_model_dir, text_file, 1, "a")
    report_b, masks_b = cli_masks(tmp_path, tiny_model_dir, text_file, 2, "b")
    _, masks_b2 = cli_masks(tmp_path, tiny_model_dir, text_file, 2, "b2")
    assert report_a["calibration"]["seed"] == 1 and report_b["calibration"]["seed"] == 2
    assert masks_a.keys() == masks_b.keys() and len(masks_a) == 14
    assert all(torch.equal(masks_b[k], masks_b2[k]) for k in masks_b)  # same seed, same masks
    differing = [k for k in masks_a if not torch.equal(masks_a[k], masks_b[k])]
    assert len(differing) >= len(masks_a) // 2, differing  # another seed, other windows, other masks
