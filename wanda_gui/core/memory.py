"""Memory as the process and the device see it: what is free, what this process holds and has held at most, sizes
written the way people write them, and handing freed memory back to the OS."""

from __future__ import annotations

import ctypes
import gc
import platform
import re
import resource

import psutil
import torch

from .errors import UserError

UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
         "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """'3GiB', '2.5GB', '512MiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"Cannot read the memory size {text!r}: write it like 3GiB, 2.5GB or 512MiB.")
    return int(float(match[1]) * UNITS[(match[2] or "").lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(device: str | torch.device) -> int:
    """Bytes free now: available RAM on CPU, the GPU's free memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def resident_bytes() -> int:
    """What this process holds in RAM now."""
    return psutil.Process().memory_info().rss


def peak_bytes(device: torch.device) -> int:
    """The most this process has held: its peak resident set as the kernel counts it on CPU (not a sample of the
    current one, which misses every transient), the most allocated on CUDA since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _glibc():
    if platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's default: larger allocations are mapped, and unmapped when freed


def keep_freed_memory_mapped(keep: bool = True) -> None:
    """keep: ask glibc to keep large freed blocks instead of handing them back to the OS, since otherwise every
    batch of a block forward page-faults fresh zeroed memory in again (SmolLM2 block passes ran 5-9% faster).
    Not keep (a run under a memory bound): large blocks mapped and unmapped as glibc does by default, so that what
    a linear's scoring freed is not held, in another thread's arena, while the next linear allocates anew (a 1.5B
    model offloaded peaked 0.4 GiB higher kept)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30 if keep else GLIBC_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30 if keep else GLIBC_MMAP_THRESHOLD)


def release_memory(collect: bool = True) -> None:
    """Hand freed memory back: garbage collected (unless the caller knows there is none), the CUDA cache emptied,
    and glibc's freed heap pages returned to the OS. With the thresholds above glibc keeps every page, and an
    offloaded run grew by a third of a block per block (SmolLM2, 30 blocks: 646 -> 784 MiB; trimmed after each
    block, flat at 510 MiB)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = _glibc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except AttributeError:
            pass
