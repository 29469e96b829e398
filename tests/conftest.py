"""Test-suite set-up: Triton's CPU interpreter, determinism, the device kernels are tested on,
and shared fixtures.

Test modules import the device constants: ``from conftest import DEVICE, KERNEL_BACKEND``.
"""
import os

# Must be set before Triton is imported anywhere: kernels then run in the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from nitro_ar.kernels.backend import interpreter_requested  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# With a GPU and compiled Triton (TRITON_INTERPRET=0) the kernel tests run on the GPU; else on
# CPU in the Triton interpreter.
GPU_KERNELS = torch.cuda.is_available() and not interpreter_requested()
DEVICE = torch.device("cuda") if GPU_KERNELS else torch.device("cpu")
KERNEL_BACKEND = "triton" if GPU_KERNELS else "interpret"
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


@pytest.fixture(scope="session")
def static_reports(tmp_path_factory):
    """{target: report} of tests/compile_kernels.py for sm_90 and gfx942: every kernel compiled
    through its launcher at the full-size models' shapes, with its static budget. One process
    per target (in parallel), once per session."""
    from compile_kernels import run_targets

    return run_targets(tmp_path_factory.mktemp("static"))
