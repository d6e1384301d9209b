"""Loading: local folders, the offline hub cache, devices, dtypes, the built-in conversion, clear errors."""

import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
import transformers as tf

from wanda_gui.core import models
from wanda_gui.core.devices import native_bf16, resolve_device, resolve_dtype
from wanda_gui.core.errors import UserError
from wanda_gui.core.models import check_decoder_lm, download_from_hub, load_model, resolve_source


def make_hub_cache(root: Path, repo_id: str, model_dir: Path, revision: str = "main") -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/<rev>, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_local_folder_loads_with_model_card(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.info.architecture == "LlamaForCausalLM"
    assert loaded.info.blocks == 2 and loaded.info.linears == 14
    assert loaded.info.dtype == "fp32" and loaded.info.device == "cpu"
    assert loaded.info.has_chat_template
    assert loaded.model.model.embed_tokens.weight.dtype == torch.float32


def test_bf16_dtype_is_honoured(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="bf16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16 and loaded.info.dtype == "bf16"


def test_offline_hub_id_loads_from_the_local_cache(tmp_path, tiny_model_dir):
    snapshot = make_hub_cache(tmp_path, "tiny-org/tiny-llama", tiny_model_dir)
    path = download_from_hub("tiny-org/tiny-llama", cache_dir=tmp_path)
    assert path == snapshot
    loaded = load_model("tiny-org/tiny-llama", cache_dir=tmp_path)
    assert loaded.name == "tiny-org/tiny-llama" and loaded.info.linears == 14


def test_offline_hub_id_missing_from_cache_fails_clearly(tmp_path):
    with pytest.raises(UserError, match="not in the local hub cache.*offline"):
        load_model("some-org/not-cached", cache_dir=tmp_path)


def test_offline_hub_revision_missing_fails_clearly(tmp_path, tiny_model_dir):
    make_hub_cache(tmp_path, "tiny-org/tiny-llama", tiny_model_dir)
    with pytest.raises(UserError, match="not in the local hub cache"):
        download_from_hub("tiny-org/tiny-llama", revision="v2", cache_dir=tmp_path)


@pytest.mark.parametrize("make,message", [
    (lambda p: p, "no config.json"),
    (lambda p: (p / "config.json").write_text("{}") and p, "no weights"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: p / "missing-folder", "Folder .*missing-folder does not exist"),
])
def test_not_a_model_is_refused_clearly(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        resolve_source(str(make(tmp_path)))


def test_bare_name_that_is_no_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="'missing' is neither an existing folder nor a hub id"):
        resolve_source("missing")


@pytest.mark.parametrize("source", ["./nope", "../nope", "~/nope", "nope/a/b", "/no/such/folder", "nope/", r"C:\\models"])
def test_a_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "download_from_hub", lambda *a, **k: pytest.fail("a path was looked up on the hub"))
    with pytest.raises(UserError, match=f"^Folder {re.escape(source)} does not exist"):
        resolve_source(source)
    assert list(tmp_path.iterdir()) == []


def test_org_name_neither_folder_nor_cached_says_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no folder some-org/not-cached here.*not in the local hub cache"):
        load_model("some-org/not-cached", cache_dir=tmp_path / "hub")
    assert list(tmp_path.iterdir()) == []


def copy_model(tiny_model_dir: Path, where: Path) -> Path:
    shutil.copytree(tiny_model_dir, where)
    return where


@pytest.mark.parametrize("damage", [b"{not json", b"", b"\xff\xfe{}", b"[1, 2]"])
def test_corrupt_config_json_is_named(tmp_path, tiny_model_dir, damage):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    (folder / "config.json").write_bytes(damage)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(UserError, match=f"{re.escape(str(folder / 'config.json'))} (is not valid JSON|does not hold a JSON object)"
                                        ".*re-download or re-export"):
        load_model(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("keep", [0, 5, 200, -10])
def test_truncated_safetensors_is_named(tmp_path, tiny_model_dir, keep):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(UserError, match=f"{re.escape(str(weights))} is damaged or incomplete.*re-download or re-export"):
        load_model(str(folder))


def test_safetensors_with_extra_bytes_is_damaged(tmp_path, tiny_model_dir):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"junk")
    assert "where its header describes" in models.safetensors_problem(weights)
    assert models.safetensors_problem(next(tiny_model_dir.glob("*.safetensors"))) is None


def test_empty_source_is_refused():
    with pytest.raises(UserError, match="No model given"):
        resolve_source("  ")


def test_encoder_only_model_is_not_a_decoder_lm(tmp_path, tiny_tokenizer):
    config = tf.BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    tf.BertForMaskedLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="Not a decoder LM"):
        load_model(str(tmp_path))


def test_encoder_decoder_is_not_a_decoder_lm():
    with pytest.raises(UserError, match="encoder-decoder"):
        check_decoder_lm(tf.T5Config())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_without_gpu_fails_clearly(device):
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device(device)


@pytest.mark.parametrize("device,message", [("mps", "Unsupported device"), ("tpu", "Unknown device"), ("gpu0", "Unknown device")])
def test_unknown_device_fails_clearly(device, message):
    with pytest.raises(UserError, match=message):
        resolve_device(device)


def test_default_dtypes_and_bad_dtype():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(UserError, match="Unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(True, True, True), (False, True, False), (False, False, False)])
def test_bf16_counts_as_native_on_a_cpu_only_with_amx(monkeypatch, amx, avx512_bf16, expected):
    """AVX512-BF16 without AMX multiplies bf16 slower than fp32 (devices.native_bf16): reconstruction's Adam stays in
    fp32 there."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert native_bf16(torch.device("cpu")) is expected


def test_builtin_conversion_runs_once_under_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        (out / "weights.safetensors").write_text("w")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.builtin_model_dir())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".convert.lock", "smollm2-135m-instruct-fp32"]


def test_builtin_conversion_killed_halfway_leaves_nothing_that_looks_done(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))

    def dying_convert(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", dying_convert)
    with pytest.raises(KeyboardInterrupt):
        models.builtin_model_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".convert.lock"]


def test_builtin_conversion_removes_leftovers_of_killed_conversions(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    (tmp_path / ".convert-dead1234").mkdir()
    (tmp_path / ".convert-dead1234" / "model.safetensors").write_text("half")
    (tmp_path / "mine.txt").write_text("not ours")

    def fake_convert(gguf, out):
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    models.builtin_model_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".convert.lock", "mine.txt", "smollm2-135m-instruct-fp32"]


def test_builtin_model_is_a_real_llama(builtin_dir):
    config = tf.AutoConfig.from_pretrained(builtin_dir)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert "quantization_config" not in config.to_dict()
    assert any(builtin_dir.glob("*.safetensors"))
