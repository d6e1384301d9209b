"""Shared fixtures: tiny random models of several architectures, a tiny chat tokenizer, the built-in model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("NO_PROXY", "localhost,127.0.0.1")

import pytest
import torch
import transformers as tf

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)

# Tiny configs of the decoder families we claim to support.
ARCHITECTURES = {
    "llama": lambda: tf.LlamaConfig(**SMALL),
    "mistral": lambda: tf.MistralConfig(**SMALL, sliding_window=16),
    "qwen2": lambda: tf.Qwen2Config(**SMALL),
    "qwen3": lambda: tf.Qwen3Config(**SMALL, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**SMALL, head_dim=16, sliding_window=8),
    "gemma3": lambda: tf.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=8,
                                          layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: tf.Phi3Config(**SMALL, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": lambda: tf.OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                word_embed_proj_dim=64, max_position_embeddings=256),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=256),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ARCHITECTURES[arch]()
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-token byte-level BPE with a ChatML template, trained on the built-in corpus in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from wanda_gui.core.calibration import builtin_calibration_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([builtin_calibration_text()[:300_000]], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", chat_template=CHATML)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny LLaMA with tokenizer: a complete local model folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    from wanda_gui.core.calibration import builtin_calibration_text

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(builtin_calibration_text()[:60_000])
    return path


@pytest.fixture(scope="session")
def builtin_dir():
    """The built-in model converted to safetensors (once per cache; ~20 s the first time)."""
    from wanda_gui.core.models import builtin_model_dir

    return builtin_model_dir()
