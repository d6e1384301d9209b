"""Zero-shot accuracy through lm-evaluation-harness: a multiple-choice task the test writes itself (local JSON lines),
on tiny models, never the network."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from wanda_gui.core.errors import UserError
from wanda_gui.core.harness import PreparedTasks
from wanda_gui.core.zeroshot import TaskSpec, task_names

QUESTIONS = [
    ("Who makes the laws of the nation?", ["Congress", "the weather", "a very small dog", "tomorrow"], 0),
    ("What does the President deliver each year?", ["a song", "the State of the Union address", "bread", "rain"], 1),
    ("Which country do these speeches address?", ["the moon", "fish", "the United States of America", "red"], 2),
    ("What protects the freedom of the people?", ["noise", "a chair", "lunch", "the Constitution"], 3),
    ("Who pays the taxes of the government?", ["the American people", "stars", "a river in winter", "ice"], 0),
    ("What did the nation fight for in war?", ["soup", "liberty and peace", "the color green", "sand"], 1),
    ("What must the budget be?", ["a bird", "purple", "balanced", "a long and winding road to nowhere"], 2),
    ("Who serves in the armed forces?", ["cheese", "an old clock", "windows", "our soldiers and sailors"], 3),
    ("What grows when trade grows?", ["the economy", "a tree in the garden of the house", "snow", "fog"], 0),
    ("What do schools give our children?", ["smoke", "education", "a broken wheel", "dust"], 1),
    ("Where does Congress meet?", ["in the sea", "nowhere at all", "in the Capitol", "a cloud"], 2),
    ("What do workers earn?", ["stones", "a loud bell", "silence", "wages"], 3),
]
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def write_task(folder: Path, name: str = "tiny_civics", rows=QUESTIONS) -> Path:
    """A multiple-choice task of lm-eval's custom YAML kind, over local JSON lines."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": label}) + "\n" for q, c, label in rows))
    (folder / f"{name}.yaml").write_text(YAML.format(name=name, data=data))
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def prepared(tasks_dir):
    return PreparedTasks(TaskSpec(("tiny_civics",), tasks_dir))


def sharp_model() -> torch.nn.Module:
    """A tiny LLaMA whose choices are told apart by its weights, not by their token counts alone: a random model's
    near-uniform logits make every question's answer its choice with the fewest tokens, which pruning never moves."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight *= 20
        for block in model.model.layers:
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight *= 8
    return model


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("sharp-llama")
    sharp_model().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@torch.inference_mode()
def by_hand(model, tokenizer, rows=QUESTIONS) -> tuple[float, float]:
    """(acc, acc_norm) computed from the model's logits: each choice's summed log-probability after the prompt
    (lm-eval's " " before a choice, the choice's tokens being those of prompt + choice beyond the prompt's); acc
    picks the most likely choice, acc_norm the most likely per character."""
    hits = hits_norm = 0
    for question, choices, label in rows:
        context = f"Question: {question}\nAnswer:"
        logliks = []
        for choice in choices:
            prompt, whole = tokenizer.encode(context), tokenizer.encode(f"{context} {choice}")
            logprobs = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
            logliks.append(sum(logprobs[len(prompt) - 1 + i, token].item()
                               for i, token in enumerate(whole[len(prompt):])))
        hits += int(np.argmax(logliks)) == label
        hits_norm += int(np.argmax(np.array(logliks) / [len(c) for c in choices])) == label
    return hits / len(rows), hits_norm / len(rows)


def test_accuracy_is_the_argmax_of_the_choices_loglikelihoods(prepared, tiny_tokenizer):
    model = sharp_model()
    acc, acc_norm = by_hand(model, tiny_tokenizer)
    assert acc != acc_norm  # the data tell the two metrics apart on this model
    seen = []
    result = prepared.evaluate(model, tiny_tokenizer, progress=seen.append)
    [task] = result.tasks
    assert (task.task, task.examples) == ("tiny_civics", len(QUESTIONS))
    assert task.acc == pytest.approx(acc, abs=1e-12) and task.acc_norm == pytest.approx(acc_norm, abs=1e-12)
    n = len(QUESTIONS)
    assert task.acc_stderr == pytest.approx((acc * (1 - acc) / (n - 1)) ** 0.5)  # the sample stddev over sqrt(n)
    assert result.mean_acc == task.acc
    requests = 4 * len(QUESTIONS)  # one per choice
    assert [(p.done, p.total) for p in seen] == [(0, 0), *((i, requests) for i in range(1, requests + 1))]
    again = prepared.evaluate(model, tiny_tokenizer)  # the same tasks measure a second model (the pruned one) alike
    assert again.tasks[0].acc == task.acc and again.tasks[0].acc_norm == task.acc_norm


def test_limit_takes_the_first_examples(tasks_dir, tiny_tokenizer):
    model = sharp_model()
    result = PreparedTasks(TaskSpec(("tiny_civics",), tasks_dir, limit=5)).evaluate(model, tiny_tokenizer)
    assert result.tasks[0].examples == 5
    assert result.tasks[0].acc == pytest.approx(by_hand(model, tiny_tokenizer, QUESTIONS[:5])[0], abs=1e-12)


def test_the_model_tokenizer_and_random_state_are_left_as_they_were(tasks_dir, tiny_tokenizer):
    """A tied GPT-2 whose head was untied on purpose, in train mode, a tokenizer without a pad token: evaluated as
    it is (HFLM's tie_weights undone before any pass), and all of it as it was afterwards, weights to the bit."""
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    tied = by_hand(model, tokenizer)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.transformer.wte.weight))
    head = model.lm_head.weight
    expected = by_hand(model, tokenizer)
    assert expected != tied  # so the head the evaluation used shows in its result
    model.train()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()

    result = PreparedTasks(TaskSpec(("tiny_civics",), tasks_dir)).evaluate(model, tokenizer)

    assert (result.tasks[0].acc, result.tasks[0].acc_norm) == pytest.approx(expected, abs=1e-12)
    assert model.lm_head.weight is head and head is not model.transformer.wte.weight
    assert all(module.training for module in model.modules())
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert tokenizer.pad_token is None
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])


