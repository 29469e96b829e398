"""Linear layers with their neighbours fused in: one launch per block stage, forward only.

Each problem computes, for x of shape (B, L, K) (or (N_rows, K), treated as B = 1):

    a   = prologue(x)            none | modulated norm | SiLU(x + addend)
    y   = act(a @ W^T + bias)    none | GELU(tanh) | SiLU | GELU(g) * v (SwiGLU, W = [W_g; W_v])
    out = residual + gate * y    (optional; gate optional)

- Prologue "norm": LayerNorm (weight and bias optional) or RMSNorm (weight optional) of each
  row of x, statistics in fp32 over the whole row (a first pass over K; LayerNorm merges
  per-chunk mean and M2, which is as stable as Welford), then ``* (1 + scale) + shift`` with
  shift / scale per token, per batch, or chunks of Nitro-E's AdaLN-affine modulation computed
  in the kernel; the normalised tile is rounded to x's dtype before the product, as the
  unfused norm's output is. So the norm feeding a GEMM never makes a trip to memory.
- Prologue "add_silu": ``SiLU(x + addend)``, e.g. every head step's condition (a per-step
  time embedding broadcast over rows plus per-row conditions) feeding the modulation GEMM.
- Epilogue: bias, activation and the gated residual in fp32 with one rounding at the end; or
  (``flow``) the guided Euler step of the heads' samplers: the program computes the velocity of
  the unconditional and the conditional rows of its tokens and writes
  ``state + (sigma_next - sigma) (v_u + cfg (v_c - v_u))``, sigmas read from device memory.
- Grouped: up to two problems with the same output width, activation and prologue kind (the
  image and text streams of a joint block, each with its own weights, row count and K) run in
  one launch; programs are laid out problem by problem.

Every activation is read through its batch, row (and, for x, column) strides, so chunks of a
fused projection, broadcast views (stride 0) and the column slices of a concatenation buffer
(``out=``) need no copy. Offsets are int32 unless a tensor spans 2^31 elements or more
(``INDEX_64``, from sizes and strides alone: :func:`launch_plan`).

No autograd: the fused path serves sampling, where kernel count bounds the time at small
batch. Under autograd :func:`fused_linear` runs its eager reference
(:func:`nitro_ar.kernels.reference.fused_linear`), and :mod:`nitro_ar.fast` trains through the
modulated-norm kernel and library GEMMs.

Launch configs (CUDA and HIP lists, a default per arch) are a
:class:`~nitro_ar.kernels.launch.ConfigTable` tuned as the op ``fused_linear``; its candidates
include ``{"LIBRARY": 1}``, the unfused composition with the vendor's GEMM (cuBLAS /
hipBLASLt), so ``nitro-ar autotune`` times both paths per shape bucket and persists the faster
(:func:`gemm_path`). Problems and benchmarks: :mod:`nitro_ar.kernels.tuning_problems`.

File order: kernels, launch configs and launchers, validation, public functions.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from . import reference
from .backend import KERNEL_BACKENDS, DeviceInfo, device_info, requested_gemm_path, select_backend
from .errors import KernelInputError
from .launch import ConfigTable, ConfigTables, needs_int64, storage_span
from .offsets import widen
from .reference import ACTIVATIONS, AdaLNAffine, AddSiLUPrologue, FlowEpilogue, LinearProblem, NormPrologue
from .tuning import get_config

__all__ = [
    "NormPrologue",
    "AddSiLUPrologue",
    "FlowEpilogue",
    "LinearProblem",
    "fused_linear",
    "grouped_linear",
    "launch_plan",
    "gemm_path",
    "CONFIGS",
    "LIBRARY",
    "candidate_configs",
    "default_config",
    "tuning_bucket",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GROUPS = 2

# Compile-time codes (Triton kernels read only constexpr globals).
_P_NONE: tl.constexpr = tl.constexpr(0)  # prologue kinds
_P_NORM: tl.constexpr = tl.constexpr(1)
_P_ADD_SILU: tl.constexpr = tl.constexpr(2)
_A_NONE: tl.constexpr = tl.constexpr(0)  # activations, in the order of reference.ACTIVATIONS
_A_GELU_TANH: tl.constexpr = tl.constexpr(1)
_A_SILU: tl.constexpr = tl.constexpr(2)
_A_GELU_MUL: tl.constexpr = tl.constexpr(3)
_PAIR_NONE: tl.constexpr = tl.constexpr(0)  # what the second accumulator of the K loop holds
_PAIR_WEIGHTS: tl.constexpr = tl.constexpr(1)
_PAIR_ROWS: tl.constexpr = tl.constexpr(2)
_S_NONE: tl.constexpr = tl.constexpr(0)  # where shift/scale (prologue) or the gate (epilogue) come from
_S_TENSOR: tl.constexpr = tl.constexpr(1)  # a (B, L, D) view; per batch = stride 0 over L
_S_ADALN: tl.constexpr = tl.constexpr(2)  # bias[k] + temb[b, k] * (1 + scale[k]), chunk k
# Per-problem flags, a constexpr bit set each (so the two problems of a group may differ): bias 1,
# norm weight 2, norm bias 4, residual 8 (tested as (FLAGS // bit) % 2: the interpreter passes
# constexprs as plain ints, which do not take & with a global constexpr).
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
_INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _rows(first, M, L, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """Rows ``first + arange(BLOCK)`` of a (B, L) row space: (batch, position, valid) vectors."""
    rows = widen(first, INDEX_64) + tl.arange(0, BLOCK)
    return rows // L, rows % L, rows < M


@triton.jit
def _source_tile(ptr, sb, sl, temb_ptr, temb_sb, ada_bias_ptr, ada_scale_ptr, chunk, ada_dim, batch, pos, cols,
                 col_mask, mask, SOURCE: tl.constexpr):
    """(rows, cols) fp32 tile of a modulation or gate: a strided (B, L, D) view (TENSOR), or
    AdaLN-affine chunk ``chunk`` of each row's batch, ``bias[k] + temb[b, k] * (1 + scale[k])``."""
    if SOURCE == _S_ADALN:
        offsets = chunk * ada_dim + cols
        temb = tl.load(temb_ptr + batch[:, None] * temb_sb + offsets[None, :], mask=mask, other=0.0).to(tl.float32)
        ada_bias = tl.load(ada_bias_ptr + offsets, mask=col_mask, other=0.0).to(tl.float32)
        ada_scale = tl.load(ada_scale_ptr + offsets, mask=col_mask, other=0.0).to(tl.float32)
        tile = ada_bias[None, :] + temb * (1.0 + ada_scale[None, :])
    else:
        offsets = batch[:, None] * sb + pos[:, None] * sl + cols[None, :]
        tile = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return tile


