"""Fused classifier-free-guidance combine + flow-matching Euler update, forward and backward.

One elementwise pass replaces the reference's ``chunk`` / ``sub`` / ``mul`` / ``add`` of the
guidance combine and the ``float`` / ``mul`` / ``add`` / cast of :func:`nitro_ar.schedules.euler_step`:

    v     = v_u + cfg * (v_c - v_u)            (v holds [v_u; v_c]; without CFG v is used as is)
    x_new = (x.float() + (sigma_next - sigma) * v).to(v.dtype)

x is (N, ...) (the MLP head's (N, C) rows or the transformer head's (B, L, C) images) and v is
(2N, ...) = [uncond; cond] with guidance, or (N, ...) without. Arithmetic is fp32 with a single
rounding to v's dtype at the end (the eager composition rounds after every op in half
precision; in fp32 both agree to rounding). The kernels read sigma and sigma_next from device
memory and form ``dt = sigma_next - sigma`` in fp32, as ``euler_step`` does: no host scalar,
so a sampling loop with its schedule on the device needs no synchronisation and can be
captured in a CUDA/HIP graph.

Kernels: ``_flow_step_fwd_kernel`` and ``_flow_step_bwd_kernel`` (d x = g, d v_c = cfg dt g,
d v_u = dt g - d v_c, both halves of dv written by one program), one program per BLOCK
elements, with int32 offsets unless v spans 2^31 elements or more (``INDEX_64``). Launch configs
(CUDA and HIP lists, a default per arch: one :class:`~nitro_ar.kernels.launch.ConfigTable`) are
tuned as the ops ``flow_step`` and ``flow_step_backward`` (problems:
:mod:`nitro_ar.kernels.tuning_problems`). The eager reference is
:func:`nitro_ar.kernels.reference.flow_step`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import reference
from .backend import KERNEL_BACKENDS, select_backend
from .errors import KernelInputError
from .launch import ConfigTable, ConfigTables, needs_int64
from .offsets import widen
from .tuning import get_config

__all__ = [
    "flow_step",
    "flow_step_forward",
    "flow_step_backward",
    "launch_plan",
    "FlowStepFunction",
    "CONFIGS",
    "candidate_configs",
    "default_config",
    "tuning_bucket",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Scalar = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _step_size(sigma_ptr, sigma_next_ptr):
    """sigma_next - sigma in fp32, from two float32 scalars in memory."""
    return tl.load(sigma_next_ptr) - tl.load(sigma_ptr)


@triton.jit
def _flow_step_fwd_kernel(x_ptr, v_ptr, out_ptr, sigma_ptr, sigma_next_ptr, n_elements, cfg, GUIDED: tl.constexpr,
                          BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """Grid (cdiv(n_elements, BLOCK),). x and out hold n_elements contiguous values; v holds
    n_elements (unguided) or 2 * n_elements ([uncond; cond], guided); sigma / sigma_next point
    to float32 scalars."""
    dt = _step_size(sigma_ptr, sigma_next_ptr)
    offsets = widen(tl.program_id(0), INDEX_64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        v_uncond = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v_cond = tl.load(v_ptr + n_elements + offsets, mask=mask, other=0.0).to(tl.float32)
        v = v_uncond + cfg * (v_cond - v_uncond)
    else:
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (x + dt * v).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flow_step_bwd_kernel(grad_ptr, grad_x_ptr, grad_v_ptr, sigma_ptr, sigma_next_ptr, n_elements, cfg,
                          GUIDED: tl.constexpr, NEED_GRAD_X: tl.constexpr, NEED_GRAD_V: tl.constexpr,
                          BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """Grid (cdiv(n_elements, BLOCK),). grad and grad_x hold n_elements contiguous values,
    grad_v n_elements or 2 * n_elements ([uncond; cond])."""
    offsets = widen(tl.program_id(0), INDEX_64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if NEED_GRAD_X:
        tl.store(grad_x_ptr + offsets, grad.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if NEED_GRAD_V:
        grad_v = _step_size(sigma_ptr, sigma_next_ptr) * grad
        if GUIDED:
            grad_v_cond = cfg * grad_v
            tl.store(grad_v_ptr + offsets, (grad_v - grad_v_cond).to(grad_v_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_v_ptr + n_elements + offsets, grad_v_cond.to(grad_v_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(grad_v_ptr + offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configs per backend, and host launchers
# --------------------------------------------------------------------------------------------
# A memory-bound elementwise pass over a few thousand (MLP head: rows x 32) to a few hundred
# thousand (transformer head: images x 256 x 32) values: BLOCK trades programs against values
# per lane (BLOCK / (lane width x num_warps), kept at 2..16). No tl.dot and no shared memory, so
# the only HIP-specific key is the occupancy hint waves_per_eu (a tuning candidate; the default
# leaves it to the compiler); HIP lanes are 64 wide. Forward and backward share the table.
_BLOCKS = (256, 512, 1024, 2048, 4096)


def _fits(block: int, warps: int, lane_width: int) -> bool:
    return 2 <= block // (lane_width * warps) <= 16


# The interpreter ignores launch options; one large block means few interpreted programs.
INTERPRETER_CONFIG = dict(BLOCK=4096, num_warps=4, num_stages=1)
CONFIGS = ConfigTable(
    cuda=[dict(BLOCK=block, num_warps=warps, num_stages=1)
          for block in _BLOCKS for warps in (1, 2, 4, 8) if _fits(block, warps, 32)],
    hip=[dict(BLOCK=block, num_warps=warps, num_stages=1, waves_per_eu=waves)
         for block in _BLOCKS for warps in (1, 2, 4, 8) for waves in (0, 2) if _fits(block, warps, 64)],
    interpreter=dict(INTERPRETER_CONFIG),
    # Untuned starting points: 8 values per lane on both vendors.
    defaults=[("cuda", "", dict(BLOCK=1024, num_warps=4, num_stages=1)),
              ("hip", "", dict(BLOCK=2048, num_warps=4, num_stages=1))],
    host_keys=("BLOCK",),
)
OP_NAMES = ("flow_step", "flow_step_backward")


# Forward and backward share the table.
OPS = ConfigTables({name: CONFIGS for name in OP_NAMES})
candidate_configs, default_config = OPS.candidate_configs, OPS.default_config


def tuning_bucket(shape: dict) -> str:
    """Configs depend on the element count only (its power of two, capped)."""
    elements = shape["rows"] * shape["tokens"] * shape["channels"]
    return f"n{min(triton.next_power_of_2(elements), 1 << 22)}"


def _config(op_name: str, elements: int, device: torch.device) -> dict:
    return get_config(op_name, device, tuning_bucket(dict(rows=elements, tokens=1, channels=1)))


def launch_plan(elements: int, guided: bool, block: int) -> Tuple[Tuple[int], bool]:
    """(grid, INDEX_64) of a launch over ``elements`` values of x: v (or its gradient), with 2N
    rows when guided, is the largest tensor addressed. Sizes only, so it is testable without
    allocating."""
    return (triton.cdiv(elements, block),), needs_int64(elements * (2 if guided else 1))


def flow_step_forward(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cfg: float,
                      guided: bool, *, config: Optional[dict] = None) -> torch.Tensor:
    """Launch the forward kernel on checked, contiguous inputs.

    Args:
        x: (N, ...) current state, any supported float dtype.
        v: (2N, ...) [uncond; cond] when ``guided``, else (N, ...).
        sigma, sigma_next: 0-dim float32 tensors on v's device.
        cfg: guidance weight (ignored unless guided).
    Returns:
        x_new shaped like x, in v's dtype.
    """
    out = torch.empty(x.shape, device=v.device, dtype=v.dtype)
    elements = x.numel()
    if elements == 0:
        return out
    config = config or _config("flow_step", elements, v.device)
    grid, index_64 = launch_plan(elements, guided, config["BLOCK"])
    _flow_step_fwd_kernel[grid](x, v, out, sigma, sigma_next, elements, cfg, GUIDED=guided, BLOCK=config["BLOCK"],
                                INDEX_64=index_64, **CONFIGS.launch_options(config))
    return out


def flow_step_backward(grad: torch.Tensor, x_dtype: torch.dtype, v_dtype: torch.dtype, sigma: torch.Tensor,
                       sigma_next: torch.Tensor, cfg: float, guided: bool, *, needs: Tuple[bool, bool],
                       config: Optional[dict] = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel.

    Args:
        grad: (N, ...) upstream gradient of x_new.
        x_dtype, v_dtype: dtypes of the forward's x and v (the gradients get them).
        sigma, sigma_next, cfg, guided: as for :func:`flow_step_forward`.
        needs: whether x and v need a gradient.
    Returns:
        (grad_x (N, ...) or None, grad_v ((2N or N), ...) or None).
    """
    need_x, need_v = needs
    grad = grad.contiguous()
    rows = grad.shape[0] * (2 if guided else 1)
    grad_x = torch.empty(grad.shape, device=grad.device, dtype=x_dtype) if need_x else None
    grad_v = torch.empty((rows, *grad.shape[1:]), device=grad.device, dtype=v_dtype) if need_v else None
    elements = grad.numel()
    if elements == 0 or not (need_x or need_v):
        return grad_x, grad_v
    config = config or _config("flow_step_backward", elements, grad.device)
    grid, index_64 = launch_plan(elements, guided, config["BLOCK"])
    _flow_step_bwd_kernel[grid](
        grad, grad_x if need_x else grad, grad_v if need_v else grad, sigma, sigma_next, elements, cfg,
        GUIDED=guided, NEED_GRAD_X=need_x, NEED_GRAD_V=need_v, BLOCK=config["BLOCK"], INDEX_64=index_64,
        **CONFIGS.launch_options(config))
    return grad_x, grad_v


