"""Helpers shared by the benchmark modules (imported as ``benchutil``; bench/ is on sys.path)."""
import torch

ON_GPU = torch.cuda.is_available()


def bench_device() -> torch.device:
    """The GPU when one is present (CUDA or ROCm), else the CPU."""
    return torch.device("cuda") if ON_GPU else torch.device("cpu")


def synchronized(fn, device: torch.device):
    """Wrap ``fn`` so each call waits for the device: pytest-benchmark then times real work."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run
