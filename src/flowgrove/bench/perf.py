"""Measuring a call on a CPU or a GPU: counted FLOPs, timings, peak memory and the device's peak (``bench-model``).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` at the shapes of the call (matmuls, convolutions and
attention; elementwise work is not counted), never from parameter-count estimates.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from typing import Callable, NamedTuple

import torch
from torch.utils import flop_counter

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the first name contained in
# torch.cuda.get_device_name() wins, so longer names come before their prefixes (H100 PCIe before H100).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("H20", 148.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
)


class Measured(NamedTuple):
    """One measured call: its counted FLOPs, the timed seconds and the peak memory (GiB) meanwhile."""

    flops: int
    seconds: list[float]
    peak_memory_gib: float


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels (flash, efficient, cuDNN) but not the CPU flash kernel.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as executed (matmuls, convolutions, attention), by ``FlopCounterMode``."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of ``iters`` calls after ``warmup`` calls: CUDA events on a GPU, ``time.perf_counter`` on a CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        seconds = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return seconds
    torch.cuda.synchronize(device)
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated`` since the last reset; CPU: the process's peak RSS since it started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def memory_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak memory = torch.cuda.max_memory_allocated per case (GiB; resident weights included)"
    return "peak memory = the process's peak RSS since it started (GiB; resource.getrusage, not per case)"


def measure(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> Measured:
    """Count the FLOPs of one call (it also warms up), then time ``iters`` calls after ``warmup`` more."""
    reset_peak_memory(device)
    flops = count_flops(fn)
    seconds = time_calls(fn, device, warmup, iters)
    return Measured(flops, seconds, peak_memory_gib(device))


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Hand cached CUDA blocks back; ``collect`` also runs the garbage collector (after an OOM or a mode: its
    traceback and the optimizer hold tensors in cycles). gc takes ~0.5 s with diffusers loaded, so not per row."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def device_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from): ``--peak-tflops``, the table by device name, or none."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"--peak-tflops must be > 0, got {override}")
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a on a CPU: pass --peak-tflops to get TFLOP/s and MFU"
    name = torch.cuda.get_device_name(device)
    match = peak_for_name(name)
    if match is None:
        return None, f"{name!r} is not in the peak table: pass --peak-tflops"
    return match[1], f"table: {match[0]} dense bf16"


def peak_for_name(name: str) -> tuple[str, float] | None:
    """(table key, dense bf16 TFLOP/s) of the first ``PEAK_BF16_TFLOPS`` key contained in a device name."""
    return next(((key, tflops) for key, tflops in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def device_info(device: torch.device) -> dict:
    """The device named as ``flowgrove bench`` does: absolute times only with the device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda}
    return {"type": device.type, "name": f"{device.type}, {torch.get_num_threads()} threads"}
