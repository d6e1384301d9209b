"""Devices and dtypes: parse what the user asked for, list what exists, read live telemetry."""

from __future__ import annotations

import dataclasses

import psutil
import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> torch.device, with a clear error for one that does not exist."""
    name = (name or "cpu").strip().lower()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}: use 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UserError(f"Unsupported device {name!r}: use 'cpu', 'cuda' or 'cuda:N'.")
    if not torch.cuda.is_available():
        raise UserError(f"Device {name!r} asked for, but no CUDA GPU is visible to torch on this machine; use --device cpu.")
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"Device {name!r} does not exist: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}.")
    return torch.device("cuda", index)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'fp32'/'bf16'/'fp16'; None picks fp32 on CPU and bf16 on CUDA."""
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise UserError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPES)}.") from None


def settle_cpu_kernels() -> None:
    """Run the rotary position embedding's cos and sin once, on one element, before a model's first forward. On this
    project's CPU (torch 2.13) a process's first cos over a tensor that both threads share sometimes gave one
    thread's half results up to 1.5e-4 off (3 to 4 runs in 8 after other work, as a benchmark's warm-up),
    so the first calibration batch's position embeddings, which every block's pass replays, differed between runs of
    the same settings, and N:M masks with them (P1, Wanda 2:4: 154.908 or 155.992). With this call first, 8 runs of
    8 agreed, against 3 distinct results in 8 without it (benchmarks/determinism.py)."""
    one = torch.ones(1)
    one.cos(), one.sin()


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls run faster than fp32 ones on the device: a CUDA GPU with bf16, or a CPU with AMX (6x fp32's rate
    on this project's AMX machines). AVX512-BF16 alone is not enough: on a Xeon with it and no AMX, torch's bf16
    products ran at 0.55x fp32's (151 against 255-269 GFLOP/s at a block's shapes) and an Adam step of block
    reconstruction took 1.3x as long in bf16 (benchmarks/README.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and torch.cpu._is_amx_tile_supported()


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


@dataclasses.dataclass
class DeviceInfo:
    id: str
    label: str
    total_bytes: int
    free_bytes: int


def list_devices() -> list[DeviceInfo]:
    """The CPU and every CUDA GPU, with free memory now."""
    vm = psutil.virtual_memory()
    devices = [DeviceInfo("cpu", f"CPU ({psutil.cpu_count()} cores)", vm.total, vm.available)]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append(DeviceInfo(f"cuda:{i}", f"cuda:{i} {torch.cuda.get_device_name(i)}", total, free))
    return devices


@dataclasses.dataclass
class GpuReading:
    index: int
    name: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int


@dataclasses.dataclass
class Telemetry:
    cpu_percent: float
    ram_used_bytes: int
    ram_total_bytes: int
    process_rss_bytes: int
    gpus: list[GpuReading]


def _gpu_readings() -> list[GpuReading]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    readings = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        readings.append(GpuReading(i, name if isinstance(name, str) else name.decode(), float(util.gpu), mem.used, mem.total))
    return readings


def read_telemetry() -> Telemetry:
    """CPU %, RAM and per-GPU utilisation/memory (via NVML when present) at this moment."""
    vm = psutil.virtual_memory()
    return Telemetry(
        cpu_percent=psutil.cpu_percent(interval=None),
        ram_used_bytes=vm.total - vm.available,
        ram_total_bytes=vm.total,
        process_rss_bytes=psutil.Process().memory_info().rss,
        gpus=_gpu_readings(),
    )
