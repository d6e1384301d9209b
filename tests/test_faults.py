"""Faults in real processes: SIGKILL during an export or a conversion, two exports racing for one folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wanda_gui.core import models
from wanda_gui.core.config import PruneConfig
from wanda_gui.core.engine import prune
from wanda_gui.core.runs import drain
from wanda_gui.core.export import REPORT_NAME, export_model, make_report
from wanda_gui.core.models import load_model

ROOT = Path(__file__).resolve().parents[1]

# A child that exports or converts, writes part of its output, says so in a file, then waits for a "go" file
# (or for the SIGKILL it is there to receive). Any UserError is printed as the CLI would print it, rc 2.
CHILD = r'''
import json, sys, time
from pathlib import Path

from wanda_gui.core.errors import UserError

job, ready, go, *args = sys.argv[1:]


def pause(folder):
    Path(ready).write_text(str(folder))
    while not Path(go).exists():
        time.sleep(0.05)


try:
    if job == "export":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from wanda_gui.core.export import export_model

        model_dir, out, report = args
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        save = model.save_pretrained

        def slow_save(folder, **kwargs):
            save(folder, **kwargs)
            pause(folder)

        model.save_pretrained = slow_save
        export_model(model, tokenizer, out, json.loads(Path(report).read_text()))
    else:
        from wanda_gui.core import models

        def slow_convert(gguf, out):
            (out / "model.safetensors").write_bytes(b"half a model")
            pause(out)

        models._convert_gguf = slow_convert
        models.builtin_model_dir()
except UserError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
'''


class Child:
    """One child process running CHILD, with its ready and go files."""

    def __init__(self, tmp: Path, job: str, *args, env: dict | None = None):
        self.ready, self.go = tmp / f"ready-{id(self)}", tmp / f"go-{id(self)}"
        script = tmp / "child.py"
        script.write_text(CHILD)
        self.proc = subprocess.Popen([sys.executable, str(script), job, str(self.ready), str(self.go), *map(str, args)],
                                     cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def wait_ready(self) -> Path:
        """The folder the child is writing, once it has written part of it (safety limit only, not a timing test)."""
        for _ in range(2400):
            if self.ready.exists() and self.ready.read_text():
                return Path(self.ready.read_text())
            if self.proc.poll() is not None:
                pytest.fail(f"child ended early: {self.proc.communicate()}")
            time.sleep(0.05)
        pytest.fail("child never got ready")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self) -> tuple[int, str]:
        self.go.write_text("go")
        _, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, err


@pytest.fixture
def pruned(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    calib = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    summary = drain(prune(loaded.model, PruneConfig(sparsity=0.5), calib))
    return loaded, make_report(loaded.info, summary, None, {"load": 0.1})


@pytest.fixture
def report_file(tmp_path, pruned):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(pruned[1]))
    return path


def test_export_killed_midway_is_cleaned_by_the_next_export(tmp_path, tiny_model_dir, pruned, report_file):
    loaded, report = pruned
    exports = tmp_path / "exports"
    child = Child(tmp_path, "export", tiny_model_dir, exports / "out", report_file)
    partial = child.wait_ready()
    assert partial.parent == exports and partial.name.startswith(".out.partial-") and any(partial.iterdir())
    # While it runs, another export into the same parent leaves its folder and lock alone.
    export_model(loaded.model, loaded.tokenizer, exports / "other", report)
    assert partial.is_dir() and (exports / ".out.export-lock").exists()
    child.kill()
    assert sorted(p.name for p in exports.iterdir()) == [".out.export-lock", partial.name, "other"]
    export_model(loaded.model, loaded.tokenizer, exports / "third", report)
    assert sorted(p.name for p in exports.iterdir()) == ["other", "third"]


def test_second_export_to_one_folder_fails_and_the_first_completes(tmp_path, tiny_model_dir, report_file):
    exports = tmp_path / "exports"
    first = Child(tmp_path, "export", tiny_model_dir, exports / "out", report_file)
    first.wait_ready()
    second = Child(tmp_path, "export", tiny_model_dir, exports / "out", report_file)
    rc, err = second.finish()
    assert rc == 2 and f"Another export to {exports / 'out'} is running" in err and "Traceback" not in err, err
    rc, err = first.finish()
    assert rc == 0, err
    assert sorted(p.name for p in exports.iterdir()) == ["out"]
    saved = json.loads((exports / "out" / REPORT_NAME).read_text())
    assert all((exports / "out" / name).is_file() for name in saved["exported_files"])
    assert any((exports / "out").glob("*.safetensors"))


def test_conversion_killed_midway_is_cleaned_by_the_next_conversion(tmp_path, tiny_model_dir, monkeypatch):
    cache = tmp_path / "cache"
    child = Child(tmp_path, "convert", env={models.CACHE_ENV: str(cache)})
    partial = child.wait_ready()
    assert partial.parent == cache and partial.name.startswith(".convert-") and any(partial.iterdir())
    child.kill()
    assert sorted(p.name for p in cache.iterdir()) == sorted([".convert.lock", partial.name])

    def tiny_convert(gguf, out):
        shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)

    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    monkeypatch.setattr(models, "_convert_gguf", tiny_convert)
    loaded = load_model(models.BUILTIN)
    assert loaded.name == models.BUILTIN_NAME and loaded.info.linears == 14
    assert sorted(p.name for p in cache.iterdir()) == [".convert.lock", "smollm2-135m-instruct-fp32"]


def test_refused_export_changes_nothing_in_a_real_process(tmp_path, tiny_model_dir, report_file):
    target = tmp_path / "exports" / "out"
    (target / "photos").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    (target / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    before = {str(p): p.stat().st_mode for p in [target, *target.rglob("*")]}
    rc, err = Child(tmp_path, "export", tiny_model_dir, target, report_file).finish()
    assert rc == 2 and "is not empty and is not a previous export" in err and "Traceback" not in err
    assert {str(p): p.stat().st_mode for p in [target, *target.rglob("*")]} == before
    assert (target / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]

