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


def count_work(fn: Callable, device_type: str) -> Tuple[int, int]:
    """(kernels, host syncs) of one call of ``fn``, counted without timing.

    Kernels: aten ops that compute with an output on ``device_type`` (views, allocations and
    host work such as a CPU generator's draws excluded; each would be one GPU kernel) plus
    Triton launches. Run on the ``meta`` device nothing computes, so full-size models count in
    seconds on CPU: Triton launches are counted and not run, the kernel modules see meta
    tensors as the device the backend asked for. Host syncs: ops the host must wait on
    (:class:`nitro_ar.fast.graphs.HostSyncs`) reading a tensor on ``device_type``.
    """
    import importlib
    from contextlib import ExitStack
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from nitro_ar.fast.graphs import HostSyncs

    allocations = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                   torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
                   torch.ops.aten.new_empty_strided.default, torch.ops.aten.lift_fresh.default,
                   torch.ops.aten._unsafe_view.default}
    kernels = [0]

    class Kernels(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and func not in allocations and any(
                    isinstance(t, torch.Tensor) and t.device.type == device_type for t in tree_flatten(out)[0]):
                kernels[0] += 1
            return out

    def launch(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            kernels[0] += 1

    syncs = HostSyncs(device=device_type)
    with ExitStack() as stack:
        if device_type == "meta":
            try:
                from triton.runtime.interpreter import InterpretedFunction
                from triton.runtime.jit import JITFunction
            except ImportError:  # no Triton: the torch backend runs
                pass
            else:
                stack.enter_context(mock.patch.object(JITFunction, "run", launch))
                stack.enter_context(mock.patch.object(InterpretedFunction, "run", launch))
            for name in ("flow_step", "joint_attention", "modulated_norm"):
                module = importlib.import_module(f"nitro_ar.kernels.{name}")
                select = module.select_backend
                stack.enter_context(mock.patch.object(module, "select_backend", lambda device, requested=None, _s=select: (
                    requested if torch.device(device).type == "meta" and requested else _s(device, requested))))
        stack.enter_context(syncs)
        stack.enter_context(Kernels())
        fn()
    return kernels[0], syncs.syncs
