"""Backend detection shared by every kernel: which implementation runs for a given tensor.

Backends (``NITRO_AR_BACKEND`` overrides the automatic choice):

- ``triton``: compiled Triton kernels, on CUDA and ROCm (HIP) GPUs.
- ``interpret``: the same Triton kernels run by Triton's CPU interpreter (``TRITON_INTERPRET=1``,
  set before Triton is imported; used by the test-suite).
- ``torch``: plain PyTorch with every saving that needs no custom kernel (CPU default).
- ``reference``: the eager reference modules, untouched.

Every op decides here, once per call, whether its kernel runs: :func:`select_backend` (the
backend for a device) and :func:`kernel_runs` (the kernel for these tensors, or a warned
fallback to the eager reference of :mod:`nitro_ar.kernels.reference`).

Nothing here imports Triton at module import time, so ``import nitro_ar`` works without it.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import KernelInputError

logger = logging.getLogger("nitro_ar")

BACKENDS = ("triton", "interpret", "torch", "reference")
# The backends on which the Triton kernels run (compiled, or in the CPU interpreter).
KERNEL_BACKENDS = ("triton", "interpret")
# Dtypes every kernel takes; others (float64, ...) run the eager reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENV_BACKEND = "NITRO_AR_BACKEND"
# Which GEMMs the kernel backends use where a fused Triton GEMM exists: "fused" (the kernels of
# nitro_ar.kernels.fused_linear) or "library" (the vendor's GEMM with unfused neighbours);
# unset: the tuned choice per shape bucket (fused until tuned).
ENV_GEMM = "NITRO_AR_GEMM"
GEMM_PATHS = ("fused", "library")

# Config keys that only AMD's Triton backend understands; passing them on CUDA raises.
HIP_ONLY_KEYS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
HIP_MAX_WARPS = 16
HIP_LDS_BYTES = 64 * 1024


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def interpreter_requested() -> bool:
    """True when Triton's CPU interpreter was asked for through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_hip() -> bool:
    """True on a ROCm build of PyTorch (AMD GPUs appear as ``cuda`` devices there)."""
    return getattr(torch.version, "hip", None) is not None


def gpu_vendor(device: torch.device) -> str:
    """``"hip"`` for an AMD GPU, ``"cuda"`` for an NVIDIA GPU, ``"cpu"`` otherwise."""
    if device.type != "cuda":
        return "cpu"
    return "hip" if is_hip() else "cuda"


@dataclass(frozen=True)
class DeviceInfo:
    """What a kernel needs to know about a device: vendor, marketing name and architecture."""

    vendor: str  # "cuda" | "hip" | "cpu"
    name: str  # e.g. "NVIDIA H100 80GB HBM3", "AMD Instinct MI300X"
    arch: str  # e.g. "sm_90", "gfx942", "cpu"

    @property
    def key(self) -> str:
        """A file-name-safe identifier of the device, used to key tuned configs."""
        return "".join(ch if ch.isalnum() else "_" for ch in self.name).strip("_")


@functools.lru_cache(maxsize=None)
def _device_info(device_type: str, index: int) -> DeviceInfo:
    if device_type != "cuda":
        return DeviceInfo("cpu", "cpu", "cpu")
    props = torch.cuda.get_device_properties(index)
    if is_hip():
        arch = getattr(props, "gcnArchName", "gfx").split(":")[0]
        return DeviceInfo("hip", props.name, arch)
    return DeviceInfo("cuda", props.name, f"sm_{props.major}{props.minor}")


