"""Fused gated residual + LayerNorm/RMSNorm + scale-and-shift modulation, forward and backward.

One pass over each row computes, for x of shape (B, L, D) (or (N, D), treated as B = 1):

    x_new = x + gate * residual        (optional; gate optional)
    out   = norm(x_new) * (1 + scale) + shift      (modulation optional)

- ``norm``: LayerNorm (weight and bias optional, any eps) or RMSNorm (weight optional);
  statistics always in fp32.
- ``shift`` / ``scale`` / ``gate``: absent, per batch (B, D), per token (B, L, D), or chunks of
  Nitro-E's AdaLN-affine modulation ``bias[K, D] + temb.view(B, K, D) * (1 + scale[K, D])``,
  computed in the kernel so no modulation tensor is ever written to memory.
- Inputs may be strided views (chunks of one projection, ``unbind`` of a (B, N, 6, W) view):
  the kernels read through their batch and token strides; only the last dim must be unit-stride.

Kernels: ``_modulated_norm_fwd_kernel`` (one program per row tile, stores x_new, out and the
per-row mean / rstd), ``_modulated_norm_bwd_kernel`` (a grid of (programs, B), each walking a
contiguous range of rows of one batch; per-token gradients are stored directly, gradients that
sum over rows (per-batch modulation, AdaLN, norm weight/bias) as per-program fp32 partial sums),
then ``_sum_partials_kernel`` and ``_adaln_backward_kernel`` reduce those partials. No atomics.

Offsets are int32 unless the launch plan (:func:`_prepare`, from sizes and strides alone) finds
a tensor spanning 2^31 elements or more: then ``INDEX_64`` widens every row and batch index
before it meets a stride (:func:`nitro_ar.kernels.offsets.widen`).

Launch configs (CUDA and HIP lists, a default per arch) are :class:`~nitro_ar.kernels.launch.ConfigTable`
objects, tuned as the ops ``modulated_norm`` and ``modulated_norm_backward`` (problems and
benchmarks: :mod:`nitro_ar.kernels.tuning_problems`). The eager reference is
:func:`nitro_ar.kernels.reference.modulated_norm`.

File order: kernels, launch configs and launchers, autograd Function, validation, public function.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from .backend import KERNEL_BACKENDS, select_backend
from .errors import KernelInputError
from .launch import ConfigTable, ConfigTables, needs_int64, storage_span
from .offsets import widen
from .reference import AdaLNAffine
from .tuning import get_config

__all__ = [
    "AdaLNAffine",
    "Source",
    "modulated_norm",
    "modulated_norm_forward",
    "modulated_norm_backward",
    "ModulatedNormFunction",
    "FORWARD_CONFIGS",
    "BACKWARD_CONFIGS",
    "candidate_configs",
    "default_config",
    "tuning_bucket",
]

NORMS = ("layer", "rms")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A row lives in registers in one piece; wider rows would spill.
MAX_DIM = 16384


class Source(enum.IntEnum):
    """Where a modulation (shift and scale together) or the gate comes from."""

    NONE = 0
    PER_BATCH = 1  # (B, D): one row per batch element, broadcast over its tokens
    PER_TOKEN = 2  # (B, L, D): one row per token
    ADALN = 3  # a chunk of bias[K, D] + temb.view(B, K, D) * (1 + scale[K, D])


# The same codes as compile-time constants: Triton kernels read only constexpr globals.
_NONE: tl.constexpr = tl.constexpr(int(Source.NONE))
_PER_BATCH: tl.constexpr = tl.constexpr(int(Source.PER_BATCH))
_PER_TOKEN: tl.constexpr = tl.constexpr(int(Source.PER_TOKEN))
_ADALN: tl.constexpr = tl.constexpr(int(Source.ADALN))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(batch, stride_b, stride_l, rows, cols):
    """Element offsets (BLOCK_ROWS, BLOCK_D) of a tile of a (B, L, D) view with unit stride over
    D, in the width of ``batch`` and ``rows`` (widened by the launch plan's INDEX_64)."""
    return batch * stride_b + rows[:, None] * stride_l + cols[None, :]


@triton.jit
def _load_tile(ptr, batch, stride_b, stride_l, rows, cols, mask):
    """A (BLOCK_ROWS, BLOCK_D) fp32 tile of a (B, L, D) view with unit stride over D."""
    return tl.load(ptr + _tile_offsets(batch, stride_b, stride_l, rows, cols), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _batch_row(ptr, stride_b, batch, temb_ptr, temb_stride_b, ada_bias_ptr, ada_scale_ptr, chunk, D, cols,
               col_mask, SOURCE: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (BLOCK_D,) fp32 row shared by all tokens of ``batch``: loaded from a (B, D) tensor
    (PER_BATCH) or computed from AdaLN-affine chunk ``chunk`` (ADALN); zeros for other sources."""
    if SOURCE == _PER_BATCH:
        row = tl.load(ptr + batch * stride_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    elif SOURCE == _ADALN:
        offsets = chunk * D + cols
        temb = tl.load(temb_ptr + batch * temb_stride_b + offsets, mask=col_mask, other=0.0).to(tl.float32)
        ada_bias = tl.load(ada_bias_ptr + offsets, mask=col_mask, other=0.0).to(tl.float32)
        ada_scale = tl.load(ada_scale_ptr + offsets, mask=col_mask, other=0.0).to(tl.float32)
        row = ada_bias + temb * (1.0 + ada_scale)
    else:
        row = tl.zeros([BLOCK_D], dtype=tl.float32)
    return row


@triton.jit
def _modulation_tile(ptr, batch, stride_b, stride_l, rows, cols, mask, batch_row, SOURCE: tl.constexpr):
    """A modulation for a row tile: its own (BLOCK_ROWS, BLOCK_D) tile for PER_TOKEN, else the
    batch row as (1, BLOCK_D), which broadcasts over the tile."""
    if SOURCE == _PER_TOKEN:
        tile = _load_tile(ptr, batch, stride_b, stride_l, rows, cols, mask)
    else:
        tile = batch_row[None, :]
    return tile


@triton.jit
def _sum_rows(base_ptr, n_rows, D, cols, col_mask, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
              INDEX_64: tl.constexpr):
    """Column sums (BLOCK_D,) of an (n_rows, D) contiguous fp32 block, accumulated in fp32."""
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_P):
        rows = widen(start, INDEX_64) + tl.arange(0, BLOCK_P)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        acc += tl.load(base_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _modulated_norm_fwd_kernel(
    x_ptr, x_stride_b, x_stride_l,
    res_ptr, res_stride_b, res_stride_l,
    gate_ptr, gate_stride_b, gate_stride_l,
    shift_ptr, shift_stride_b, shift_stride_l,
    scale_ptr, scale_stride_b, scale_stride_l,
    weight_ptr, bias_ptr,
    temb_ptr, temb_stride_b, ada_bias_ptr, ada_scale_ptr,
    shift_chunk, scale_chunk, gate_chunk,
    x_new_ptr, out_ptr, mean_ptr, rstd_ptr,
    L, D, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    GATE: tl.constexpr, MODULATION: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_ROWS), B): one tile of BLOCK_ROWS tokens of one batch element.

    x_new / out are contiguous (B, L, D); mean / rstd are (B * L,) fp32 (mean: LayerNorm only).
    """
    batch = widen(tl.program_id(1), INDEX_64)
    rows = widen(tl.program_id(0) * BLOCK_ROWS, INDEX_64) + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < L
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    out_offsets = (batch * L + rows[:, None]) * D + cols[None, :]

    z = _load_tile(x_ptr, batch, x_stride_b, x_stride_l, rows, cols, mask)
    if HAS_RESIDUAL:
        branch = _load_tile(res_ptr, batch, res_stride_b, res_stride_l, rows, cols, mask)
        if GATE != _NONE:
            gate_row = _batch_row(gate_ptr, gate_stride_b, batch, temb_ptr, temb_stride_b, ada_bias_ptr,
                                  ada_scale_ptr, gate_chunk, D, cols, col_mask, GATE, BLOCK_D)
            branch = branch * _modulation_tile(gate_ptr, batch, gate_stride_b, gate_stride_l, rows, cols, mask,
                                               gate_row, GATE)
        # Round to the stored dtype first: the statistics then describe exactly the x_new returned
        # (as in eager), and the backward recomputes x_hat from that same stored tensor.
        z = (z + branch).to(x_new_ptr.dtype.element_ty)
        tl.store(x_new_ptr + out_offsets, z, mask=mask)
        z = z.to(tl.float32)

    if IS_RMS:
        rstd = tl.rsqrt(tl.sum(z * z, axis=1) / D + eps)
        x_hat = z * rstd[:, None]
    else:
        mean = tl.sum(z, axis=1) / D
        centered = tl.where(mask, z - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / D + eps)
        x_hat = centered * rstd[:, None]
    out = x_hat
    if HAS_WEIGHT:
        out = out * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if MODULATION != _NONE:
        shift_row = _batch_row(shift_ptr, shift_stride_b, batch, temb_ptr, temb_stride_b, ada_bias_ptr,
                               ada_scale_ptr, shift_chunk, D, cols, col_mask, MODULATION, BLOCK_D)
        scale_row = _batch_row(scale_ptr, scale_stride_b, batch, temb_ptr, temb_stride_b, ada_bias_ptr,
                               ada_scale_ptr, scale_chunk, D, cols, col_mask, MODULATION, BLOCK_D)
        shift = _modulation_tile(shift_ptr, batch, shift_stride_b, shift_stride_l, rows, cols, mask, shift_row,
                                 MODULATION)
        scale = _modulation_tile(scale_ptr, batch, scale_stride_b, scale_stride_l, rows, cols, mask, scale_row,
                                 MODULATION)
        out = out * (1.0 + scale) + shift
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)

    if STORE_STATS:
        stat_offsets = batch * L + rows
        tl.store(rstd_ptr + stat_offsets, rstd, mask=row_mask)
        if not IS_RMS:
            tl.store(mean_ptr + stat_offsets, mean, mask=row_mask)


@triton.jit
def _modulated_norm_bwd_kernel(
    z_ptr, z_stride_b, z_stride_l, mean_ptr, rstd_ptr,
    grad_out_ptr, grad_x_new_ptr,
    res_ptr, res_stride_b, res_stride_l,
    gate_ptr, gate_stride_b, gate_stride_l,
    scale_ptr, scale_stride_b, scale_stride_l,
    weight_ptr, bias_ptr,
    temb_ptr, temb_stride_b, ada_bias_ptr, ada_scale_ptr,
    scale_chunk, gate_chunk,
    grad_x_ptr, grad_res_ptr, grad_gate_ptr, grad_shift_ptr, grad_scale_ptr, grad_weight_ptr, grad_bias_ptr,
    L, D, rows_per_program,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    GATE: tl.constexpr, MODULATION: tl.constexpr, HAS_GRAD_X_NEW: tl.constexpr,
    STORE_GRAD_X: tl.constexpr, STORE_GRAD_RES: tl.constexpr, NEED_GRAD_GATE: tl.constexpr,
    NEED_GRAD_SHIFT: tl.constexpr, NEED_GRAD_SCALE: tl.constexpr, NEED_GRAD_WEIGHT: tl.constexpr,
    NEED_GRAD_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Grid (P, B): program p of batch b handles tokens [p * rows_per_program, ...) of b.

    z is the normalised input (x_new, or x without residual). grad_out / grad_x_new and the
    gradients of x, residual and per-token gate/shift/scale are contiguous (B, L, D). For
    gradients summed over rows (per-batch or AdaLN gate/shift/scale, norm weight/bias) the
    pointer is a (B, P, D) fp32 buffer of per-program partial sums.
    """
    program = tl.program_id(0)
    batch = widen(tl.program_id(1), INDEX_64)
    partial_offsets = (batch * tl.num_programs(0) + program) * D
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    row_begin = program * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, L)

    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    scale_row = _batch_row(scale_ptr, scale_stride_b, batch, temb_ptr, temb_stride_b, ada_bias_ptr, ada_scale_ptr,
                           scale_chunk, D, cols, col_mask, MODULATION, BLOCK_D)
    gate_row = _batch_row(gate_ptr, gate_stride_b, batch, temb_ptr, temb_stride_b, ada_bias_ptr, ada_scale_ptr,
                          gate_chunk, D, cols, col_mask, GATE, BLOCK_D)
    acc_weight = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)

    for row_start in range(row_begin, row_end, BLOCK_ROWS):
        rows = widen(row_start, INDEX_64) + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        grad_offsets = (batch * L + rows[:, None]) * D + cols[None, :]

        z = _load_tile(z_ptr, batch, z_stride_b, z_stride_l, rows, cols, mask)
        rstd = tl.load(rstd_ptr + batch * L + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            x_hat = z * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + batch * L + rows, mask=row_mask, other=0.0)
            x_hat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        grad_norm = tl.load(grad_out_ptr + grad_offsets, mask=mask, other=0.0).to(tl.float32)

        if MODULATION != _NONE:
            # out = n * (1 + scale) + shift with n = x_hat * weight + bias
            if NEED_GRAD_SCALE:
                grad_scale = grad_norm * (x_hat * weight + bias)
                if MODULATION == _PER_TOKEN:
                    tl.store(grad_scale_ptr + grad_offsets, grad_scale.to(grad_scale_ptr.dtype.element_ty), mask=mask)
                else:
                    acc_scale += grad_scale
            if NEED_GRAD_SHIFT:
                if MODULATION == _PER_TOKEN:
                    tl.store(grad_shift_ptr + grad_offsets, grad_norm.to(grad_shift_ptr.dtype.element_ty), mask=mask)
                else:
                    acc_shift += grad_norm
            scale = _modulation_tile(scale_ptr, batch, scale_stride_b, scale_stride_l, rows, cols, mask, scale_row,
                                     MODULATION)
            grad_norm = grad_norm * (1.0 + scale)
        if NEED_GRAD_WEIGHT:
            acc_weight += grad_norm * x_hat
        if NEED_GRAD_BIAS:
            acc_bias += grad_norm

        # Through the normalisation: dz = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dn * w
        # (RMSNorm has no mean(g) term).
        grad_x_hat = grad_norm * weight
        grad_z = grad_x_hat - x_hat * (tl.sum(grad_x_hat * x_hat, axis=1) / D)[:, None]
        if not IS_RMS:
            grad_z -= (tl.sum(grad_x_hat, axis=1) / D)[:, None]
        grad_z = grad_z * rstd[:, None]
        if HAS_GRAD_X_NEW:
            grad_z += tl.load(grad_x_new_ptr + grad_offsets, mask=mask, other=0.0).to(tl.float32)
        if STORE_GRAD_X:
            tl.store(grad_x_ptr + grad_offsets, grad_z.to(grad_x_ptr.dtype.element_ty), mask=mask)

        if HAS_RESIDUAL and GATE != _NONE:
            if STORE_GRAD_RES:
                gate = _modulation_tile(gate_ptr, batch, gate_stride_b, gate_stride_l, rows, cols, mask, gate_row,
                                        GATE)
                tl.store(grad_res_ptr + grad_offsets, (grad_z * gate).to(grad_res_ptr.dtype.element_ty), mask=mask)
            if NEED_GRAD_GATE:
                grad_gate = grad_z * _load_tile(res_ptr, batch, res_stride_b, res_stride_l, rows, cols, mask)
                if GATE == _PER_TOKEN:
                    tl.store(grad_gate_ptr + grad_offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
                else:
                    acc_gate += grad_gate

    if NEED_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + partial_offsets + cols, tl.sum(acc_weight, axis=0), mask=col_mask)
    if NEED_GRAD_BIAS:
        tl.store(grad_bias_ptr + partial_offsets + cols, tl.sum(acc_bias, axis=0), mask=col_mask)
    if MODULATION != _PER_TOKEN:
        if NEED_GRAD_SHIFT:
            tl.store(grad_shift_ptr + partial_offsets + cols, tl.sum(acc_shift, axis=0), mask=col_mask)
        if NEED_GRAD_SCALE:
            tl.store(grad_scale_ptr + partial_offsets + cols, tl.sum(acc_scale, axis=0), mask=col_mask)
    if GATE != _PER_TOKEN:
        if NEED_GRAD_GATE:
            tl.store(grad_gate_ptr + partial_offsets + cols, tl.sum(acc_gate, axis=0), mask=col_mask)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                         INDEX_64: tl.constexpr):
    """Grid (G, cdiv(D, BLOCK_D)): out[g] = sum_p partial[g, p] for a (G, n_partials, D) fp32 buffer."""
    group = widen(tl.program_id(0), INDEX_64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    total = _sum_rows(partial_ptr + group * n_partials * D, n_partials, D, cols, col_mask, BLOCK_P, BLOCK_D,
                      INDEX_64)
    tl.store(out_ptr + group * D + cols, total.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _adaln_backward_kernel(
    partial_ptr, temb_ptr, temb_stride_b, ada_scale_ptr,
    grad_temb_ptr, grad_temb_stride_b, grad_ada_bias_ptr, grad_ada_scale_ptr,
    chunk0, chunk1, chunk2, B, P, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Grid (S, cdiv(D, BLOCK_D)): gradients of the AdaLN-affine parameters for S <= 3 chunks.

    partial is (S, B, P, D) fp32: per-program sums of d(modulation chunk). With
    m[b] = bias[k] + temb[b, k] * (1 + scale[k]): d temb[b, k] = dm[b] * (1 + scale[k]),
    d bias[k] = sum_b dm[b], d scale[k] = sum_b dm[b] * temb[b, k].
    """
    slot = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    chunk = tl.where(slot == 0, chunk0, tl.where(slot == 1, chunk1, chunk2))
    offsets = chunk * D + cols
    one_plus_scale = 1.0 + tl.load(ada_scale_ptr + offsets, mask=col_mask, other=0.0).to(tl.float32)
    acc_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    for batch_index in range(0, B):
        batch = widen(batch_index, INDEX_64)
        base = partial_ptr + (slot * B + batch) * P * D
        grad_mod = _sum_rows(base, P, D, cols, col_mask, BLOCK_P, BLOCK_D, INDEX_64)
        temb = tl.load(temb_ptr + batch * temb_stride_b + offsets, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(grad_temb_ptr + batch * grad_temb_stride_b + offsets,
                 (grad_mod * one_plus_scale).to(grad_temb_ptr.dtype.element_ty), mask=col_mask)
        acc_bias += grad_mod
        acc_scale += grad_mod * temb
    tl.store(grad_ada_bias_ptr + offsets, acc_bias.to(grad_ada_bias_ptr.dtype.element_ty), mask=col_mask)
    tl.store(grad_ada_scale_ptr + offsets, acc_scale.to(grad_ada_scale_ptr.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launch configs, side by side per backend
# --------------------------------------------------------------------------------------------
# TILE_ELEMENTS (host-side) is the size of one program's (BLOCK_ROWS, BLOCK_D) tile: narrow rows
# (D = 48, 96) batch many tokens per program, D = 768 takes 1 to 8. The forward runs one tile per
# program (no loop, so num_stages is moot); the backward walks rows in a loop over a grid of
# PROGRAMS_PER_SM x multiprocessors programs (more programs: more parallelism, but more partial
# sums to write and reduce). The backward keeps about 3x more values live per row than the
# forward, so its candidates hold half as many values per lane. num_stages is 1 everywhere:
# nothing is loaded through shared memory in a pipelined loop, and num_stages 1 and 2 compile
# to identical code for both kernels on sm_90 and gfx942 (issue 10), so 2 only duplicated work.
# No tl.dot, so the only HIP-only key that applies is the occupancy hint waves_per_eu (a tuning
# candidate; the defaults leave it to the compiler); on HIP num_warps counts 64-wide wavefronts
# (<= 16) and nothing here touches LDS beyond reductions.
_TILES = (1024, 2048, 4096, 8192)


def _fits(tile: int, warps: int, lane_width: int, most: int) -> bool:
    """4..``most`` fp32 values per lane and tensor; half that at 16 warps, where a lane gets at
    most 128 registers (more spills, measured with ptxas for sm_90 and the gfx942 compiler)."""
    per_lane = tile // (lane_width * warps)
    return 4 <= per_lane <= (most // 2 if warps == 16 else most)


# The interpreter ignores launch options; large tiles mean fewer interpreted programs, and its
# stand-in multiprocessor count (below) still gives several backward programs per batch.
INTERPRETER_CONFIG = dict(TILE_ELEMENTS=4096, num_warps=4, num_stages=1, PROGRAMS_PER_SM=2)
INTERPRETER_MULTIPROCESSORS = 2
_HOST_KEYS = ("TILE_ELEMENTS", "PROGRAMS_PER_SM")

# Untuned starting points, first matching (vendor, arch prefix) wins; 8..16 values per lane.
# Tiles are sized so that the CFG-batch row counts (a few hundred rows of D = 768) still give
# a few programs per SM/CU: MI300-class GPUs (gfx94x/gfx95x, 304 / 256 CUs) take smaller tiles.
FORWARD_CONFIGS = ConfigTable(
    cuda=[dict(TILE_ELEMENTS=tile, num_warps=warps, num_stages=1)
          for tile in _TILES for warps in (1, 2, 4, 8, 16) if _fits(tile, warps, 32, 16)],
    hip=[dict(TILE_ELEMENTS=tile, num_warps=warps, num_stages=1, waves_per_eu=waves)
         for tile in _TILES for warps in (1, 2, 4, 8, 16) for waves in (0, 2, 4) if _fits(tile, warps, 64, 16)],
    interpreter=dict(INTERPRETER_CONFIG),
    defaults=[
        ("cuda", "", dict(TILE_ELEMENTS=2048, num_warps=4, num_stages=1)),
        ("hip", "gfx94", dict(TILE_ELEMENTS=1024, num_warps=1, num_stages=1)),
        ("hip", "gfx95", dict(TILE_ELEMENTS=1024, num_warps=1, num_stages=1)),
        ("hip", "", dict(TILE_ELEMENTS=2048, num_warps=2, num_stages=1)),
    ],
    host_keys=_HOST_KEYS,
)
BACKWARD_CONFIGS = ConfigTable(
    cuda=[dict(TILE_ELEMENTS=tile, num_warps=warps, num_stages=1, PROGRAMS_PER_SM=programs)
          for tile in _TILES for warps in (2, 4, 8, 16) for programs in (1, 2, 4) if _fits(tile, warps, 32, 8)],
    hip=[dict(TILE_ELEMENTS=tile, num_warps=warps, num_stages=1, PROGRAMS_PER_SM=programs, waves_per_eu=waves)
         for tile in _TILES for warps in (1, 2, 4, 8, 16) for programs in (1, 2, 4) for waves in (0, 2)
         if _fits(tile, warps, 64, 8)],
    interpreter=dict(INTERPRETER_CONFIG),
    defaults=[
        ("cuda", "", dict(TILE_ELEMENTS=2048, num_warps=8, num_stages=1, PROGRAMS_PER_SM=2)),
        ("hip", "gfx94", dict(TILE_ELEMENTS=1024, num_warps=2, num_stages=1, PROGRAMS_PER_SM=2)),
        ("hip", "gfx95", dict(TILE_ELEMENTS=1024, num_warps=2, num_stages=1, PROGRAMS_PER_SM=2)),
        ("hip", "", dict(TILE_ELEMENTS=2048, num_warps=4, num_stages=1, PROGRAMS_PER_SM=2)),
    ],
    host_keys=_HOST_KEYS,
)
CONFIGS = {"modulated_norm": FORWARD_CONFIGS, "modulated_norm_backward": BACKWARD_CONFIGS}


OPS = ConfigTables(CONFIGS)
candidate_configs, default_config = OPS.candidate_configs, OPS.default_config


def tuning_bucket(shape: dict) -> str:
    """Configs depend on the row width (its power-of-two block) and the row count (programs)."""
    rows = shape["batch"] * shape["length"]
    return f"d{triton.next_power_of_2(shape['dim'])}_r{min(triton.next_power_of_2(rows), 1 << 16)}"


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------
def _strides(tensor: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(batch, token) strides of a canonical (B, L, D) or per-batch (B, D) view; zeros if absent."""
    if tensor is None:
        return 0, 0
    return (tensor.stride(0), tensor.stride(1)) if tensor.dim() == 3 else (tensor.stride(0), 0)


def _block_rows(config: dict, block_d: int, length: int) -> int:
    return max(1, min(config["TILE_ELEMENTS"] // block_d, triton.next_power_of_2(length)))


def _block_d(plan: _Plan) -> int:
    if plan.dim > MAX_DIM:
        raise KernelInputError(f"x has rows of {plan.dim} elements: the kernel takes at most {MAX_DIM}; "
                               "use backend='torch'")
    return triton.next_power_of_2(plan.dim)


def _config(op_name: str, plan: _Plan, device: torch.device) -> dict:
    return get_config(op_name, device, tuning_bucket(dict(batch=plan.batch, length=plan.length, dim=plan.dim)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """SMs (CUDA) or CUs (ROCm) of ``device``; a small stand-in for the CPU interpreter."""
    if device.type != "cuda":
        return INTERPRETER_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count


def modulated_norm_forward(plan: _Plan, x, residual, gate, shift, scale, weight, bias, temb, ada_bias, ada_scale,
                           *, store_stats: bool, config: Optional[dict] = None):
    """Launch the forward kernel on canonical inputs (see :func:`_prepare`).

    Returns:
        x_new: (B, L, D) in x's dtype (x itself without residual),
        out: (B, L, D) in x's dtype,
        mean, rstd: (B * L,) float32 row statistics (mean only for LayerNorm; None unless
        ``store_stats``).
    """
    batch, length, dim = plan.batch, plan.length, plan.dim
    block_d = _block_d(plan)
    config = config or _config("modulated_norm", plan, x.device)
    out = torch.empty((batch, length, dim), device=x.device, dtype=x.dtype)
    x_new = torch.empty_like(out) if plan.has_residual else x
    rstd = torch.empty(batch * length, device=x.device, dtype=torch.float32) if store_stats else None
    mean = torch.empty_like(rstd) if store_stats and not plan.is_rms else None
    if batch * length == 0:
        return x_new, out, mean, rstd
    block_rows = _block_rows(config, block_d, length)
    grid = (triton.cdiv(length, block_rows), batch)
    temb_stride = temb.stride(0) if temb is not None else 0
    _modulated_norm_fwd_kernel[grid](
        x, *_strides(x),
        residual if residual is not None else x, *_strides(residual),
        gate if gate is not None else x, *_strides(gate),
        shift if shift is not None else x, *_strides(shift),
        scale if scale is not None else x, *_strides(scale),
        weight if weight is not None else x, bias if bias is not None else x,
        temb if temb is not None else x, temb_stride,
        ada_bias if ada_bias is not None else x, ada_scale if ada_scale is not None else x,
        plan.shift_chunk, plan.scale_chunk, plan.gate_chunk,
        x_new, out, mean if mean is not None else out, rstd if rstd is not None else out,
        length, dim, plan.eps,
        IS_RMS=plan.is_rms, HAS_WEIGHT=plan.has_weight, HAS_BIAS=plan.has_bias, HAS_RESIDUAL=plan.has_residual,
        GATE=int(plan.gate), MODULATION=int(plan.modulation), STORE_STATS=store_stats,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, INDEX_64=plan.index_64, **FORWARD_CONFIGS.launch_options(config),
    )
    return x_new, out, mean, rstd


def _sum_partials(partials: torch.Tensor, n_partials: int, dtype: torch.dtype, index_64: bool) -> torch.Tensor:
    """(..., n_partials, D) fp32 partial sums -> (..., D) in ``dtype``, one launch."""
    dim = partials.shape[-1]
    groups = partials.numel() // (n_partials * dim)
    out = torch.empty((groups, dim), device=partials.device, dtype=dtype)
    block_d = min(triton.next_power_of_2(dim), 256)
    _sum_partials_kernel[(groups, triton.cdiv(dim, block_d))](
        partials, out, n_partials, dim, BLOCK_P=32, BLOCK_D=block_d, INDEX_64=index_64)
    return out


def modulated_norm_backward(plan: _Plan, grad_out, grad_x_new, z, mean, rstd, residual, gate, scale, weight, bias,
                            temb, ada_bias, ada_scale, *, needs: Tuple[bool, ...], config: Optional[dict] = None):
    """Launch the backward kernels.

    Args:
        grad_out: (B, L, D) upstream gradient of ``out`` (None: zero).
        grad_x_new: (B, L, D) upstream gradient of ``x_new`` (None: zero or no residual).
        z: the normalised input, x_new (with residual) or x; mean / rstd from the forward.
        residual, gate, scale, weight, bias, temb, ada_bias, ada_scale: canonical forward inputs.
        needs: which of (x, residual, gate, shift, scale, weight, bias, temb, AdaLN bias,
            AdaLN scale) need a gradient.
    Returns:
        Gradients in that order, each in its input's dtype and shape, None where not needed.
    """
    (need_x, need_residual, need_gate, need_shift, need_scale, need_weight, need_bias,
     need_temb, need_ada_bias, need_ada_scale) = needs
    batch, length, dim = plan.batch, plan.length, plan.dim
    if batch * length == 0:  # no rows: every gradient is zero (shift's has scale's shape)
        like = (z, residual, gate, scale, scale, weight, bias, temb, ada_bias, ada_scale)
        return tuple(torch.zeros_like(t) if need and t is not None else None for need, t in zip(needs, like))
    block_d = _block_d(plan)
    config = config or _config("modulated_norm_backward", plan, z.device)
    device, dtype = z.device, z.dtype
    block_rows = _block_rows(config, block_d, length)
    tiles = triton.cdiv(length, block_rows)
    target_programs = config["PROGRAMS_PER_SM"] * _multiprocessors(device)
    programs = min(tiles, triton.cdiv(target_programs, batch))
    rows_per_program = triton.cdiv(tiles, programs) * block_rows
    programs = triton.cdiv(length, rows_per_program)

    # shift / scale / gate: where each comes from, and whether its gradient is computed at all
    sources = {"shift": plan.modulation, "scale": plan.modulation, "gate": plan.gate}
    need_adaln = need_temb or need_ada_bias or need_ada_scale
    need_tensor = {"shift": need_shift, "scale": need_scale, "gate": need_gate}
    need_grad = {name: source != Source.NONE and (need_adaln if source == Source.ADALN else need_tensor[name])
                 for name, source in sources.items()}
    need_grad.update(weight=plan.has_weight and need_weight, bias=plan.has_bias and need_bias)

    # One buffer for every row-summed gradient: slots of (B, P, D) fp32 partial sums, ordered
    # per-batch modulations, AdaLN chunks, then norm parameters (each group reduced in one launch).
    summed = [name for name, source in sources.items() if need_grad[name] and source == Source.PER_BATCH]
    adaln = [name for name, source in sources.items() if need_grad[name] and source == Source.ADALN]
    params = [name for name in ("weight", "bias") if need_grad[name]]
    slots = summed + adaln + params
    partials = torch.empty((len(slots), batch, programs, dim), device=device, dtype=torch.float32)
    index_64 = plan.index_64 or needs_int64(partials.numel())
    grads = {name: partials[index] for index, name in enumerate(slots)}
    for name, source in sources.items():
        if need_grad[name] and source == Source.PER_TOKEN:
            grads[name] = torch.empty((batch, length, dim), device=device, dtype=dtype)

    store_grad_res = plan.gate != Source.NONE and need_residual
    # Without a gate, d residual = d x_new = d x: one buffer serves both.
    store_grad_x = need_x or (plan.has_residual and plan.gate == Source.NONE and need_residual)
    grad_x = torch.empty((batch, length, dim), device=device, dtype=dtype) if store_grad_x else None
    grad_res = torch.empty((batch, length, dim), device=device, dtype=dtype) if store_grad_res else grad_x
    if grad_out is None:  # only x_new was used downstream
        grad_out = torch.zeros((batch, length, dim), device=device, dtype=dtype)
    grad_out = grad_out.contiguous()
    has_grad_x_new = plan.has_residual and grad_x_new is not None
    grad_x_new = grad_x_new.contiguous() if has_grad_x_new else grad_out

    _modulated_norm_bwd_kernel[(programs, batch)](
        z, *_strides(z), mean if mean is not None else rstd, rstd,
        grad_out, grad_x_new,
        residual if residual is not None else z, *_strides(residual),
        gate if gate is not None else z, *_strides(gate),
        scale if scale is not None else z, *_strides(scale),
        weight if weight is not None else z, bias if bias is not None else z,
        temb if temb is not None else z, temb.stride(0) if temb is not None else 0,
        ada_bias if ada_bias is not None else z, ada_scale if ada_scale is not None else z,
        plan.scale_chunk, plan.gate_chunk,
        grad_x if grad_x is not None else z, grad_res if grad_res is not None else z,
        *(grads.get(name, z) for name in ("gate", "shift", "scale", "weight", "bias")),
        length, dim, rows_per_program,
        IS_RMS=plan.is_rms, HAS_WEIGHT=plan.has_weight, HAS_BIAS=plan.has_bias, HAS_RESIDUAL=plan.has_residual,
        GATE=int(plan.gate), MODULATION=int(plan.modulation), HAS_GRAD_X_NEW=has_grad_x_new,
        STORE_GRAD_X=store_grad_x, STORE_GRAD_RES=store_grad_res, NEED_GRAD_GATE=need_grad["gate"],
        NEED_GRAD_SHIFT=need_grad["shift"], NEED_GRAD_SCALE=need_grad["scale"],
        NEED_GRAD_WEIGHT=need_grad["weight"], NEED_GRAD_BIAS=need_grad["bias"],
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, INDEX_64=index_64, **BACKWARD_CONFIGS.launch_options(config),
    )

    if summed:
        totals = _sum_partials(partials[: len(summed)], programs, dtype, index_64).view(len(summed), batch, dim)
        grads.update(zip(summed, totals))
    if params:
        param_dtype = (weight if weight is not None else bias).dtype
        totals = _sum_partials(partials[len(summed) + len(adaln):], batch * programs, param_dtype, index_64)
        grads.update(zip(params, totals))
    grad_temb = grad_ada_bias = grad_ada_scale = None
    if adaln:
        grad_temb = torch.zeros_like(temb, memory_format=torch.contiguous_format)
        grad_ada_bias = torch.zeros_like(ada_bias)
        grad_ada_scale = torch.zeros_like(ada_scale)
        chunks = [getattr(plan, f"{name}_chunk") for name in adaln]
        chunks += [0] * (3 - len(chunks))
        block = min(triton.next_power_of_2(dim), 256)
        _adaln_backward_kernel[(len(adaln), triton.cdiv(dim, block))](
            partials[len(summed): len(summed) + len(adaln)], temb, temb.stride(0), ada_scale,
            grad_temb, grad_temb.stride(0), grad_ada_bias, grad_ada_scale,
            *chunks, batch, programs, dim, BLOCK_P=32, BLOCK_D=block, INDEX_64=index_64)

    tensor_grads = {name: grads.get(name) if source in (Source.PER_BATCH, Source.PER_TOKEN) else None
                    for name, source in sources.items()}
    results = (grad_x, grad_res, tensor_grads["gate"], tensor_grads["shift"], tensor_grads["scale"],
               grads.get("weight"), grads.get("bias"), grad_temb, grad_ada_bias, grad_ada_scale)
    return tuple(grad if need else None for need, grad in zip(needs, results))


def _backward_inputs(inputs, x_new, mean, rstd):
    """What :func:`modulated_norm_backward` reads after the gradients, from the canonical inputs
    and the forward's results (x_new is x itself without residual; shift is not needed)."""
    _, residual, gate, _, scale, weight, bias, temb, ada_bias, ada_scale = inputs
    return x_new, mean, rstd, residual, gate, scale, weight, bias, temb, ada_bias, ada_scale


# --------------------------------------------------------------------------------------------
# Autograd Function
# --------------------------------------------------------------------------------------------
class ModulatedNormFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels: ``apply(plan, *canonical inputs)`` -> out, or
    (x_new, out) when the plan has a residual. Use :func:`modulated_norm` rather than this."""

    @staticmethod
    def forward(ctx, plan, *inputs):
        x_new, out, mean, rstd = modulated_norm_forward(plan, *inputs, store_stats=True)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*_backward_inputs(inputs, x_new, mean, rstd))
        return (x_new, out) if plan.has_residual else out

    @staticmethod
    def backward(ctx, *grads):
        plan = ctx.plan
        grad_x_new, grad_out = grads if plan.has_residual else (None, grads[0])
        return (None, *modulated_norm_backward(plan, grad_out, grad_x_new, *ctx.saved_tensors,
                                               needs=tuple(ctx.needs_input_grad[1:])))


# --------------------------------------------------------------------------------------------
# Validation: one plan shared by the kernel and torch paths
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What one call computes, in the canonical (B, L, D) view; passed through autograd."""

    shape: torch.Size  # x's own shape, restored on the outputs
    batch: int
    length: int
    dim: int
    is_rms: bool
    eps: float
    has_weight: bool
    has_bias: bool
    has_residual: bool
    gate: Source
    modulation: Source
    shift_chunk: int  # AdaLN chunk indices; 0 where unused
    scale_chunk: int
    gate_chunk: int
    index_64: bool  # 64-bit offsets: some tensor spans 2^31 elements or more (see launch.needs_int64)


def _unit_stride(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() and tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
        raise KernelInputError(f"{name} must have unit stride over its last dim (got strides {tuple(tensor.stride())}); "
                               f"call .contiguous() on it")


def _same_device(name: str, tensor: torch.Tensor, x: torch.Tensor) -> None:
    if tensor.device != x.device:
        raise KernelInputError(f"{name} is on {tensor.device} but x is on {x.device}")


def _activation(name: str, tensor: torch.Tensor, x: torch.Tensor) -> None:
    """Activations share x's device and dtype and read through strides."""
    _same_device(name, tensor, x)
    if tensor.dtype != x.dtype:
        raise KernelInputError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}")
    _unit_stride(name, tensor)


def _parameter(name: str, tensor: torch.Tensor, shape: Tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """A parameter on x's device, in x's dtype or float32, as the contiguous tensor the kernels
    read (``weight_ptr + cols``): a strided or expanded one is copied once (D or K x D values;
    the copy is differentiable)."""
    _same_device(name, tensor, x)
    if tuple(tensor.shape) != shape:
        raise KernelInputError(f"{name} has shape {tuple(tensor.shape)}; expected {shape}")
    if tensor.dtype not in (x.dtype, torch.float32):
        raise KernelInputError(f"{name} has dtype {tensor.dtype}; expected x's dtype {x.dtype} or float32")
    return tensor.contiguous()


def _row_source(name: str, tensor: torch.Tensor, x: torch.Tensor, x3: torch.Tensor) -> Tuple[Source, torch.Tensor]:
    """Classify a shift/scale/gate tensor against x and return its canonical view:
    (B, L, D) per token (x's own shape), or (B, D) per batch (given as (B, D) or (B, 1, D))."""
    _activation(name, tensor, x)
    batch, _, dim = x3.shape
    if tensor.shape == x.shape:
        return Source.PER_TOKEN, tensor if tensor.dim() == 3 else tensor.unsqueeze(0)
    if tuple(tensor.shape) == (batch, dim):
        return Source.PER_BATCH, tensor
    if tuple(tensor.shape) == (batch, 1, dim):
        return Source.PER_BATCH, tensor[:, 0]
    raise KernelInputError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(x.shape)} (per token), "
                           f"({batch}, {dim}) or ({batch}, 1, {dim}) (per batch)")


def _adaln_chunks(adaln: AdaLNAffine, x: torch.Tensor, batch: int, dim: int):
    """Validate an :class:`AdaLNAffine`; return (its chunk indices that are set, by field name,
    temb, the contiguous AdaLN bias and scale)."""
    temb, ada_bias, ada_scale = adaln.temb, adaln.bias, adaln.scale
    _activation("adaln.temb", temb, x)
    if ada_bias.dim() != 2 or ada_bias.shape[1] != dim:
        raise KernelInputError(f"adaln.bias has shape {tuple(ada_bias.shape)}; expected (K, {dim})")
    n_chunks = ada_bias.shape[0]
    ada_bias = _parameter("adaln.bias", ada_bias, (n_chunks, dim), x)
    ada_scale = _parameter("adaln.scale", ada_scale, (n_chunks, dim), x)
    if ada_scale.dtype != ada_bias.dtype:
        raise KernelInputError(f"adaln.bias ({ada_bias.dtype}) and adaln.scale ({ada_scale.dtype}) must share a dtype")
    if tuple(temb.shape) != (batch, n_chunks * dim):
        raise KernelInputError(f"adaln.temb has shape {tuple(temb.shape)}; expected ({batch}, {n_chunks} * {dim})")
    if (adaln.shift_chunk is None) != (adaln.scale_chunk is None):
        raise KernelInputError("adaln.shift_chunk and adaln.scale_chunk go together: give both or neither")
    chunks = {name: getattr(adaln, name) for name in ("shift_chunk", "scale_chunk", "gate_chunk")
              if getattr(adaln, name) is not None}
    if not chunks:
        raise KernelInputError("adaln given without shift_chunk/scale_chunk or gate_chunk")
    for name, index in chunks.items():
        if not 0 <= index < n_chunks:
            raise KernelInputError(f"adaln.{name}={index} is outside the {n_chunks} chunks")
    if len(set(chunks.values())) != len(chunks):
        raise KernelInputError(f"adaln chunk indices must be distinct, got {chunks}")
    return chunks, temb, ada_bias, ada_scale


def _prepare(x, *, norm, eps, weight=None, bias=None, shift=None, scale=None, residual=None, gate=None, adaln=None):
    """Validate the arguments of :func:`modulated_norm`; return (plan, canonical inputs).

    Canonical inputs, in kernel order: x, residual, gate, shift, scale (3-D (B, L, D) views, or
    (B, D) per batch), weight, bias, temb, AdaLN bias, AdaLN scale; None where absent.
    """
    if norm not in NORMS:
        raise KernelInputError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise KernelInputError(f"x must be a (B, L, D) or (N, D) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"x has dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    if x.shape[-1] == 0:
        raise KernelInputError("x has an empty last dim")
    _unit_stride("x", x)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    batch, length, dim = x3.shape
    if weight is not None:
        weight = _parameter("weight", weight, (dim,), x)
    if bias is not None:
        if norm == "rms":
            raise KernelInputError("bias given with norm='rms'; RMSNorm has no bias")
        bias = _parameter("bias", bias, (dim,), x)
        if weight is not None and bias.dtype != weight.dtype:
            raise KernelInputError(f"weight ({weight.dtype}) and bias ({bias.dtype}) must share a dtype")

    residual3 = None
    if residual is not None:
        _activation("residual", residual, x)
        if residual.shape != x.shape:
            raise KernelInputError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        residual3 = residual if residual.dim() == 3 else residual.unsqueeze(0)

    chunks, temb, ada_bias, ada_scale = (_adaln_chunks(adaln, x, batch, dim) if adaln is not None
                                         else ({}, None, None, None))
    adaln_shift, adaln_gate = "shift_chunk" in chunks, "gate_chunk" in chunks

    modulation, shift3, scale3 = Source.NONE, None, None
    if (shift is None) != (scale is None):
        raise KernelInputError("shift and scale go together: give both or neither")
    if shift is not None:
        if adaln_shift:
            raise KernelInputError("shift/scale given both as tensors and as adaln chunks")
        modulation, shift3 = _row_source("shift", shift, x, x3)
        scale_source, scale3 = _row_source("scale", scale, x, x3)
        if scale_source != modulation:
            raise KernelInputError(f"shift is {modulation.name.lower()} but scale is {scale_source.name.lower()}; "
                                   "both must be per batch or both per token")
    elif adaln_shift:
        modulation = Source.ADALN

    gate_source, gate3 = Source.NONE, None
    if gate is not None:
        if adaln_gate:
            raise KernelInputError("gate given both as a tensor and as adaln.gate_chunk")
        gate_source, gate3 = _row_source("gate", gate, x, x3)
    elif adaln_gate:
        gate_source = Source.ADALN
    if gate_source != Source.NONE and residual is None:
        raise KernelInputError("a gate needs a residual: x_new = x + gate * residual")

    plan = _Plan(shape=x.shape, batch=batch, length=length, dim=dim, is_rms=norm == "rms", eps=float(eps),
                 has_weight=weight is not None, has_bias=bias is not None, has_residual=residual is not None,
                 gate=gate_source, modulation=modulation, shift_chunk=chunks.get("shift_chunk", 0),
                 scale_chunk=chunks.get("scale_chunk", 0), gate_chunk=chunks.get("gate_chunk", 0),
                 index_64=needs_int64(batch * length * dim, *(_span(t) for t in (x3, residual3, gate3, shift3, scale3,
                                                                                  temb))))
    return plan, (x3, residual3, gate3, shift3, scale3, weight, bias, temb, ada_bias, ada_scale)


def _span(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else storage_span(tensor.shape, tensor.stride())


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def modulated_norm(
    x: torch.Tensor,
    *,
    norm: str,
    eps: float,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    adaln: Optional[AdaLNAffine] = None,
    backend: Optional[str] = None,
):
    """``x_new = x + gate * residual``; ``out = norm(x_new) * (1 + scale) + shift``, fused.

    Each step is optional: without ``residual`` x_new is x; without ``gate`` the residual is
    added as is; without shift/scale the norm's output is returned unmodulated.

    Args:
        x: (B, L, D) or (N, D) (treated as B = 1), float32 / float16 / bfloat16; any batch and
            token strides, unit stride over D (as for every activation below).
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm); statistics are fp32.
        eps: the norm's epsilon.
        weight: (D,) norm weight or None. bias: (D,) LayerNorm bias or None. x's dtype or float32.
        shift, scale: per token (x's shape) or per batch ((B, D) or (B, 1, D)), x's dtype; both
            or neither, both per token or both per batch. E.g. ``proj.chunk(3, -1)`` of a
            (B, L, 3D) projection, read in place.
        residual: x's shape and dtype: the branch output added to x.
        gate: gate of the residual, per token or per batch like shift; needs ``residual``.
        adaln: :class:`AdaLNAffine`: shift/scale and/or gate as chunks of Nitro-E's AdaLN-affine
            modulation, computed in the kernel (excludes the corresponding tensors).
        backend: ``"triton"`` / ``"interpret"`` run the kernels, ``"torch"`` / ``"reference"``
            the plain PyTorch composition; default :func:`nitro_ar.kernels.backend.select_backend`.
    Returns:
        ``out`` (x's shape and dtype), or ``(x_new, out)`` when ``residual`` is given.
        Differentiable with respect to every tensor input.
    Raises:
        KernelInputError (a ValueError): naming the offending tensor, for mismatched shapes,
        dtypes, devices or strides (activations need unit stride over D; parameters of any
        layout are copied once), and inconsistent options.
    """
    plan, inputs = _prepare(x, norm=norm, eps=eps, weight=weight, bias=bias, shift=shift, scale=scale,
                            residual=residual, gate=gate, adaln=adaln)
    if select_backend(x.device, backend) not in KERNEL_BACKENDS:
        return reference.modulated_norm(x, norm=norm, eps=eps, weight=weight, bias=bias, shift=shift, scale=scale,
                                        residual=residual, gate=gate, adaln=adaln)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        outputs = ModulatedNormFunction.apply(plan, *inputs)
        x_new, out = outputs if plan.has_residual else (None, outputs)
    else:
        x_new, out, _, _ = modulated_norm_forward(plan, *inputs, store_stats=False)
    out = out.reshape(plan.shape)
    return (x_new.reshape(plan.shape), out) if plan.has_residual else out