@triton.jit
def _row_stats(x_ptr, row_offsets, row_mask, x_sk, K, eps, IS_RMS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr, INDEX_64: tl.constexpr):
    """(mean, rstd) fp32 of BLOCK_M rows of K values (mean 0 for RMSNorm). LayerNorm merges the
    mean and M2 of each K chunk into the running ones (Chan et al.), one pass and stable."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = widen(start, INDEX_64) + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + row_offsets[:, None] + cols[None, :] * x_sk, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            m2 += tl.sum(x * x, axis=1)
        else:
            count = tl.minimum(K - start, BLOCK_K).to(tl.float32)
            chunk_mean = tl.sum(x, axis=1) / count
            centered = tl.where(mask, x - chunk_mean[:, None], 0.0)
            total = start + count
            delta = chunk_mean - mean
            mean += delta * (count / total)
            m2 += tl.sum(centered * centered, axis=1) + delta * delta * (start * count / total)
    return mean, tl.rsqrt(m2 / K + eps)


@triton.jit
def _prologue(a, mean, rstd, batch, pos, ks, k_mask, mask, K,
              p0_ptr, p0_sb, p0_sl, p1_ptr, p1_sb, p1_sl, norm_weight_ptr, norm_bias_ptr,
              temb_ptr, temb_sb, ada_bias_ptr, ada_scale_ptr, shift_chunk, scale_chunk,
              PROLOGUE: tl.constexpr, IS_RMS: tl.constexpr, MOD: tl.constexpr, FLAGS: tl.constexpr):
    """The GEMM input tile from a loaded tile of x: modulated norm, SiLU(x + addend), or x."""
    if PROLOGUE == _P_NORM:
        dtype = a.dtype
        a = a.to(tl.float32)
        if IS_RMS:
            a = a * rstd[:, None]
        else:
            a = (a - mean[:, None]) * rstd[:, None]
        if (FLAGS // 2) % 2 == 1:
            a = a * tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        if (FLAGS // 4) % 2 == 1:
            a = a + tl.load(norm_bias_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        if MOD != _S_NONE:
            shift = _source_tile(p0_ptr, p0_sb, p0_sl, temb_ptr, temb_sb, ada_bias_ptr, ada_scale_ptr, shift_chunk,
                                 K, batch, pos, ks, k_mask, mask, MOD)
            scale = _source_tile(p1_ptr, p1_sb, p1_sl, temb_ptr, temb_sb, ada_bias_ptr, ada_scale_ptr, scale_chunk,
                                 K, batch, pos, ks, k_mask, mask, MOD)
            a = a * (1.0 + scale) + shift
        # The rounding the unfused norm's output gets before its GEMM.
        a = tl.where(mask, a, 0.0).to(dtype)
    elif PROLOGUE == _P_ADD_SILU:
        dtype = a.dtype
        a = a.to(tl.float32) + tl.load(p0_ptr + batch[:, None] * p0_sb + pos[:, None] * p0_sl + ks[None, :],
                                       mask=mask, other=0.0).to(tl.float32)
        a = (a * tl.sigmoid(a)).to(dtype)
    return a


@triton.jit
def _gemm(
    x_ptr, row_offsets, row_mask, x_sk, batch, pos, second_rows, K,
    w_ptr, w_sn, cols, col_mask, second_half, eps,
    p0_ptr, p0_sb, p0_sl, p1_ptr, p1_sb, p1_sl, norm_weight_ptr, norm_bias_ptr,
    temb_ptr, temb_sb, ada_bias_ptr, ada_scale_ptr, shift_chunk, scale_chunk,
    PROLOGUE: tl.constexpr, IS_RMS: tl.constexpr, MOD: tl.constexpr, FLAGS: tl.constexpr, PAIR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INDEX_64: tl.constexpr,
):
    """fp32 accumulators (BLOCK_M, BLOCK_N) of prologue(x rows) @ W[cols]^T, and a second one in
    the same K loop: PAIR 1, with W[cols + second_half] (SwiGLU); PAIR 2, of the rows
    ``second_rows`` elements further, the next batch (the conditional rows of a guided step);
    PAIR 0, none (zeros)."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == _P_NORM:
        mean, rstd = _row_stats(x_ptr, row_offsets, row_mask, x_sk, K, eps, IS_RMS, BLOCK_M, BLOCK_K, INDEX_64)
        if PAIR == _PAIR_ROWS:
            mean2, rstd2 = _row_stats(x_ptr, row_offsets + second_rows, row_mask, x_sk, K, eps, IS_RMS, BLOCK_M,
                                      BLOCK_K, INDEX_64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = widen(start, INDEX_64) + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        mask = row_mask[:, None] & k_mask[None, :]
        w_mask = k_mask[:, None] & col_mask[None, :]
        w = tl.load(w_ptr + cols[None, :] * w_sn + ks[:, None], mask=w_mask, other=0.0)
        a = tl.load(x_ptr + row_offsets[:, None] + ks[None, :] * x_sk, mask=mask, other=0.0)
        a = _prologue(a, mean, rstd, batch, pos, ks, k_mask, mask, K, p0_ptr, p0_sb, p0_sl, p1_ptr, p1_sb, p1_sl,
                      norm_weight_ptr, norm_bias_ptr, temb_ptr, temb_sb, ada_bias_ptr, ada_scale_ptr, shift_chunk,
                      scale_chunk, PROLOGUE, IS_RMS, MOD, FLAGS)
        acc += tl.dot(a, w, input_precision="ieee")
        if PAIR == _PAIR_WEIGHTS:
            w2 = tl.load(w_ptr + (cols + second_half)[None, :] * w_sn + ks[:, None], mask=w_mask, other=0.0)
            acc2 += tl.dot(a, w2, input_precision="ieee")
        elif PAIR == _PAIR_ROWS:
            a2 = tl.load(x_ptr + (row_offsets + second_rows)[:, None] + ks[None, :] * x_sk, mask=mask, other=0.0)
            a2 = _prologue(a2, mean2, rstd2, batch + 1, pos, ks, k_mask, mask, K, p0_ptr, p0_sb, p0_sl, p1_ptr,
                           p1_sb, p1_sl, norm_weight_ptr, norm_bias_ptr, temb_ptr, temb_sb, ada_bias_ptr,
                           ada_scale_ptr, shift_chunk, scale_chunk, PROLOGUE, IS_RMS, MOD, FLAGS)
            acc2 += tl.dot(a2, w, input_precision="ieee")
    return acc, acc2


@triton.jit
def _activate(y, y2, ACT: tl.constexpr):
    if ACT == _A_GELU_TANH:
        inner = _SQRT_2_OVER_PI * (y + 0.044715 * y * y * y)
        # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|): no overflow, no libdevice call.
        decay = tl.exp(-2.0 * tl.abs(inner))
        tanh = (1.0 - decay) / (1.0 + decay)
        y = 0.5 * y * (1.0 + tl.where(inner < 0, -tanh, tanh))
    elif ACT == _A_SILU:
        y = y * tl.sigmoid(y)
    elif ACT == _A_GELU_MUL:
        y = 0.5 * y * (1.0 + tl.erf(y * _INV_SQRT_2)) * y2
    return y


@triton.jit
def _linear_tile(
    tile, tiles_n, N,
    x_ptr, x_sb, x_sl, x_sk, L, M, K, eps,
    w_ptr, w_sn, bias_ptr,
    p0_ptr, p0_sb, p0_sl, p1_ptr, p1_sb, p1_sl, norm_weight_ptr, norm_bias_ptr,
    temb_ptr, temb_sb, ada_bias_ptr, ada_scale_ptr, shift_chunk, scale_chunk, gate_chunk,
    res_ptr, res_sb, res_sl, gate_ptr, gate_sb, gate_sl,
    out_ptr, out_sb, out_sl,
    state_ptr, state_sl, sigma_ptr, sigma_next_ptr, cfg,
    PROLOGUE: tl.constexpr, IS_RMS: tl.constexpr, MOD: tl.constexpr, GATE: tl.constexpr, FLAGS: tl.constexpr,
    ACT: tl.constexpr, FLOW: tl.constexpr, GUIDED: tl.constexpr, PAIR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INDEX_64: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile of one problem. Rows run over the (B, L) row space of x
    (FLOW: over the L = R tokens of batch 0, the unconditional rows; batch 1 holds the conditional)."""
    pid_m = tile // tiles_n
    pid_n = tile % tiles_n
    batch, pos, row_mask = _rows(pid_m * BLOCK_M, M, L, BLOCK_M, INDEX_64)
    cols = widen(pid_n * BLOCK_N, INDEX_64) + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    row_offsets = batch * x_sb + pos * x_sl
    acc, acc2 = _gemm(x_ptr, row_offsets, row_mask, x_sk, batch, pos, x_sb, K, w_ptr, w_sn, cols, col_mask, N, eps,
                      p0_ptr, p0_sb, p0_sl, p1_ptr, p1_sb, p1_sl, norm_weight_ptr, norm_bias_ptr,
                      temb_ptr, temb_sb, ada_bias_ptr, ada_scale_ptr, shift_chunk, scale_chunk,
                      PROLOGUE, IS_RMS, MOD, FLAGS, PAIR, BLOCK_M, BLOCK_N, BLOCK_K, INDEX_64)
    if FLAGS % 2 == 1:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc += bias
        if ACT == _A_GELU_MUL:
            acc2 += tl.load(bias_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        elif PAIR == _PAIR_ROWS:
            acc2 += bias
    y = _activate(acc, acc2, ACT)
    if FLOW:
        if GUIDED:
            y = y + cfg * (acc2 - y)
        state_offsets = pos[:, None] * state_sl + cols[None, :]
        state = tl.load(state_ptr + state_offsets, mask=mask, other=0.0).to(tl.float32)
        y = state + (tl.load(sigma_next_ptr) - tl.load(sigma_ptr)) * y
    elif (FLAGS // 8) % 2 == 1:
        if GATE != _S_NONE:
            y = y * _source_tile(gate_ptr, gate_sb, gate_sl, temb_ptr, temb_sb, ada_bias_ptr, ada_scale_ptr,
                                 gate_chunk, N, batch, pos, cols, col_mask, mask, GATE)
        y += tl.load(res_ptr + batch[:, None] * res_sb + pos[:, None] * res_sl + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    out_offsets = batch[:, None] * out_sb + pos[:, None] * out_sl + cols[None, :]
    tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_linear_kernel(
    x0_ptr, x0_sb, x0_sl, x0_sk, L0, M0, K0, eps0, w0_ptr, w0_sn, bias0_ptr,
    p00_ptr, p00_sb, p00_sl, p01_ptr, p01_sb, p01_sl, nw0_ptr, nb0_ptr,
    temb0_ptr, temb0_sb, ab0_ptr, as0_ptr, shift_chunk0, scale_chunk0, gate_chunk0,
    res0_ptr, res0_sb, res0_sl, gate0_ptr, gate0_sb, gate0_sl, out0_ptr, out0_sb, out0_sl,
    x1_ptr, x1_sb, x1_sl, x1_sk, L1, M1, K1, eps1, w1_ptr, w1_sn, bias1_ptr,
    p10_ptr, p10_sb, p10_sl, p11_ptr, p11_sb, p11_sl, nw1_ptr, nb1_ptr,
    temb1_ptr, temb1_sb, ab1_ptr, as1_ptr, shift_chunk1, scale_chunk1, gate_chunk1,
    res1_ptr, res1_sb, res1_sl, gate1_ptr, gate1_sb, gate1_sl, out1_ptr, out1_sb, out1_sl,
    N, tiles_n, tiles0, state_ptr, state_sl, sigma_ptr, sigma_next_ptr, cfg,
    GROUPS: tl.constexpr, PROLOGUE: tl.constexpr, IS_RMS: tl.constexpr, ACT: tl.constexpr, FLOW: tl.constexpr,
    GUIDED: tl.constexpr, PAIR: tl.constexpr, MOD: tl.constexpr, GATE: tl.constexpr, FLAGS: tl.constexpr,
    UNIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Grid (tiles0 + tiles1,): problem 0's (row tile, column tile) pairs, then problem 1's
    (GROUPS = 2), column tiles fastest (neighbouring programs read the same rows of x).

    With two problems each program picks its problem's arguments at run time (one copy of the
    tile code, so one set of shared-memory buffers); the options (MOD, GATE, FLAGS) are shared.
    """
    tile = tl.program_id(0)
    if GROUPS == 1:
        _linear_tile(tile, tiles_n, N, x0_ptr, x0_sb, x0_sl, x0_sk, L0, M0, K0, eps0, w0_ptr, w0_sn, bias0_ptr,
                     p00_ptr, p00_sb, p00_sl, p01_ptr, p01_sb, p01_sl, nw0_ptr, nb0_ptr,
                     temb0_ptr, temb0_sb, ab0_ptr, as0_ptr, shift_chunk0, scale_chunk0, gate_chunk0,
                     res0_ptr, res0_sb, res0_sl, gate0_ptr, gate0_sb, gate0_sl, out0_ptr, out0_sb, out0_sl,
                     state_ptr, state_sl, sigma_ptr, sigma_next_ptr, cfg,
                     PROLOGUE, IS_RMS, MOD, GATE, FLAGS, ACT, FLOW, GUIDED, PAIR, BLOCK_M, BLOCK_N, BLOCK_K, INDEX_64)
    else:
        first = tile < tiles0
        tile = tl.where(first, tile, tile - tiles0)
        x_sk = 1 if UNIT_K else tl.where(first, x0_sk, x1_sk)
        _linear_tile(
            tile, tiles_n, N,
            tl.where(first, x0_ptr, x1_ptr), tl.where(first, x0_sb, x1_sb), tl.where(first, x0_sl, x1_sl), x_sk,
            tl.where(first, L0, L1), tl.where(first, M0, M1), tl.where(first, K0, K1), tl.where(first, eps0, eps1),
            tl.where(first, w0_ptr, w1_ptr), tl.where(first, w0_sn, w1_sn), tl.where(first, bias0_ptr, bias1_ptr),
            tl.where(first, p00_ptr, p10_ptr), tl.where(first, p00_sb, p10_sb), tl.where(first, p00_sl, p10_sl),
            tl.where(first, p01_ptr, p11_ptr), tl.where(first, p01_sb, p11_sb), tl.where(first, p01_sl, p11_sl),
            tl.where(first, nw0_ptr, nw1_ptr), tl.where(first, nb0_ptr, nb1_ptr),
            tl.where(first, temb0_ptr, temb1_ptr), tl.where(first, temb0_sb, temb1_sb),
            tl.where(first, ab0_ptr, ab1_ptr), tl.where(first, as0_ptr, as1_ptr),
            tl.where(first, shift_chunk0, shift_chunk1), tl.where(first, scale_chunk0, scale_chunk1),
            tl.where(first, gate_chunk0, gate_chunk1),
            tl.where(first, res0_ptr, res1_ptr), tl.where(first, res0_sb, res1_sb), tl.where(first, res0_sl, res1_sl),
            tl.where(first, gate0_ptr, gate1_ptr), tl.where(first, gate0_sb, gate1_sb),
            tl.where(first, gate0_sl, gate1_sl),
            tl.where(first, out0_ptr, out1_ptr), tl.where(first, out0_sb, out1_sb), tl.where(first, out0_sl, out1_sl),
            state_ptr, state_sl, sigma_ptr, sigma_next_ptr, cfg,
            PROLOGUE, IS_RMS, MOD, GATE, FLAGS, ACT, FLOW, GUIDED, PAIR, BLOCK_M, BLOCK_N, BLOCK_K, INDEX_64)


# --------------------------------------------------------------------------------------------
# Launch configs, side by side per backend
# --------------------------------------------------------------------------------------------
# The GEMMs of the three models at sampling batch sizes are small: 2 x (1..32) images give a few
# dozen (MLP head) to ~16k (backbone at batch 32) rows, N and K of 32..38400. At batch 1 they are
# weight-bandwidth bound, so what matters is enough programs reading the weights: the launcher
# caps BLOCK_M at the row count (rounded up to a power of two, >= 16), and small tiles over N
# are candidates. fp32 inputs use IEEE products (TF32 on CUDA would not match the reference; HIP
# is IEEE anyway). HIP: num_warps counts 64-wide wavefronts; two stages and BLOCK_K <= 64 keep
# (BLOCK_M + BLOCK_N) x BLOCK_K x 2 B x 2 stages within 64 KiB of LDS; matrix_instr_nonkdim 16
# (MFMA 16x16) and kpack 2 are tuning candidates only.
# ``{"LIBRARY": 1}`` stands for the unfused composition with the vendor's GEMM: the tuner times
# it like any config and the winner decides the path (:func:`gemm_path`).
LIBRARY = {"LIBRARY": 1}
_HOST_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "LIBRARY")


def _smem_bytes(config: dict, stages: int) -> int:
    return (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * 2 * stages


INTERPRETER_CONFIG = dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=256, num_warps=4, num_stages=1)
CONFIGS = ConfigTable(
    cuda=[dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
          for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for bk in (64, 128) for warps in (4, 8)
          for stages in (3, 4)
          if _smem_bytes(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), stages) <= 160 * 1024
          and not (warps == 8 and bm * bn < 64 * 64)] + [dict(LIBRARY)],
    hip=[dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=2, **hip)
         for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for bk in (32, 64) for warps in (4, 8)
         for hip in ({}, dict(matrix_instr_nonkdim=16, kpack=2))
         if not (warps == 8 and bm * bn < 64 * 64)] + [dict(LIBRARY)],
    interpreter=dict(INTERPRETER_CONFIG),
    # Untuned starting points: the fused path with 64 x 64 tiles (BLOCK_M and BLOCK_N capped at
    # the problem): at sampling batch sizes more programs read the weights, and the two
    # accumulators of SwiGLU and of the guided final layer stay in registers (64 x 128 tiles
    # took 255 registers on sm_90); three stages on CUDA, two on HIP (LDS).
    defaults=[("cuda", "", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
              ("hip", "", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2))],
    host_keys=_HOST_KEYS,
)


