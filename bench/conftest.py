"""Benchmark fixtures. Shared helpers live in ``benchutil`` (ON_GPU, bench_device, synchronized)."""
import pytest
import torch

from benchutil import ON_GPU, bench_device, synchronized  # noqa: F401  (re-exported)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()
