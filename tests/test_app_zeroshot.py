"""Zero-shot accuracy in the app, through its API (gradio_client): dense vs pruned on a task the test writes, the
status line per task, the table, and the export's report and card."""

import json

import pytest
from gradio_client import Client
from transformers import AutoModelForCausalLM

from test_app_api import error_of, load_tiny, prune_args, serving
from test_zeroshot import by_hand, sharp_model_dir, tasks_dir  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def url():
    with serving() as demo:
        yield demo.local_url


def test_dense_vs_pruned_accuracy_streams_per_task_and_goes_into_the_export(url, sharp_model_dir, tasks_dir,
                                                                            text_file, tiny_tokenizer, tmp_path):
    client = Client(url, verbose=False)
    load_tiny(client, sharp_model_dir)
    assert "Prune the model first" in error_of(lambda: client.predict("tiny_civics", str(tasks_dir), 0,
                                                                      api_name="/zero_shot"))
    client.predict(*prune_args([text_file]), api_name="/prune")
    assert "Unknown zero-shot task 'tiny_civic' (did you mean tiny_civics?)" in error_of(
        lambda: client.predict("tiny_civic", str(tasks_dir), 0, api_name="/zero_shot"))
    assert "less than minimum value 0" in error_of(lambda: client.predict("tiny_civics", str(tasks_dir), -1,
                                                                       api_name="/zero_shot"))

    job = client.submit("tiny_civics", str(tasks_dir), 0, api_name="/zero_shot")
    statuses = list(job)  # the status line (the buttons are not among the API's outputs)
    table = job.result()
    assert "… Zero-shot accuracy of the dense model: tiny_civics (1/1)" in statuses

    out = tmp_path / "export"
    client.predict(str(out), False, api_name="/export")
    dense = by_hand(AutoModelForCausalLM.from_pretrained(sharp_model_dir), tiny_tokenizer)
    pruned = by_hand(AutoModelForCausalLM.from_pretrained(out), tiny_tokenizer)
    assert dense != pruned
    report = json.loads((out / "pruning_report.json").read_text())
    measured = {model: report["zero_shot"][model]["tasks"]["tiny_civics"] for model in ("dense", "pruned")}
    assert (measured["dense"]["acc"], measured["dense"]["acc_norm"]) == pytest.approx(dense)
    assert (measured["pruned"]["acc"], measured["pruned"]["acc_norm"]) == pytest.approx(pruned)
    row = (f"| tiny_civics | {100 * dense[0]:.2f} ± {100 * measured['dense']['acc_stderr']:.2f} | "
           f"{100 * pruned[0]:.2f} ± {100 * measured['pruned']['acc_stderr']:.2f} | "
           f"{100 * (pruned[0] - dense[0]):+.2f} |")
    assert "| task | dense | pruned | difference |" in table and row in table
    assert row in (out / "README.md").read_text()

    client.predict(*prune_args([text_file], sparsity=0.6), api_name="/prune")  # a new run: nothing measured on it
    client.predict(str(tmp_path / "again"), False, api_name="/export")
    report = json.loads((tmp_path / "again" / "pruning_report.json").read_text())
    assert report["zero_shot"] is None and "Zero-shot" not in (tmp_path / "again" / "README.md").read_text()
    client.close()