OPS = ConfigTables({"fused_linear": CONFIGS})
candidate_configs, default_config = OPS.candidate_configs, OPS.default_config


def tuning_bucket(shape: dict) -> str:
    """Configs (and the path) depend on the rows (power of two, capped), N, K and what is fused."""
    rows = min(triton.next_power_of_2(max(shape["rows"], 1)), 1 << 16)
    return f"m{rows}_n{shape['n']}_k{shape['k']}_{shape['fusion']}"


def _fusion_name(plan: "_Plan") -> str:
    """Short name of what a launch fuses, part of its tuning bucket (e.g. ``norm-gelu_tanh``)."""
    parts = [("norm", "add_silu")[plan.prologue - 1]] if plan.prologue else []
    parts += [ACTIVATIONS[plan.activation]] if plan.activation else []
    parts += ["flow"] if plan.flow else (["residual"] if any(p.flags & 8 for p in plan.problems) else [])
    return "-".join(parts) or "plain"


def problem_shape(plan: "_Plan") -> dict:
    """The tuning shape of a launch: rows (summed over problems), N, the largest K, fusion."""
    return dict(rows=sum(p.rows for p in plan.problems), n=plan.n, k=max(p.k for p in plan.problems),
                fusion=_fusion_name(plan))


def _fused_config(plan: "_Plan", device: Union[torch.device, DeviceInfo]) -> Optional[dict]:
    """The fused kernel's launch config for this launch, or None for the library path:
    ``NITRO_AR_GEMM`` when set, else the tuned choice of its bucket on ``device``; untuned, the
    fused path (at sampling batch sizes a GEMM is microseconds and the launches it saves
    dominate). Forced to fuse where tuning chose the library, the arch's default config runs."""
    requested = requested_gemm_path()
    if requested == "library":
        return None
    config = get_config("fused_linear", device, tuning_bucket(problem_shape(plan)))
    if not config.get("LIBRARY"):
        return config
    if requested is None:
        return None
    info = device if isinstance(device, DeviceInfo) else device_info(device)
    return CONFIGS.default(info.vendor, info.arch)


