"""torchrun data parallelism: two gloo processes, each calibrating on its share of the windows, prune to the same
masks as one process on all the windows (up to near-ties that fp32 summation order can flip, which are counted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def prune_cli(*args, processes: int = 1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "wanda_gui", "prune", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def masks(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return {name: t == 0 for name, t in tensors.items() if ".layers." in name and t.dim() == 2}


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_two_gloo_processes_give_the_masks_of_one(tmp_path, tiny_model_dir, text_file, method, pattern):
    common = ["--model", str(tiny_model_dir), "--method", method, "--pattern", pattern, "--calib", str(text_file),
              "--nsamples", "7", "--seqlen", "32"]  # 7 windows: the ranks get 4 and 3, so their weights differ
    single = prune_cli(*common, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    double = prune_cli(*common, "--out", str(tmp_path / "two"), "--json", processes=2)
    assert double.returncode == 0, double.stderr
    report = json.loads(double.stdout)  # rank 0 alone reports and exports
    assert report["calibration"]["processes"] == 2 and report["calibration"]["samples_per_process"] == [4, 3]
    one, two = masks(tmp_path / "one"), masks(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 14
    flipped = sum(int((one[k] != two[k]).sum()) for k in one)
    total = sum(m.numel() for m in one.values())
    print(f"{flipped} of {total} positions differ (near-ties)")
    assert flipped <= total * 1e-4
    if method == "sparsegpt":  # the updates come from the merged Hessians too
        a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
        for name in one:
            torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_a_method_without_calibration_is_refused_under_torchrun(tmp_path, tiny_model_dir):
    result = prune_cli("--model", str(tiny_model_dir), "--method", "magnitude", "--out", str(tmp_path / "o"),
                       processes=2)
    assert result.returncode != 0 and "nothing to share" in result.stderr
    assert not (tmp_path / "o").exists()


def test_fewer_windows_than_processes_is_refused(tmp_path, tiny_model_dir, text_file):
    result = prune_cli("--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "1", "--seqlen", "32",
                       "--out", str(tmp_path / "o"), processes=2)
    assert result.returncode != 0 and "--nsamples 2" in result.stderr


def test_reconstruction_is_refused_under_torchrun(tmp_path, tiny_model_dir, text_file):
    result = prune_cli("--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                       "--reconstruct", "--out", str(tmp_path / "o"), processes=2)
    assert result.returncode != 0 and "run it in one process" in result.stderr