def test_stop_ends_the_evaluation_within_a_batch(prepared, tiny_tokenizer):
    cancel = threading.Event()

    def stop_halfway(where):
        if where.done == 20:
            cancel.set()

    with pytest.raises(UserError, match="stopped"):
        prepared.evaluate(sharp_model(), tiny_tokenizer, progress=stop_halfway, cancel=cancel)


def test_task_names_and_spec_are_checked_before_any_harness_work(tmp_path):
    assert task_names(" boolq, rte,,boolq ,arc_easy") == ("boolq", "rte", "arc_easy")
    with pytest.raises(UserError, match="at least one zero-shot task"):
        TaskSpec(task_names(" , "))
    with pytest.raises(UserError, match="is not a folder"):
        TaskSpec(("x",), tmp_path / "missing")
    with pytest.raises(UserError, match="at least 1"):
        TaskSpec(("x",), limit=0)


def test_a_task_that_is_not_scored_by_accuracy_is_refused_before_any_model_pass(tmp_path):
    folder = write_task(tmp_path)
    (folder / "tiny_generate.yaml").write_text((folder / "tiny_civics.yaml").read_text().replace(
        "task: tiny_civics", "task: tiny_generate").replace("output_type: multiple_choice",
                                                           "output_type: generate_until").split("metric_list")[0]
        + "metric_list:\n  - metric: exact_match\n")
    with pytest.raises(UserError, match="'tiny_generate' is not scored by accuracy"):
        PreparedTasks(TaskSpec(("tiny_generate",), folder))


