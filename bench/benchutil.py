"""Helpers shared by the benchmark modules (imported as ``benchutil``; bench/ is on sys.path)."""
import os
import subprocess
from typing import Callable, Optional, Tuple

import torch

ON_GPU = torch.cuda.is_available()

# Dense bf16 tensor-core peak (TFLOP/s) and memory bandwidth (GB/s) per device, from the
# vendors' data sheets; matched by a substring of the device name.
PEAKS = {
    "MI325X": (1307.0, 6000.0),
    "MI300X": (1307.0, 5300.0),
    "MI250X": (383.0, 3277.0),
    "H200": (989.0, 4800.0),
    "H100": (989.0, 3350.0),
    "A100": (312.0, 2039.0),
    "L40S": (362.0, 864.0),
}


def bench_device() -> torch.device:
    """The GPU when one is present (CUDA or ROCm), else the CPU."""
    return torch.device("cuda") if ON_GPU else torch.device("cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_peaks(device: torch.device) -> Optional[Tuple[float, float]]:
    """(TFLOP/s, GB/s) peaks of the device, or None when unknown (CPU, unlisted GPUs)."""
    name = device_name(device)
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return None


def synchronized(fn: Callable, device: torch.device) -> Callable:
    """Wrap ``fn`` so each call waits for the device: pytest-benchmark then times real work."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def measure(benchmark, run: Callable, cpu_rounds: int = 5) -> None:
    """GPU: let pytest-benchmark calibrate (kernels take microseconds); CPU: a few quick rounds."""
    if ON_GPU:
        benchmark(run)
    else:
        benchmark.pedantic(run, rounds=cpu_rounds, warmup_rounds=1)


def mean_seconds(benchmark) -> Optional[float]:
    """Mean time of a finished benchmark, or None when timing is off (``--benchmark-disable``)."""
    return benchmark.stats.stats.mean if benchmark.stats is not None else None


def record_rate(benchmark, device: torch.device, *, flops: Optional[int] = None, bytes_moved: Optional[int] = None) -> None:
    """Record the work of one call and, once timed, TFLOP/s or GB/s and the fraction of the
    device's peak (what the op is bound by: FLOPs for matmul-heavy work, bytes for norms)."""
    info = benchmark.extra_info
    info["device"] = device_name(device)
    seconds, peaks = mean_seconds(benchmark), device_peaks(device)
    if flops is not None:
        info["flops"] = flops
        if seconds:
            info["tflops"] = round(flops / seconds / 1e12, 3)
            info["fraction_of_peak"] = round(info["tflops"] / peaks[0], 4) if peaks else None
    if bytes_moved is not None:
        info["bytes"] = bytes_moved
        if seconds:
            info["gb_per_s"] = round(bytes_moved / seconds / 1e9, 1)
            info["fraction_of_peak_bandwidth"] = round(info["gb_per_s"] / peaks[1], 3) if peaks else None


def count_flops(fn: Callable) -> int:
    """FLOPs of one call of ``fn``, counted by torch's FlopCounterMode (matmuls, convs, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
