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


@pytest.fixture
def nan_empty(monkeypatch):
    """Every torch.empty / torch.empty_like in the kernel launchers returns NaN-filled memory."""

    def empty(*size, dtype=None, device=None, **_):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return nan_filled_empty(*shape, dtype=dtype or torch.get_default_dtype(), device=device or "cpu")

    def empty_like(tensor, *, dtype=None, device=None, **_):
        return nan_filled_empty(*tensor.shape, dtype=dtype or tensor.dtype, device=device or tensor.device)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
