"""Models bigger than memory: the model is opened with empty blocks, each block's weights are read from the
safetensors checkpoint for its stage, pruned, handed to the streamed export and released.

Only what the blocks do not hold (embeddings, final norm, LM head, buffers) stays resident, so a run's peak memory
is about one block's weights + the resident part + the calibration activations, whatever the number of blocks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

from .architecture import find_blocks
from .errors import UserError
from .export import SAFETENSORS_DTYPES
from .memory import release_memory
from .methods.base import RunContext, Step

TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """A model folder's safetensors weights, read a few tensors at a time with plain reads into fresh memory.

    Not memory-mapped: a mapped tensor keeps the whole file's mapping alive, and every page a block touched stayed
    resident (a 4.3 GB model peaked at 4.7 GiB "offloaded")."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / SINGLE_NAME).exists():
            files = [SINGLE_NAME]
        else:
            raise UserError(f"{self.folder} holds no {SINGLE_NAME} or {INDEX_NAME}: offloading reads safetensors "
                            "weights block by block; re-save the model with save_pretrained or run without offload.")
        self.entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int]] = {}  # key -> file, dtype, shape, start
        for name in files:
            with open(self.folder / name, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                self.entries[key] = (name, TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                     8 + length + entry["data_offsets"][0])
        self.file_of = {key: entry[0] for key, entry in self.entries.items()}

    def read(self, names: dict[str, str], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """{model key: checkpoint key} -> {model key: tensor on the device, floating point ones in dtype}."""
        out = {}
        for key, stored in sorted(names.items(), key=lambda item: self.entries[item[1]][::3]):  # file order
            name, stored_dtype, shape, start = self.entries[stored]
            tensor = torch.empty(shape, dtype=stored_dtype)
            with open(self.folder / name, "rb", buffering=0) as f:
                f.seek(start)
                f.readinto(tensor.reshape(-1).view(torch.uint8).numpy())
            wanted = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            out[key] = tensor.to(device=device, dtype=wanted)
        return out

    def names_for(self, model: nn.Module) -> dict[str, str]:
        """{model key: checkpoint key}: transformers renames a few legacy names on load (GPT-NeoX's embed_out is
        lm_head); its pure renamings are applied here too, and the export keeps the checkpoint's names as
        save_pretrained does."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming

            renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        except ImportError:  # another transformers version: names as stored
            renamings = []
        names = {}
        for stored in self.file_of:
            key = stored
            for renaming in renamings:
                key = renaming.rename_source_key(key)[0]
            names[key] = stored
        return names


class LazyModel:
    """A causal LM whose decoder blocks are empty (meta) until loaded: the rest of it is real on the device."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype):
        self.model, self.checkpoint, self.device, self.dtype = model, checkpoint, device, dtype
        self.blocks_name, self.blocks = find_blocks(model)
        self.stored = checkpoint.names_for(model)
        self.keys = self._tensor_keys()
        prefix = f"{self.blocks_name}."
        self.block_keys: list[list[str]] = [[] for _ in self.blocks]
        self.resident_keys: list[str] = []
        for key in self.keys:
            if key.startswith(prefix):
                self.block_keys[int(key[len(prefix):].split(".", 1)[0])].append(key)
            else:
                self.resident_keys.append(key)

    def load_resident(self) -> None:
        """Read everything outside the blocks onto the device (embeddings, final norm, LM head, buffers)."""
        self._place(self.checkpoint.read({k: self.stored[k] for k in self.resident_keys}, self.device, self.dtype))
        self.model.tie_weights()  # placing the embeddings replaced their parameter: the tied head follows it
        empty = [name for name, p in self.model.named_parameters()
                 if p.is_meta and not name.startswith(f"{self.blocks_name}.")]
        if empty:
            raise UserError(f"Offloading left {empty[0]} (and {len(empty) - 1} more) without weights; run without offload.")

    def share_resident(self, other: "LazyModel") -> None:
        """Take everything outside the blocks from `other`, a lazy model of the same architecture, as the same
        tensors (no copy): a pruned model read from disk beside the dense model it came from."""
        state = other.model.state_dict(keep_vars=True)
        self._place({key: state[key].detach() for key in self.resident_keys})
        self.model.tie_weights()

    def read_blocks_on_demand(self) -> nn.Module:
        """Hooks that read each block as the model's forward reaches it and release it after, so that generate()
        runs on a model that stays on disk with one block in memory at a time (each token reads every block: slow,
        but bounded). Give it a lazy model of its own: the engine and the evaluation load blocks themselves."""
        for index, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda *_, i=index: self.load_block(i))
            block.register_forward_hook(lambda *_, i=index: self.release_block(i))
        return self.model

    def _tensor_keys(self) -> list[str]:
        """Every parameter (tied ones once) and persistent buffer, by the name the checkpoint must hold it under."""
        keys = [name for name, _ in self.model.named_parameters()]
        persistent = set(self.model.state_dict(keep_vars=True))
        keys += [name for name, _ in self.model.named_buffers() if name in persistent]
        missing = [key for key in keys if key not in self.stored]
        if missing:
            raise UserError(f"The checkpoint in {self.checkpoint.folder} stores {len(missing)} of the model's tensors "
                            f"under other names (e.g. {missing[0]}): offloading reads each tensor by the model's own "
                            "name. Run without offload, or re-save the model with save_pretrained first.")
        return keys

    def _place(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            set_module_tensor_to_device(self.model, key, self.device, value=value)

    def load_block(self, index: int) -> None:
        self._place(self.checkpoint.read({k: self.stored[k] for k in self.block_keys[index]}, self.device, self.dtype))

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """A loaded block's tensors by checkpoint name (what the streamed export writes)."""
        state = self.model.state_dict(keep_vars=True)
        return {self.stored[key]: state[key].detach() for key in self.block_keys[index]}

    def resident_tensors(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict(keep_vars=True)
        return {self.stored[key]: state[key].detach() for key in self.resident_keys}

    def release_block(self, index: int) -> None:
        for key in self.block_keys[index]:
            set_module_tensor_to_device(self.model, key, "meta")
        release_memory(collect=False)

    def release_loaded_blocks(self) -> None:
        """Every block still in memory back to disk (the one a stopped run was in)."""
        for index, block in enumerate(self.blocks):
            if any(not p.is_meta for p in block.parameters()):
                self.release_block(index)

    def specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each tensor's dtype and shape by checkpoint name, as the export will hold it, in the model's order."""
        state = self.model.state_dict(keep_vars=True)
        return {self.stored[key]: (state[key].dtype, tuple(state[key].shape)) for key in self.keys}

    def _bytes(self, keys: list[str]) -> int:
        state = self.model.state_dict(keep_vars=True)
        return sum(state[k].numel() * state[k].element_size() for k in keys)

    def block_bytes(self) -> int:
        """The largest block's weights in the run's dtype."""
        return max(self._bytes(keys) for keys in self.block_keys)

    def resident_bytes(self) -> int:
        return self._bytes(self.resident_keys)

    def largest_read_copy(self) -> int:
        """Reading a tensor stored in another dtype than the run's holds it twice for a moment: the largest such."""
        entries = [self.checkpoint.entries[self.stored[key]] for key in self.keys]
        return max((math.prod(shape) * dtype.itemsize for _, dtype, shape, _ in entries if dtype != self.dtype),
                   default=0)


def open_lazy(path: Path, config, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> LazyModel:
    """The model built from its config with empty weights (buffers such as rotary frequencies are real); nothing
    is read until load_resident and load_block."""
    path = Path(path)
    checkpoint = Checkpoint(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # not done on empty weights: a tied head must be one parameter with the embeddings
    model.eval()
    model.requires_grad_(False)
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in list(model.named_buffers()):
        if name not in persistent:  # computed at construction (rotary frequencies): onto the execution device
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name).register_buffer(leaf, buffer.to(device), persistent=False)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return LazyModel(model, checkpoint, device, dtype)


class Offload(Step):
    """Brings each block in as its stage begins and, once the stage is pruned and its outputs computed, hands the
    block's tensors to `sink` (the streamed export) and releases them. Outermost hook: loads first, releases last."""

    def __init__(self, lazy: LazyModel, sink: Callable[[dict[str, torch.Tensor]], None] | None):
        self.lazy, self.sink = lazy, sink

    def before_stage(self, ctx: RunContext, index: int) -> None:
        if index < len(self.lazy.blocks):
            self.lazy.load_block(index)

    def after_stage(self, ctx: RunContext, index: int) -> None:
        if index < len(self.lazy.blocks):
            if self.sink is not None:
                self.sink(self.lazy.block_tensors(index))
            self.lazy.release_block(index)