# --------------------------------------------------------------------------------------------
# Autograd Function
# --------------------------------------------------------------------------------------------
class FlowStepFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels: ``apply(x, v, sigma, sigma_next, cfg, guided)`` on
    contiguous, checked inputs (no gradient for the sigmas: the schedule is fixed). Use
    :func:`flow_step` rather than this."""

    @staticmethod
    def forward(ctx, x, v, sigma, sigma_next, cfg, guided):
        ctx.step = (x.dtype, v.dtype, cfg, guided)
        ctx.save_for_backward(sigma, sigma_next)
        return flow_step_forward(x, v, sigma, sigma_next, cfg, guided)

    @staticmethod
    def backward(ctx, grad):
        x_dtype, v_dtype, cfg, guided = ctx.step
        grad_x, grad_v = flow_step_backward(grad, x_dtype, v_dtype, *ctx.saved_tensors, cfg, guided,
                                            needs=tuple(ctx.needs_input_grad[:2]))
        return grad_x, grad_v, None, None, None, None


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _sigma(name: str, value: Scalar, device: torch.device) -> torch.Tensor:
    """A sigma as a 0-dim float32 tensor on ``device`` (no copy when it already is one)."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise KernelInputError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(())


def _check(x: torch.Tensor, v: torch.Tensor, cfg: float) -> bool:
    """Validate the arguments of :func:`flow_step`; return whether v holds [uncond; cond]."""
    for name, tensor in (("x", x), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise KernelInputError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise KernelInputError(f"{name} has dtype {tensor.dtype}; supported: float32, float16, bfloat16")
        if tensor.dim() < 1:
            raise KernelInputError(f"{name} must have a leading row dimension, got a 0-dim tensor")
    if x.device != v.device:
        raise KernelInputError(f"x is on {x.device} but v is on {v.device}")
    if v.shape[1:] != x.shape[1:]:
        raise KernelInputError(f"v {tuple(v.shape)} and x {tuple(x.shape)} differ beyond the row dimension")
    rows = x.shape[0]
    if v.shape[0] == 2 * rows:
        guided = True
    elif v.shape[0] == rows:
        guided = False
    else:
        raise KernelInputError(f"v has {v.shape[0]} rows; expected {rows} (no guidance) or {2 * rows} "
                               f"([uncond; cond]) for x {tuple(x.shape)}")
    if not math.isfinite(cfg):
        raise KernelInputError(f"cfg must be finite, got {cfg}")
    if not guided and cfg != 1.0:
        raise KernelInputError(f"cfg={cfg} needs v with [uncond; cond] rows ({2 * rows}), got {v.shape[0]}")
    return guided


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def flow_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    cfg: float = 1.0,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Guidance combine + Euler step: ``(x.float() + (sigma_next - sigma) * v).to(v.dtype)`` with
    ``v = v_u + cfg * (v_c - v_u)``, fused.

    Args:
        x: (N, ...) current state (e.g. (N, C) tokens or (B, L, C) images), float32 / float16 /
            bfloat16.
        v: velocity, (2N, ...) = [uncond; cond] with guidance or (N, ...) without, same trailing
            shape, device as x, any supported float dtype. Strided inputs are copied first.
        sigma, sigma_next: the step's sigmas: 0-dim float32 tensors (views of a schedule's
            ``sigmas`` on v's device are read in place, so the call needs no host sync), or
            Python floats / tensors elsewhere (copied to v's device).
        cfg: guidance weight; must be 1 when v has N rows.
        backend: ``"triton"`` / ``"interpret"`` run the kernel, ``"torch"`` / ``"reference"``
            the eager composition; default :func:`nitro_ar.kernels.backend.select_backend`.
    Returns:
        x_new shaped like x, in v's dtype; differentiable with respect to x and v.
    Raises:
        KernelInputError (a ValueError): mismatched shapes, devices, unsupported dtypes, a row count of v that is
        neither N nor 2N, or cfg != 1 without [uncond; cond] rows.
    """
    cfg = float(cfg)
    guided = _check(x, v, cfg)
    sigma, sigma_next = _sigma("sigma", sigma, v.device), _sigma("sigma_next", sigma_next, v.device)
    if select_backend(v.device, backend) not in KERNEL_BACKENDS:
        return reference.flow_step(x, v, sigma, sigma_next, cfg)
    x, v = x.contiguous(), v.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or v.requires_grad):
        return FlowStepFunction.apply(x, v, sigma, sigma_next, cfg, guided)
    return flow_step_forward(x, v, sigma, sigma_next, cfg, guided)