def gemm_path(plan: "_Plan", device: Union[torch.device, DeviceInfo]) -> str:
    """``"fused"`` or ``"library"``: the path one launch takes on ``device`` (:func:`_fused_config`)."""
    return "library" if _fused_config(plan, device) is None else "fused"


def launch_plan(plan: "_Plan", block_m: int, block_n: int) -> Tuple[Tuple[int], int, int]:
    """(grid, tiles over N, tiles of problem 0) of one launch; from sizes alone."""
    tiles_n = triton.cdiv(plan.n, block_n)
    tiles = [triton.cdiv(p.rows, block_m) * tiles_n for p in plan.problems]
    return (sum(tiles),), tiles_n, tiles[0]


def _launch(plan: "_Plan", problems: Sequence["_Canonical"], flow: Optional[FlowEpilogue], config: dict) -> None:
    # Tiles no larger than the problem (rounded up to a power of two, >= 16, tl.dot's minimum):
    # a head's 32 output channels or a dozen rows do not pay for 128-wide tiles.
    block_m = min(config["BLOCK_M"], max(16, triton.next_power_of_2(max(p.rows for p in plan.problems))))
    block_n = min(config["BLOCK_N"], max(16, triton.next_power_of_2(plan.n)))
    grid, tiles_n, tiles0 = launch_plan(plan, block_m, block_n)
    if grid[0] == 0:
        return
    args = []
    for index in range(MAX_GROUPS):
        index = min(index, len(problems) - 1)  # GROUPS == 1: problem 0 twice (never read)
        args += problems[index].arguments(plan.problems[index].rows)
    if flow is not None:
        state, sigma, sigma_next, cfg = flow.state, flow.sigma, flow.sigma_next, float(flow.cfg)
        flow_args = [state, state.stride(0), sigma, sigma_next, cfg]
    else:
        anchor = problems[0].x
        flow_args = [anchor, 0, anchor, anchor, 1.0]
    mod, gate, flags = plan.problems[0].meta
    pair = 2 if plan.flow and plan.guided else (1 if ACTIVATIONS[plan.activation] == "gelu_mul" else 0)
    _fused_linear_kernel[grid](
        *args, plan.n, tiles_n, tiles0, *flow_args,
        GROUPS=len(plan.problems), PROLOGUE=plan.prologue, IS_RMS=plan.is_rms, ACT=plan.activation,
        FLOW=flow is not None, GUIDED=plan.guided, PAIR=pair, MOD=mod, GATE=gate, FLAGS=flags,
        UNIT_K=all(p.x.stride(2) == 1 or p.x.shape[2] == 1 for p in problems),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"], INDEX_64=plan.index_64,
        **CONFIGS.launch_options(config))