def device_info(device: Optional[torch.device] = None) -> DeviceInfo:
    """Vendor, name and architecture of ``device`` (default: the current CUDA/HIP device or CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return _device_info(device.type, index)


_announced: set = set()


def _announce(message: str) -> None:
    if message not in _announced:
        _announced.add(message)
        logger.info(message)


def _environment_choice(variable: str, accepted: Sequence[str]) -> Optional[str]:
    """The value of ``variable`` (lower-cased), one of ``accepted``, or None when unset."""
    value = os.environ.get(variable, "").strip().lower()
    if not value:
        return None
    if value not in accepted:
        raise KernelInputError(f"{variable}={value!r} is not accepted: expected one of {', '.join(accepted)}")
    return value


def requested_backend() -> Optional[str]:
    """The backend named by ``NITRO_AR_BACKEND``, validated, or None when unset."""
    return _environment_choice(ENV_BACKEND, BACKENDS)


def requested_gemm_path() -> Optional[str]:
    """The GEMM path named by ``NITRO_AR_GEMM`` ("fused" | "library"), validated, or None when unset."""
    return _environment_choice(ENV_GEMM, GEMM_PATHS)


def select_backend(device: torch.device, requested: Optional[str] = None) -> str:
    """Choose the implementation for tensors on ``device``.

    Order: the explicit ``requested`` argument, then ``NITRO_AR_BACKEND``, then automatic:
    Triton on CUDA/ROCm GPUs, the interpreter on CPU when ``TRITON_INTERPRET=1``, else torch.
    A Triton backend that cannot run here (no Triton, or a GPU-only choice on CPU tensors)
    falls back to ``torch`` with one log line.
    """
    device = torch.device(device)
    choice = requested or requested_backend()
    if choice is None:
        if device.type == "cuda":
            choice = "triton"
        elif interpreter_requested():
            choice = "interpret"
        else:
            choice = "torch"
    if choice not in BACKENDS:
        raise KernelInputError(f"backend={choice!r} is not accepted: expected one of {', '.join(BACKENDS)}")
    if choice in ("triton", "interpret"):
        if not triton_available():
            _announce("nitro_ar: Triton is not installed; using the torch backend")
            return "torch"
        if choice == "triton" and device.type != "cuda":
            if interpreter_requested():
                choice = "interpret"
            else:
                _announce(f"nitro_ar: Triton kernels need a GPU (tensors on {device.type}); using the torch backend")
                return "torch"
        if choice == "interpret" and not interpreter_requested():
            _announce("nitro_ar: the Triton interpreter must be enabled with TRITON_INTERPRET=1 before Triton "
                      "is imported; using the torch backend")
            return "torch"
        if choice == "interpret" and device.type != "cpu":
            raise KernelInputError(f"backend='interpret' is not accepted for tensors on {device.type}: "
                                   "the Triton interpreter runs on CPU tensors only")
    _announce(f"nitro_ar: backend {choice} on {device.type}")
    return choice


_fallbacks_warned: set = set()


def fallback_warning(op: str, reason: str) -> None:
    """Warn once per (op, reason) that an op runs its eager reference instead of its kernel."""
    if (op, reason) not in _fallbacks_warned:
        _fallbacks_warned.add((op, reason))
        warnings.warn(f"nitro_ar: {op} falls back to torch ({reason})", RuntimeWarning, stacklevel=3)


def kernel_runs(op: str, backend: str, tensors: Sequence[Optional[torch.Tensor]],
                unsupported: Optional[str] = None) -> bool:
    """Whether ``op`` runs its kernel on ``backend`` (a name :func:`select_backend` returned)
    for ``tensors`` (None entries ignored): a kernel backend, kernel dtypes, and no
    ``unsupported`` reason (e.g. a head_dim the kernel was not built for). A kernel backend
    that cannot take these tensors warns once per op and reason (:func:`fallback_warning`).
    """
    if backend not in KERNEL_BACKENDS:
        return False
    for tensor in tensors:
        if tensor is not None and tensor.dtype not in KERNEL_DTYPES:
            fallback_warning(op, f"dtype {tensor.dtype}")
            return False
    if unsupported is not None:
        fallback_warning(op, unsupported)
        return False
    return True


def validate_config(config: dict, vendor: str) -> None:
    """Check one kernel launch config against a vendor's limits; raise ValueError if invalid.

    ``config`` maps meta-parameters and launch options (``num_warps``, ``num_stages`` and, for
    HIP only, ``waves_per_eu`` / ``matrix_instr_nonkdim`` / ``kpack``) to values.
    """
    if vendor == "cuda":
        bad = [k for k in HIP_ONLY_KEYS if k in config]
        if bad:
            raise ValueError(f"CUDA config carries HIP-only keys {bad}: {config}")
    elif vendor == "hip":
        if config.get("num_warps", 4) > HIP_MAX_WARPS:
            raise ValueError(f"HIP config has num_warps {config['num_warps']} > {HIP_MAX_WARPS}: {config}")
    else:
        raise ValueError(f"unknown vendor {vendor!r}")
    warps = config.get("num_warps", 4)
    if warps < 1 or warps & (warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {warps}")
