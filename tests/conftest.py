"""Test-suite set-up: Triton's CPU interpreter, determinism, and shared helpers."""
import os

# Must be set before Triton is imported anywhere: kernels then run in the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Kernels under the interpreter are slow; keep hypothesis runs small and deadline-free.
settings.register_profile("nitro", max_examples=12, deadline=None, derandomize=True)
settings.load_profile("nitro")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def nan_filled_empty(*shape, dtype=torch.float32, device="cpu"):
    """``torch.empty`` filled with NaN, to catch reads of memory a kernel never wrote."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