# --------------------------------------------------------------------------------------------
# Validation: one plan per launch
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ProblemPlan:
    rows: int
    k: int
    meta: Tuple[int, int, int]  # (MOD source, GATE source, FLAGS)

    @property
    def flags(self) -> int:
        return self.meta[2]


@dataclass(frozen=True)
class _Plan:
    problems: Tuple[_ProblemPlan, ...]
    n: int  # output width
    prologue: int  # 0 none, 1 norm, 2 add_silu
    is_rms: bool
    activation: int  # index into reference.ACTIVATIONS
    flow: bool
    guided: bool
    index_64: bool


@dataclass(eq=False)
class _Canonical:
    """A problem's tensors as the kernel reads them: x, out, residual, gate and modulations as
    (B, L, D) views; parameters contiguous."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    eps: float
    shift: Optional[torch.Tensor]  # or the addend of add_silu
    scale: Optional[torch.Tensor]
    norm_weight: Optional[torch.Tensor]
    norm_bias: Optional[torch.Tensor]
    adaln: Optional[AdaLNAffine]
    adaln_bias: Optional[torch.Tensor]
    adaln_scale: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    gate: Optional[torch.Tensor]
    out: torch.Tensor
    meta: Tuple[int, int, int]

    def arguments(self, rows: int) -> list:
        """The kernel arguments of this problem; ``rows`` of its row space (FLOW: batch 0's)."""
        x, anchor = self.x, self.x

        def view(t):  # pointer, batch stride, row stride (absent: x, never read)
            return [anchor, 0, 0] if t is None else [t, t.stride(0), t.stride(1)]

        adaln = self.adaln
        temb = [adaln.temb, adaln.temb.stride(0), self.adaln_bias, self.adaln_scale] if adaln else [anchor, 0, anchor,
                                                                                                      anchor]
        chunks = [c if c is not None else 0 for c in ((adaln.shift_chunk, adaln.scale_chunk, adaln.gate_chunk)
                                                       if adaln else (0, 0, 0))]
        return [x, x.stride(0), x.stride(1), x.stride(2), x.shape[1], rows, x.shape[2], self.eps,
                self.weight, self.weight.stride(0), self.bias if self.bias is not None else anchor,
                *view(self.shift), *view(self.scale),
                self.norm_weight if self.norm_weight is not None else anchor,
                self.norm_bias if self.norm_bias is not None else anchor,
                *temb, *chunks, *view(self.residual), *view(self.gate), *view(self.out)]


def _as_3d(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 2:
        return tensor.unsqueeze(0)
    if tensor.dim() != 3:
        raise KernelInputError(f"{name} must be (B, L, D) or (N, D), got shape {tuple(tensor.shape)}")
    return tensor


def _unit_stride(name: str, tensor: torch.Tensor) -> None:
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise KernelInputError(f"{name} must have unit stride over its last dim (got strides {tuple(tensor.stride())}); "
                               f"call .contiguous() on it")


def _same_place(name: str, tensor: torch.Tensor, x: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise KernelInputError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.device != x.device:
        raise KernelInputError(f"{name} is on {tensor.device} but x is on {x.device}")
    if tensor.dtype not in dtypes:
        raise KernelInputError(f"{name} has dtype {tensor.dtype}; expected {' or '.join(map(str, dtypes))}")


def _parameter(name: str, tensor: Optional[torch.Tensor], shape: Tuple[int, ...], x: torch.Tensor):
    """A parameter on x's device, x's dtype or float32, as the contiguous tensor the kernel reads."""
    if tensor is None:
        return None
    _same_place(name, tensor, x, (x.dtype, torch.float32))
    if tuple(tensor.shape) != shape:
        raise KernelInputError(f"{name} has shape {tuple(tensor.shape)}; expected {shape}")
    return tensor.contiguous()


def _row_view(name: str, tensor: torch.Tensor, batch: int, length: int, dim: int, x: torch.Tensor) -> torch.Tensor:
    """A per-token (B, L, D) or per-batch ((B, D) / (B, 1, D)) activation as a (B, L, D) view
    (per batch: stride 0 over L; a leading 1 over B broadcasts with stride 0)."""
    _same_place(name, tensor, x, (x.dtype,))
    _unit_stride(name, tensor)
    if tensor.dim() == 2 and tuple(tensor.shape) == (length, dim) and batch == 1:
        return tensor.unsqueeze(0)
    if tensor.dim() == 2 and tuple(tensor.shape) == (batch, dim):
        return tensor.unsqueeze(1).expand(batch, length, dim)
    if tensor.dim() == 3 and tensor.shape[2] == dim and tensor.shape[0] in (1, batch) and tensor.shape[1] in (1, length):
        return tensor.expand(batch, length, dim)
    raise KernelInputError(f"{name} has shape {tuple(tensor.shape)}; expected ({batch}, {length}, {dim}) per token, "
                           f"({batch}, {dim}) or ({batch}, 1, {dim}) per batch (leading dims of 1 broadcast)")


def _adaln(name: str, adaln: AdaLNAffine, batch: int, dim: int, x: torch.Tensor, fields: Sequence[str]):
    if not isinstance(adaln, AdaLNAffine):
        raise KernelInputError(f"{name} must be an AdaLNAffine, got {type(adaln).__name__}")
    _same_place(f"{name}.temb", adaln.temb, x, (x.dtype,))
    _unit_stride(f"{name}.temb", adaln.temb)
    if adaln.bias.dim() != 2 or adaln.bias.shape[1] != dim:
        raise KernelInputError(f"{name}.bias has shape {tuple(adaln.bias.shape)}; expected (K, {dim})")
    chunks = adaln.bias.shape[0]
    bias = _parameter(f"{name}.bias", adaln.bias, (chunks, dim), x)
    scale = _parameter(f"{name}.scale", adaln.scale, (chunks, dim), x)
    if tuple(adaln.temb.shape) != (batch, chunks * dim):
        raise KernelInputError(f"{name}.temb has shape {tuple(adaln.temb.shape)}; expected ({batch}, {chunks} * {dim})")
    for field in fields:
        index = getattr(adaln, field)
        if index is None or not 0 <= index < chunks:
            raise KernelInputError(f"{name}.{field}={index!r} must be a chunk index in [0, {chunks})")
    return bias, scale


def _canonical(index: int, problem: LinearProblem, activation: Optional[str], n_out: Optional[int],
               flow: Optional[FlowEpilogue]) -> Tuple[_Canonical, int, int]:
    """Validate one problem; return (its canonical tensors, its prologue code, its is_rms)."""
    label = f"problems[{index}]." if index is not None else ""
    x = problem.x
    if not isinstance(x, torch.Tensor):
        raise KernelInputError(f"{label}x must be a tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{label}x has dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    x3 = _as_3d(f"{label}x", x)
    batch, length, k = x3.shape
    weight = problem.weight
    _same_place(f"{label}weight", weight, x, (x.dtype,))
    if weight.dim() != 2 or weight.shape[1] != k:
        raise KernelInputError(f"{label}weight has shape {tuple(weight.shape)}; expected (N, {k})")
    rows_w = weight.shape[0]
    if activation == "gelu_mul" and rows_w % 2:
        raise KernelInputError(f"{label}weight has {rows_w} rows; activation 'gelu_mul' needs [W_g; W_v] (an even count)")
    n = rows_w // 2 if activation == "gelu_mul" else rows_w
    if n_out is not None and n != n_out:
        raise KernelInputError(f"{label}weight gives {n} output columns; the group's problem 0 gives {n_out}")
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    bias = _parameter(f"{label}bias", problem.bias, (rows_w,), x)

    shift = scale = norm_weight = norm_bias = adaln = adaln_bias = adaln_scale = None
    mod = _S_NONE.value
    prologue, eps, is_rms, kind = problem.prologue, 0.0, False, 0
    if isinstance(prologue, NormPrologue):
        kind, eps = 1, float(prologue.eps)
        if prologue.norm not in ("layer", "rms"):
            raise KernelInputError(f"{label}prologue.norm must be 'layer' or 'rms', got {prologue.norm!r}")
        is_rms = prologue.norm == "rms"
        if not math.isfinite(eps) or eps < 0:
            raise KernelInputError(f"{label}prologue.eps must be a finite number >= 0, got {prologue.eps!r}")
        norm_weight = _parameter(f"{label}prologue.weight", prologue.weight, (k,), x)
        norm_bias = _parameter(f"{label}prologue.bias", prologue.bias, (k,), x)
        if norm_bias is not None and is_rms:
            raise KernelInputError(f"{label}prologue.bias given with norm='rms'; RMSNorm has no bias")
        if (prologue.shift is None) != (prologue.scale is None):
            raise KernelInputError(f"{label}prologue.shift and prologue.scale go together: give both or neither")
        if prologue.shift is not None:
            if prologue.adaln is not None:
                raise KernelInputError(f"{label}prologue: shift/scale given both as tensors and as adaln chunks")
            shift = _row_view(f"{label}prologue.shift", prologue.shift, batch, length, k, x)
            scale = _row_view(f"{label}prologue.scale", prologue.scale, batch, length, k, x)
            mod = _S_TENSOR.value
        elif prologue.adaln is not None:
            adaln = prologue.adaln
            adaln_bias, adaln_scale = _adaln(f"{label}prologue.adaln", adaln, batch, k, x, ("shift_chunk", "scale_chunk"))
            mod = _S_ADALN.value
    elif isinstance(prologue, AddSiLUPrologue):
        kind = 2
        shift = _row_view(f"{label}prologue.addend", prologue.addend, batch, length, k, x)
    elif prologue is not None:
        raise KernelInputError(f"{label}prologue must be a NormPrologue, an AddSiLUPrologue or None, "
                               f"got {type(prologue).__name__}")

    gate_source, gate, residual = _S_NONE.value, None, None
    if problem.residual is not None:
        if flow is not None:
            raise KernelInputError(f"{label}residual cannot be combined with the flow epilogue")
        residual = _row_view(f"{label}residual", problem.residual, batch, length, n, x)
        if isinstance(problem.gate, AdaLNAffine):
            gate_adaln = problem.gate
            if adaln is not None and any(getattr(gate_adaln, f) is not getattr(adaln, f) for f in ("temb", "bias", "scale")):
                raise KernelInputError(f"{label}gate and prologue.adaln must be chunks of one AdaLNAffine (the same "
                                       f"temb, bias and scale)")
            gate_bias, gate_scale = _adaln(f"{label}gate", gate_adaln, batch, n, x, ("gate_chunk",))
            if adaln is None:
                adaln, adaln_bias, adaln_scale = gate_adaln, gate_bias, gate_scale
            else:
                adaln = dataclasses.replace(adaln, gate_chunk=gate_adaln.gate_chunk)
            gate_source = _S_ADALN.value
        elif problem.gate is not None:
            gate = _row_view(f"{label}gate", problem.gate, batch, length, n, x)
            gate_source = _S_TENSOR.value
    elif problem.gate is not None:
        raise KernelInputError(f"{label}a gate needs a residual: out = residual + gate * y")

    out_shape = (flow.state.shape[0], n) if flow is not None else (batch, length, n)
    out = problem.out
    if out is not None:
        _same_place(f"{label}out", out, x, (x.dtype,))
        _unit_stride(f"{label}out", out)
        expected = out_shape if flow is not None else (x.shape[:-1] + (n,))
        if tuple(out.shape) != tuple(expected):
            raise KernelInputError(f"{label}out has shape {tuple(out.shape)}; expected {tuple(expected)}")
    else:
        out = torch.empty(out_shape, device=x.device, dtype=x.dtype)
    out3 = out.unsqueeze(0) if flow is not None else _as_3d(f"{label}out", out)
    flags = ((1 if bias is not None else 0) | (2 if norm_weight is not None else 0) | (4 if norm_bias is not None else 0)
             | (8 if residual is not None else 0))
    canonical = _Canonical(x3, weight, bias, eps, shift, scale, norm_weight, norm_bias, adaln, adaln_bias, adaln_scale,
                           residual, gate, out3, (mod, gate_source, flags))
    return canonical, kind, is_rms


def _span(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else storage_span(tensor.shape, tensor.stride())


def _prepare(problems: Sequence[LinearProblem], activation: Optional[str], flow: Optional[FlowEpilogue]):
    """Validate a launch; return (plan, canonical problems)."""
    if not 1 <= len(problems) <= MAX_GROUPS:
        raise KernelInputError(f"a launch takes 1 to {MAX_GROUPS} problems, got {len(problems)}")
    if activation not in ACTIVATIONS:
        raise KernelInputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for index, problem in enumerate(problems):
        if not isinstance(problem, LinearProblem):
            raise KernelInputError(f"problems[{index}] must be a LinearProblem, got {type(problem).__name__}")
    canonical, kinds = [], set()
    n_out = None
    first = problems[0].x
    for index, problem in enumerate(problems):
        entry, kind, is_rms = _canonical(index if len(problems) > 1 else None, problem, activation, n_out, flow)
        if entry.x.device != first.device or entry.x.dtype != first.dtype:
            raise KernelInputError(f"problems[{index}].x is {entry.x.dtype} on {entry.x.device}; problem 0 is "
                                   f"{first.dtype} on {first.device}")
        n_out = entry.out.shape[2]
        canonical.append(entry)
        kinds.add((kind, is_rms))
    if len(kinds) > 1:
        raise KernelInputError("the problems of one launch must share the prologue kind (none, norm of one kind, "
                               "add_silu)")
    (kind, is_rms), = kinds
    guided = False
    if flow is not None:
        if len(problems) > 1 or activation is not None:
            raise KernelInputError("the flow epilogue takes one problem and no activation")
        x3, state = canonical[0].x, flow.state
        _same_place("flow.state", state, first, (first.dtype,))
        if state.dim() != 2 or tuple(state.shape) != (x3.shape[1], n_out):
            raise KernelInputError(f"flow.state has shape {tuple(state.shape)}; expected ({x3.shape[1]}, {n_out}) "
                                   f"(one row per token of x (G, R, K))")
        _unit_stride("flow.state", state)
        if x3.shape[0] not in (1, 2):
            raise KernelInputError(f"with the flow epilogue x is (G, R, K) with G = 2 ([uncond; cond]) or 1, "
                                   f"got {tuple(x3.shape)}")
        guided = x3.shape[0] == 2
        cfg = float(flow.cfg)
        if not math.isfinite(cfg) or (not guided and cfg != 1.0):
            raise KernelInputError(f"flow.cfg={flow.cfg!r}: expected a finite number, 1 unless x holds [uncond; cond]")
        for name in ("sigma", "sigma_next"):
            sigma = getattr(flow, name)
            if not isinstance(sigma, torch.Tensor) or sigma.numel() != 1 or sigma.dtype != torch.float32 \
                    or sigma.device != first.device:
                raise KernelInputError(f"flow.{name} must be a 0-dim float32 tensor on {first.device}")
    spans = []
    for entry in canonical:
        spans += [_span(t) for t in (entry.x, entry.weight, entry.shift, entry.scale, entry.residual, entry.gate,
                                     entry.out)]
        if entry.adaln is not None:
            spans.append(_span(entry.adaln.temb))
    if flow is not None:
        spans.append(_span(flow.state))
    # FLOW: rows are the R tokens of batch 0 (batch 1 read at + stride_b).
    plan = _Plan(
        problems=tuple(_ProblemPlan(e.x.shape[1] if flow is not None else e.x.shape[0] * e.x.shape[1], e.x.shape[2],
                                    e.meta) for e in canonical),
        n=n_out, prologue=kind, is_rms=is_rms, activation=ACTIVATIONS.index(activation), flow=flow is not None,
        guided=guided, index_64=needs_int64(*spans))
    return plan, canonical


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def _library(problem: LinearProblem, entry: "_Canonical", activation: Optional[str], flow: Optional[FlowEpilogue],
             backend: str) -> torch.Tensor:
    """The library path of one problem: the norm prologue through the modulated-norm kernel, the
    GEMM through ``F.linear`` (cuBLAS / hipBLASLt), the epilogue in torch (the Euler step through
    the flow-step kernel). Differentiable: this is also what runs under autograd."""
    from .flow_step import flow_step
    from .modulated_norm import modulated_norm

    prologue, a = problem.prologue, entry.x
    if isinstance(prologue, NormPrologue):
        adaln = None if prologue.adaln is None else dataclasses.replace(prologue.adaln, gate_chunk=None)
        a = modulated_norm(entry.x, norm=prologue.norm, eps=prologue.eps, weight=prologue.weight, bias=prologue.bias,
                           shift=entry.shift, scale=entry.scale, adaln=adaln, backend=backend)
    elif isinstance(prologue, AddSiLUPrologue):
        a = torch.nn.functional.silu(a + entry.shift)
    y = reference.activation(torch.nn.functional.linear(a, problem.weight, problem.bias), activation)
    if flow is not None:
        y = flow_step(flow.state, y.flatten(0, 1), flow.sigma, flow.sigma_next, flow.cfg, backend=backend)
    elif entry.residual is not None:
        gate = problem.gate
        if isinstance(gate, AdaLNAffine):
            gate = reference.adaln_affine(gate.temb, gate.bias, gate.scale)[:, gate.gate_chunk, None]
        else:
            gate = entry.gate
        y = entry.residual + y if gate is None else torch.addcmul(entry.residual, gate, y)
    if problem.out is not None:
        problem.out.copy_(y.reshape(problem.out.shape))
        return problem.out
    return y if flow is not None or problem.x.dim() == 3 else y[0]


def _needs_grad(problems: Sequence[LinearProblem], flow: Optional[FlowEpilogue]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = []
    for p in problems:
        tensors += [p.x, p.weight, p.bias, p.residual, p.gate if isinstance(p.gate, torch.Tensor) else None]
        if isinstance(p.prologue, NormPrologue):
            tensors += [p.prologue.weight, p.prologue.bias, p.prologue.shift, p.prologue.scale]
        elif isinstance(p.prologue, AddSiLUPrologue):
            tensors.append(p.prologue.addend)
    if flow is not None:
        tensors.append(flow.state)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def grouped_linear(problems: Sequence[LinearProblem], *, activation: Optional[str] = None,
                   flow: Optional[FlowEpilogue] = None, backend: Optional[str] = None,
                   config: Optional[dict] = None) -> List[torch.Tensor]:
    """One launch for up to two :class:`LinearProblem` sharing the output width, activation and
    prologue kind (e.g. a joint block's image and text streams), and their options (bias, norm
    weight and bias, residual, where modulations and gates come from); problems whose options
    differ run one launch each. Arguments as :func:`fused_linear`; returns each problem's
    output (its ``out`` when given).

    ``config``: a launch config to use instead of the tuned / default one (the tuner's).
    """
    plan, canonical = _prepare(problems, activation, flow)
    if len({problem.meta for problem in plan.problems}) > 1:  # options differ: one launch each
        return [grouped_linear([problem], activation=activation, flow=flow, backend=backend, config=config)[0]
                for problem in problems]
    device = canonical[0].x.device
    backend = select_backend(device, backend)
    if backend not in KERNEL_BACKENDS:
        return reference.linear_problems(problems, activation, flow)
    if config is None and not _needs_grad(problems, flow):
        config = _fused_config(plan, device)
    if config is None or config.get("LIBRARY"):
        return [_library(p, entry, activation, flow, backend) for p, entry in zip(problems, canonical)]
    _launch(plan, canonical, flow, config)
    results = []
    for problem, entry in zip(problems, canonical):
        if problem.out is not None:
            results.append(problem.out)
        elif flow is not None:
            results.append(entry.out[0])
        else:
            results.append(entry.out if problem.x.dim() == 3 else entry.out[0])
    return results


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    prologue: Union[NormPrologue, AddSiLUPrologue, None] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    gate: Union[torch.Tensor, AdaLNAffine, None] = None,
    flow: Optional[FlowEpilogue] = None,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``residual + gate * act(prologue(x) @ weight^T + bias)``, or a flow step, in one launch.

    Args:
        x: (B, L, K) or (N, K), float32 / float16 / bfloat16; any strides (chunks, broadcast
            views, channel-major (B, C, H*W) images read as (B, H*W, C)).
        weight: (N, K) in x's dtype (``activation="gelu_mul"``: (2H, K) = [W_g; W_v], output H).
        bias: (N,) (or (2H,)), x's dtype or float32, or None.
        prologue: :class:`NormPrologue` (modulated LayerNorm/RMSNorm of x; per-token or
            per-batch shift / scale, or AdaLN chunks) or :class:`AddSiLUPrologue` (``SiLU(x +
            addend)``), or None.
        activation: None, ``"gelu_tanh"``, ``"silu"`` or ``"gelu_mul"``.
        residual: the output's shape (or per batch / broadcast: leading 1s), x's dtype.
        gate: per token or per batch like residual, or an :class:`AdaLNAffine` whose
            ``gate_chunk`` is the gate (its temb, bias and scale those of ``prologue.adaln``
            when both are given); needs ``residual``.
        flow: :class:`FlowEpilogue`: x is (G, R, K), G = 2 ([uncond; cond]) or 1, and the
            result the (R, N) Euler step of ``flow.state`` with the guided velocity.
        out: where to write the result (x's dtype, the output's shape, unit stride over N; any
            other strides, e.g. a column slice of a concatenation buffer).
        backend: ``"triton"`` / ``"interpret"`` run the kernel, ``"torch"`` / ``"reference"``
            the eager composition; default :func:`nitro_ar.kernels.backend.select_backend`.
    Returns:
        (B, L, N) (or (N_rows, N); (R, N) with ``flow``) in x's dtype.
    Raises:
        KernelInputError (a ValueError) naming the argument: shapes, dtypes, devices, strides,
        inconsistent options.
    """
    problem = LinearProblem(x, weight, bias, prologue, residual, gate, out)
    return grouped_linear([problem], activation=activation, flow=flow, backend=backend)[0]
