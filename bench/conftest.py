"""Shared benchmark fixtures: the device under test and a synchronising timer wrapper."""
import pytest
import torch


def bench_device() -> torch.device:
    """The GPU when one is present (CUDA or ROCm), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


def synchronized(fn, device: torch.device):
    """Wrap ``fn`` so each call waits for the device: pytest-benchmark then times real work."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run