def test_a_missing_data_file_names_the_task(tmp_path):
    folder = write_task(tmp_path)
    (folder / "tiny_civics.jsonl").unlink()
    with pytest.raises(UserError, match="'tiny_civics' could not read its data"):
        PreparedTasks(TaskSpec(("tiny_civics",), folder))


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wanda_gui", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_cli_eval_tasks_json(sharp_model_dir, tasks_dir, tiny_tokenizer):
    run = cli("eval", "--model", sharp_model_dir, "--tasks", "tiny_civics", "--tasks-dir", tasks_dir, "--limit", 10,
              "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert "perplexity" not in out  # --tasks alone measures the tasks only
    measured = out["zero_shot"]["tasks"]["tiny_civics"]
    from transformers import AutoModelForCausalLM

    acc, acc_norm = by_hand(AutoModelForCausalLM.from_pretrained(sharp_model_dir), tiny_tokenizer, QUESTIONS[:10])
    assert measured["examples"] == 10 and (measured["acc"], measured["acc_norm"]) == pytest.approx((acc, acc_norm))
    assert out["zero_shot"]["mean_acc"] == measured["acc"] and out["zero_shot"]["limit"] == 10


def test_cli_refuses_unknown_tasks_before_loading_the_model(tmp_path):
    run = cli("eval", "--model", tmp_path / "no-model-here", "--tasks", "arc_esy,rte")
    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    assert "Unknown zero-shot task 'arc_esy' (did you mean arc_easy?)" in line and "--list-tasks" in line


def test_cli_names_a_builtin_dataset_missing_offline_before_loading(tmp_path):
    """An empty Hugging Face home, offline: boolq's dataset cannot be in the cache."""
    run = cli("eval", "--model", tmp_path / "no-model-here", "--tasks", "boolq",
              env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    assert "'boolq' needs the dataset aps/super_glue (config boolq)" in line
    assert "datasets.load_dataset('aps/super_glue', 'boolq')" in line


def test_cli_prune_reports_dense_and_pruned_accuracy(sharp_model_dir, tasks_dir, text_file, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    run = cli("prune", "--model", sharp_model_dir, "--calib", text_file, "--nsamples", 4, "--seqlen", 32,
              "--tasks", "tiny_civics", "--tasks-dir", tasks_dir, "--out", out, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["zero_shot"] == json.loads(run.stdout)["zero_shot"]
    dense, pruned = (report["zero_shot"][k]["tasks"]["tiny_civics"] for k in ("dense", "pruned"))
    assert dense["examples"] == pruned["examples"] == len(QUESTIONS)
    expected = {"dense": by_hand(AutoModelForCausalLM.from_pretrained(sharp_model_dir), tiny_tokenizer),
                "pruned": by_hand(AutoModelForCausalLM.from_pretrained(out), tiny_tokenizer)}
    assert expected["dense"] != expected["pruned"]  # pruning moved them: each was measured on its own model
    assert (dense["acc"], dense["acc_norm"]) == pytest.approx(expected["dense"])
    assert (pruned["acc"], pruned["acc_norm"]) == pytest.approx(expected["pruned"])
    card = (out / "README.md").read_text()
    difference = 100 * (pruned["acc"] - dense["acc"])
    assert "## Zero-shot accuracy" in card and "| task | dense | pruned | difference |" in card
    assert f"| tiny_civics | {100 * dense['acc']:.2f} ± " in card and f"| {difference:+.2f} |" in card


CACHED_BOOLQ = """
import json, pathlib, shutil, sys
from datasets import config
from datasets.packaged_modules.json.json import Json

# What a download of aps/super_glue's boolq leaves in the datasets cache (NAMESPACE___NAME/CONFIG/VERSION/HASH with
# dataset_info.json and NAME-SPLIT.arrow files), written here from six rows of its columns.
rows = pathlib.Path(sys.argv[1])
rows.write_text("".join(json.dumps({"question": f"is this question {i} true", "passage": f"Passage {i} says it is.",
                                    "idx": i, "label": i % 2}) + "\\n" for i in range(6)))
root = pathlib.Path(config.HF_DATASETS_CACHE)
Json(cache_dir=str(root), dataset_name="super_glue", config_name="boolq",
     data_files={"train": str(rows), "validation": str(rows)}).download_and_prepare()
target = root / "aps___super_glue" / "boolq" / "0.0.0" / "0123456789abcdef"
target.parent.mkdir(parents=True)
shutil.move(str(next((root / "super_glue").glob("boolq-*/0.0.0"))), str(target))

from wanda_gui.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_offline_a_catalogue_task_reads_its_dataset_from_the_local_cache(tiny_model_dir, tmp_path):
    """boolq (lm-evaluation-harness's own YAML) with HF_HUB_OFFLINE/HF_DATASETS_OFFLINE: its dataset comes from the
    local Hugging Face datasets cache, here six rows written into it the way a download lays them out."""
    run = subprocess.run([sys.executable, "-c", CACHED_BOOLQ, tmp_path / "rows.jsonl", "eval", "--model",
                          tiny_model_dir, "--tasks", "boolq", "--json"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
                              "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    boolq = json.loads(run.stdout)["zero_shot"]["tasks"]["boolq"]
    assert boolq["examples"] == 6 and boolq["acc_norm"] is None  # boolq's YAML scores acc alone
    assert boolq["acc"] in {i / 6 for i in range(7)}
