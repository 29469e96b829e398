"""Fused joint (MMDiT) attention with Alternating Subregion Attention (ASA), forward and backward.

What the reference (:func:`nitro_ar.kernels.reference.fused_joint_attention`) computes with per-head q/k RMSNorm,
``cat``, two ``rearrange`` copies per stream, SDPA and the inverse copies, one kernel computes
straight from the projection outputs:

- For each ASA group g, ``softmax(q k^T / sqrt(d)) v`` over the group's image members followed by
  its text members, where position p of a stream belongs to group ``(p // n) % s``. The
  grouping is index arithmetic on strided (B, L, H, d) views (e.g. one fused QKV projection per
  stream viewed (B, L, 3, H, d) and unbound); nothing is concatenated or rearranged.
- Optionally the per-head RMSNorm of q and k (one weight per stream) is applied on load.
- Outputs land at their original positions, image and text separately, as contiguous
  (B, L, H, d) tensors; the text queries can be skipped entirely (context-pre-only block).
- Self-attention over one stream is the degenerate case with an empty text stream.

Kernels: a flash-style forward (online softmax in base 2, fp32 accumulation, one program per
(batch, group, head) and query block) that also stores the log-sum-exp; a backward ``dq`` kernel
that first computes ``delta = rowsum(dO * O)`` for its query block, then a ``dk/dv`` kernel that
recomputes the probabilities from the log-sum-exp. Fused-norm weight gradients are per-program
partial sums reduced on the host (deterministic, no atomics).

Offsets are int32 unless the launch plan finds a tensor spanning 2^31 elements or more (from
sizes and strides alone): then ``INDEX_64`` widens batch indices and positions before they meet
a stride. Per-backend launch configs (:class:`~nitro_ar.kernels.launch.ConfigTable`) are tuned as
the ops ``joint_attention`` (forward) and ``joint_attention_backward`` (problems:
:mod:`nitro_ar.kernels.tuning_problems`). The eager reference is
:func:`nitro_ar.kernels.reference.fused_joint_attention`.

File order: kernels, launch configs and launchers, autograd Function, validation, public functions.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import reference
from .backend import KERNEL_BACKENDS, select_backend
from .errors import KernelInputError
from .launch import ConfigTable, ConfigTables, needs_int64, storage_span
from .offsets import widen
from .tuning import get_config

__all__ = [
    "joint_attention",
    "self_attention",
    "joint_attention_forward",
    "joint_attention_backward",
    "JointAttentionFunction",
    "FORWARD_CONFIGS",
    "BACKWARD_CONFIGS",
    "candidate_configs",
    "default_config",
    "tuning_bucket",
]

LOG2_E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _member_positions(members, group, GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, INDEX_64: tl.constexpr):
    """Stream positions of a group's members: member j of group g sits at (j // n) * s * n + g * n + j % n;
    in the plan's index width, so ``position * stride`` cannot wrap."""
    members = widen(members, INDEX_64)
    return (members // GROUP_LEN) * (GROUPS * GROUP_LEN) + group * GROUP_LEN + members % GROUP_LEN


@triton.jit
def _head_base(ptr, batch, head, stride_b, stride_h):
    """Pointer to (batch, position 0, head, channel 0) of a (B, L, H, d) tensor (``batch`` widened
    by the caller)."""
    return ptr + batch * stride_b + head * stride_h


@triton.jit
def _pick(is_img, img_value, txt_value):
    """The image-stream value for image programs, the text-stream value otherwise (scalar select)."""
    return tl.where(is_img, img_value, txt_value)


@triton.jit
def _query_block(pid_bgh, pid_m, len_img, len_txt, num_heads,
                 GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, BLOCK_M: tl.constexpr, INDEX_64: tl.constexpr):
    """Decode a program of the (batch, group, head) x query-block grid (image blocks first):
    its batch, group and head, each stream's group length, whether it holds image queries, and
    the stream positions (with validity) of its BLOCK_M queries."""
    batch = widen(pid_bgh // (GROUPS * num_heads), INDEX_64)
    group = (pid_bgh // num_heads) % GROUPS
    head = pid_bgh % num_heads
    group_img = len_img // GROUPS
    group_txt = len_txt // GROUPS
    img_blocks = tl.cdiv(group_img, BLOCK_M)
    is_img = pid_m < img_blocks
    members = _pick(is_img, pid_m, pid_m - img_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = members < _pick(is_img, group_img, group_txt)
    positions = _member_positions(members, group, GROUPS, GROUP_LEN, INDEX_64)
    return batch, group, head, group_img, group_txt, is_img, positions, valid


@triton.jit
def _load_rows(base, positions, stride_l, valid, HEAD_DIM: tl.constexpr):
    """Rows ``positions`` of one head (BLOCK, HEAD_DIM); rows outside the group read as zeros."""
    cols = tl.arange(0, HEAD_DIM)
    return tl.load(base + positions[:, None] * stride_l + cols[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _rms_norm_rows(x, weight, eps, HEAD_DIM: tl.constexpr):
    """Per-row RMSNorm as the reference computes it: fp32 statistics, ``(x * rstd) * w``, cast back."""
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)
    return (xf * rstd[:, None] * weight[None, :]).to(x.dtype)


@triton.jit
def _rms_norm_rows_backward(x, grad, weight, eps, HEAD_DIM: tl.constexpr):
    """Given dL/dy for y = w * x * rstd(x) per row: (dL/dx in fp32, column sums of dL/dw)."""
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)
    x_hat = xf * rstd[:, None]
    grad_w = grad * weight[None, :]
    grad_x = rstd[:, None] * (grad_w - x_hat * (tl.sum(grad_w * x_hat, axis=1) / HEAD_DIM)[:, None])
    return grad_x, tl.sum(grad * x_hat, axis=0)


@triton.jit
def _load_weight(ptr, HEAD_DIM: tl.constexpr):
    return tl.load(ptr + tl.arange(0, HEAD_DIM)).to(tl.float32)


@triton.jit
def _fwd_attend_stream(
    acc, m_i, l_i, q,
    k_base, v_base, stride_k_l, stride_v_l, k_norm_ptr,
    group, group_size, qk_scale, eps,
    GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QK_NORM: tl.constexpr, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Online-softmax update of one query block with every key block of one stream's group members."""
    if HAS_QK_NORM:
        k_weight = _load_weight(k_norm_ptr, HEAD_DIM)
    for start in range(0, group_size, BLOCK_N):
        members = start + tl.arange(0, BLOCK_N)
        valid = members < group_size
        positions = _member_positions(members, group, GROUPS, GROUP_LEN, INDEX_64)
        k = _load_rows(k_base, positions, stride_k_l, valid, HEAD_DIM)
        if HAS_QK_NORM:
            k = _rms_norm_rows(k, k_weight, eps, HEAD_DIM)
        v = _load_rows(v_base, positions, stride_v_l, valid, HEAD_DIM)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _joint_attention_fwd_kernel(
    q_img_ptr, k_img_ptr, v_img_ptr, q_txt_ptr, k_txt_ptr, v_txt_ptr,
    out_img_ptr, out_txt_ptr, lse_img_ptr, lse_txt_ptr,
    q_norm_img_ptr, k_norm_img_ptr, q_norm_txt_ptr, k_norm_txt_ptr,
    stride_qi_b, stride_qi_l, stride_qi_h, stride_ki_b, stride_ki_l, stride_ki_h,
    stride_vi_b, stride_vi_l, stride_vi_h, stride_qt_b, stride_qt_l, stride_qt_h,
    stride_kt_b, stride_kt_l, stride_kt_h, stride_vt_b, stride_vt_l, stride_vt_h,
    len_img, len_txt, num_heads, qk_scale, eps,
    GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QK_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr,
):
    # Axis 0: (batch, group, head), the large one; axis 1: image query blocks, then text ones.
    pid_bgh = tl.program_id(0)
    pid_m = tl.program_id(1)
    batch, group, head, group_img, group_txt, is_img, positions, valid = _query_block(
        pid_bgh, pid_m, len_img, len_txt, num_heads, GROUPS, GROUP_LEN, BLOCK_M, INDEX_64)

    # This program's query stream.
    q_base = _pick(is_img, _head_base(q_img_ptr, batch, head, stride_qi_b, stride_qi_h),
                   _head_base(q_txt_ptr, batch, head, stride_qt_b, stride_qt_h))
    stride_q_l = _pick(is_img, stride_qi_l, stride_qt_l)
    q_len = _pick(is_img, len_img, len_txt)
    # Outputs are contiguous (B, L, H, d); the log-sum-exp is (B, H, L).
    out_base = _pick(is_img, out_img_ptr, out_txt_ptr) + (batch * q_len * num_heads + head) * HEAD_DIM
    lse_base = _pick(is_img, lse_img_ptr, lse_txt_ptr) + (batch * num_heads + head) * q_len

    q = _load_rows(q_base, positions, stride_q_l, valid, HEAD_DIM)
    if HAS_QK_NORM:
        q = _rms_norm_rows(q, _load_weight(_pick(is_img, q_norm_img_ptr, q_norm_txt_ptr), HEAD_DIM), eps, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, m_i, l_i = _fwd_attend_stream(
        acc, m_i, l_i, q, _head_base(k_img_ptr, batch, head, stride_ki_b, stride_ki_h),
        _head_base(v_img_ptr, batch, head, stride_vi_b, stride_vi_h), stride_ki_l, stride_vi_l, k_norm_img_ptr,
        group, group_img, qk_scale, eps, GROUPS, GROUP_LEN, HEAD_DIM, HAS_QK_NORM, BLOCK_N, INDEX_64)
    acc, m_i, l_i = _fwd_attend_stream(
        acc, m_i, l_i, q, _head_base(k_txt_ptr, batch, head, stride_kt_b, stride_kt_h),
        _head_base(v_txt_ptr, batch, head, stride_vt_b, stride_vt_h), stride_kt_l, stride_vt_l, k_norm_txt_ptr,
        group, group_txt, qk_scale, eps, GROUPS, GROUP_LEN, HEAD_DIM, HAS_QK_NORM, BLOCK_N, INDEX_64)

    out = acc / l_i[:, None]
    cols = tl.arange(0, HEAD_DIM)
    tl.store(out_base + positions[:, None] * (num_heads * HEAD_DIM) + cols[None, :],
             out.to(out_base.dtype.element_ty), mask=valid[:, None])
    tl.store(lse_base + positions, m_i + tl.math.log2(l_i), mask=valid)


@triton.jit
def _bwd_dq_stream(
    dq, q, do, lse, delta,
    k_base, v_base, stride_k_l, stride_v_l, k_norm_ptr,
    group, group_size, qk_scale, eps,
    GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QK_NORM: tl.constexpr, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Accumulate dS @ K (with dS the score gradient) of one query block over one stream's keys."""
    if HAS_QK_NORM:
        k_weight = _load_weight(k_norm_ptr, HEAD_DIM)
    for start in range(0, group_size, BLOCK_N):
        members = start + tl.arange(0, BLOCK_N)
        valid = members < group_size
        positions = _member_positions(members, group, GROUPS, GROUP_LEN, INDEX_64)
        k = _load_rows(k_base, positions, stride_k_l, valid, HEAD_DIM)
        if HAS_QK_NORM:
            k = _rms_norm_rows(k, k_weight, eps, HEAD_DIM)
        v = _load_rows(v_base, positions, stride_v_l, valid, HEAD_DIM)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.where(valid[None, :], tl.math.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    return dq


@triton.jit
def _joint_attention_bwd_dq_kernel(
    q_img_ptr, k_img_ptr, v_img_ptr, q_txt_ptr, k_txt_ptr, v_txt_ptr,
    out_img_ptr, out_txt_ptr, dout_img_ptr, dout_txt_ptr, lse_img_ptr, lse_txt_ptr,
    delta_img_ptr, delta_txt_ptr, dq_img_ptr, dq_txt_ptr,
    q_norm_img_ptr, k_norm_img_ptr, q_norm_txt_ptr, k_norm_txt_ptr, dq_norm_partial_ptr,
    stride_qi_b, stride_qi_l, stride_qi_h, stride_ki_b, stride_ki_l, stride_ki_h,
    stride_vi_b, stride_vi_l, stride_vi_h, stride_qt_b, stride_qt_l, stride_qt_h,
    stride_kt_b, stride_kt_l, stride_kt_h, stride_vt_b, stride_vt_l, stride_vt_h,
    stride_doi_b, stride_doi_l, stride_doi_h, stride_dot_b, stride_dot_l, stride_dot_h,
    len_img, len_txt, num_heads, sm_scale, qk_scale, eps,
    GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QK_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr,
):
    # Same grid as the forward: one program per (batch, group, head) and query block.
    pid_bgh = tl.program_id(0)
    pid_m = tl.program_id(1)
    batch, group, head, group_img, group_txt, is_img, positions, valid = _query_block(
        pid_bgh, pid_m, len_img, len_txt, num_heads, GROUPS, GROUP_LEN, BLOCK_M, INDEX_64)

    q_base = _pick(is_img, _head_base(q_img_ptr, batch, head, stride_qi_b, stride_qi_h),
                   _head_base(q_txt_ptr, batch, head, stride_qt_b, stride_qt_h))
    stride_q_l = _pick(is_img, stride_qi_l, stride_qt_l)
    do_base = _pick(is_img, _head_base(dout_img_ptr, batch, head, stride_doi_b, stride_doi_h),
                    _head_base(dout_txt_ptr, batch, head, stride_dot_b, stride_dot_h))
    stride_do_l = _pick(is_img, stride_doi_l, stride_dot_l)
    q_len = _pick(is_img, len_img, len_txt)
    # out and dq are contiguous (B, L, H, d); lse and delta are (B, H, L).
    row_offset = (batch * q_len * num_heads + head) * HEAD_DIM
    out_base = _pick(is_img, out_img_ptr, out_txt_ptr) + row_offset
    dq_base = _pick(is_img, dq_img_ptr, dq_txt_ptr) + row_offset
    stat_offset = (batch * num_heads + head) * q_len
    lse_base = _pick(is_img, lse_img_ptr, lse_txt_ptr) + stat_offset
    delta_base = _pick(is_img, delta_img_ptr, delta_txt_ptr) + stat_offset

    q_raw = _load_rows(q_base, positions, stride_q_l, valid, HEAD_DIM)
    if HAS_QK_NORM:
        q_weight = _load_weight(_pick(is_img, q_norm_img_ptr, q_norm_txt_ptr), HEAD_DIM)
        q = _rms_norm_rows(q_raw, q_weight, eps, HEAD_DIM)
    else:
        q = q_raw
    do = _load_rows(do_base, positions, stride_do_l, valid, HEAD_DIM)
    out = _load_rows(out_base, positions, num_heads * HEAD_DIM, valid, HEAD_DIM)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), axis=1)
    tl.store(delta_base + positions, delta, mask=valid)
    lse = tl.load(lse_base + positions, mask=valid, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _bwd_dq_stream(
        dq, q, do, lse, delta, _head_base(k_img_ptr, batch, head, stride_ki_b, stride_ki_h),
        _head_base(v_img_ptr, batch, head, stride_vi_b, stride_vi_h), stride_ki_l, stride_vi_l, k_norm_img_ptr,
        group, group_img, qk_scale, eps, GROUPS, GROUP_LEN, HEAD_DIM, HAS_QK_NORM, BLOCK_N, INDEX_64)
    dq = _bwd_dq_stream(
        dq, q, do, lse, delta, _head_base(k_txt_ptr, batch, head, stride_kt_b, stride_kt_h),
        _head_base(v_txt_ptr, batch, head, stride_vt_b, stride_vt_h), stride_kt_l, stride_vt_l, k_norm_txt_ptr,
        group, group_txt, qk_scale, eps, GROUPS, GROUP_LEN, HEAD_DIM, HAS_QK_NORM, BLOCK_N, INDEX_64)
    dq = dq * sm_scale

    cols = tl.arange(0, HEAD_DIM)
    if HAS_QK_NORM:
        dq, dq_weight = _rms_norm_rows_backward(q_raw, dq, q_weight, eps, HEAD_DIM)
        partial = widen(pid_bgh, INDEX_64) * tl.num_programs(1) + pid_m
        tl.store(dq_norm_partial_ptr + partial * HEAD_DIM + cols, dq_weight)
    tl.store(dq_base + positions[:, None] * (num_heads * HEAD_DIM) + cols[None, :],
             dq.to(dq_base.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _bwd_dkdv_stream(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, stride_q_l, stride_do_l, q_norm_ptr,
    group, group_size, qk_scale, eps,
    GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QK_NORM: tl.constexpr, BLOCK_M: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Accumulate dK (unscaled) and dV of one key block over one stream's query blocks."""
    if HAS_QK_NORM:
        q_weight = _load_weight(q_norm_ptr, HEAD_DIM)
    for start in range(0, group_size, BLOCK_M):
        members = start + tl.arange(0, BLOCK_M)
        valid = members < group_size
        positions = _member_positions(members, group, GROUPS, GROUP_LEN, INDEX_64)
        q = _load_rows(q_base, positions, stride_q_l, valid, HEAD_DIM)
        if HAS_QK_NORM:
            q = _rms_norm_rows(q, q_weight, eps, HEAD_DIM)
        do = _load_rows(do_base, positions, stride_do_l, valid, HEAD_DIM)
        # An infinite log-sum-exp gives zero probability to the padding queries.
        lse = tl.load(lse_base + positions, mask=valid, other=float("inf"))
        delta = tl.load(delta_base + positions, mask=valid, other=0.0)
        scores_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        p_t = tl.math.exp2(scores_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")
    return dk, dv


@triton.jit
def _joint_attention_bwd_dkdv_kernel(
    q_img_ptr, k_img_ptr, v_img_ptr, q_txt_ptr, k_txt_ptr, v_txt_ptr,
    dout_img_ptr, dout_txt_ptr, lse_img_ptr, lse_txt_ptr, delta_img_ptr, delta_txt_ptr,
    dk_img_ptr, dv_img_ptr, dk_txt_ptr, dv_txt_ptr,
    q_norm_img_ptr, k_norm_img_ptr, q_norm_txt_ptr, k_norm_txt_ptr, dk_norm_partial_ptr,
    stride_qi_b, stride_qi_l, stride_qi_h, stride_ki_b, stride_ki_l, stride_ki_h,
    stride_vi_b, stride_vi_l, stride_vi_h, stride_qt_b, stride_qt_l, stride_qt_h,
    stride_kt_b, stride_kt_l, stride_kt_h, stride_vt_b, stride_vt_l, stride_vt_h,
    stride_doi_b, stride_doi_l, stride_doi_h, stride_dot_b, stride_dot_l, stride_dot_h,
    len_img, len_txt, txt_query_len, num_heads, sm_scale, qk_scale, eps,
    GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_QK_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr,
):
    # One program per (batch, group, head) and key block (image key blocks, then text ones).
    pid_bgh = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = widen(pid_bgh // (GROUPS * num_heads), INDEX_64)
    group = (pid_bgh // num_heads) % GROUPS
    head = pid_bgh % num_heads
    group_img = len_img // GROUPS
    group_txt = len_txt // GROUPS
    img_blocks = tl.cdiv(group_img, BLOCK_N)
    is_img = pid_n < img_blocks

    k_base = _pick(is_img, _head_base(k_img_ptr, batch, head, stride_ki_b, stride_ki_h),
                   _head_base(k_txt_ptr, batch, head, stride_kt_b, stride_kt_h))
    v_base = _pick(is_img, _head_base(v_img_ptr, batch, head, stride_vi_b, stride_vi_h),
                   _head_base(v_txt_ptr, batch, head, stride_vt_b, stride_vt_h))
    stride_k_l = _pick(is_img, stride_ki_l, stride_kt_l)
    stride_v_l = _pick(is_img, stride_vi_l, stride_vt_l)
    k_len = _pick(is_img, len_img, len_txt)
    row_offset = (batch * k_len * num_heads + head) * HEAD_DIM
    dk_base = _pick(is_img, dk_img_ptr, dk_txt_ptr) + row_offset
    dv_base = _pick(is_img, dv_img_ptr, dv_txt_ptr) + row_offset
    k_group_size = _pick(is_img, group_img, group_txt)

    members = _pick(is_img, pid_n, pid_n - img_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = members < k_group_size
    positions = _member_positions(members, group, GROUPS, GROUP_LEN, INDEX_64)
    k_raw = _load_rows(k_base, positions, stride_k_l, valid, HEAD_DIM)
    if HAS_QK_NORM:
        k_weight = _load_weight(_pick(is_img, k_norm_img_ptr, k_norm_txt_ptr), HEAD_DIM)
        k = _rms_norm_rows(k_raw, k_weight, eps, HEAD_DIM)
    else:
        k = k_raw
    v = _load_rows(v_base, positions, stride_v_l, valid, HEAD_DIM)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    stat_img = (batch * num_heads + head) * len_img
    dk, dv = _bwd_dkdv_stream(
        dk, dv, k, v, _head_base(q_img_ptr, batch, head, stride_qi_b, stride_qi_h),
        _head_base(dout_img_ptr, batch, head, stride_doi_b, stride_doi_h),
        lse_img_ptr + stat_img, delta_img_ptr + stat_img, stride_qi_l, stride_doi_l, q_norm_img_ptr,
        group, group_img, qk_scale, eps, GROUPS, GROUP_LEN, HEAD_DIM, HAS_QK_NORM, BLOCK_M, INDEX_64)
    # Text queries exist only when the text output was computed (txt_query_len is 0 otherwise).
    stat_txt = (batch * num_heads + head) * txt_query_len
    dk, dv = _bwd_dkdv_stream(
        dk, dv, k, v, _head_base(q_txt_ptr, batch, head, stride_qt_b, stride_qt_h),
        _head_base(dout_txt_ptr, batch, head, stride_dot_b, stride_dot_h),
        lse_txt_ptr + stat_txt, delta_txt_ptr + stat_txt, stride_qt_l, stride_dot_l, q_norm_txt_ptr,
        group, txt_query_len // GROUPS, qk_scale, eps, GROUPS, GROUP_LEN, HEAD_DIM, HAS_QK_NORM, BLOCK_M, INDEX_64)
    dk = dk * sm_scale

    cols = tl.arange(0, HEAD_DIM)
    if HAS_QK_NORM:
        dk, dk_weight = _rms_norm_rows_backward(k_raw, dk, k_weight, eps, HEAD_DIM)
        partial = widen(pid_bgh, INDEX_64) * tl.num_programs(1) + pid_n
        tl.store(dk_norm_partial_ptr + partial * HEAD_DIM + cols, dk_weight)
    offsets = positions[:, None] * (num_heads * HEAD_DIM) + cols[None, :]
    tl.store(dk_base + offsets, dk.to(dk_base.dtype.element_ty), mask=valid[:, None])
    tl.store(dv_base + offsets, dv.to(dv_base.dtype.element_ty), mask=valid[:, None])


# --------------------------------------------------------------------------------------------
# Launch configs, side by side per backend, and host launchers
# --------------------------------------------------------------------------------------------
# ASA groups hold 20..384 tokens per stream (Nitro-E's 80-token stage: 20 image + 32 text per
# group), so tiles stay small: larger ones mostly add masked-out work. Query tiles of 16 and 32
# rows give the transformer head's attention at batch 1 (2 x 12 heads x 256 tokens: 96 programs
# at BLOCK_M = 64) 192 or 384 programs, enough to fill 132 SMs / 304 CUs; 16 is tl.dot's
# smallest M on NVIDIA. On sm_90 a 16-row forward tile takes 2 warps (ptxas: 119..206
# registers, no spill; with 4 warps it spills 4..16 bytes) and num_stages 1 (stages did not
# change its code at 4 warps); on gfx942 16- and 32-row tiles need 81..152 VGPRs, no AGPR, no
# spill. Eight warps only for tiles of 64+ rows. Dropped because they spill:
# sm_90 dk/dv at BLOCK_N = 128 with 4 warps; gfx942 2-warp and 64 x 64 tiles (issue 10's
# compile of every candidate); the gfx942 dk/dv candidates left need 110..225 VGPRs, no AGPR,
# no spill (bf16, head_dim 32 with q/k norm and 64 without). HIP: num_stages 1 (64 KiB LDS),
# num_warps counts 64-wide wavefronts, 16x16 MFMA; HIP-only keys appear in HIP lists only. waves_per_eu is a HIP tuning
# candidate, not a default: it caps registers per lane to raise occupancy, which pays or spills
# depending on the shape, so only a timed tuning run may pick it.
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
FORWARD_CONFIGS = ConfigTable(
    cuda=[dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
          for block_m in (32, 64, 128) for block_n in (32, 64) for warps in (4, 8) for stages in (1, 2, 3)
          if warps == 4 or block_m >= 64]
         + [dict(BLOCK_M=16, BLOCK_N=block_n, num_warps=2, num_stages=1) for block_n in (32, 64)],
    hip=[dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1, waves_per_eu=waves,
              matrix_instr_nonkdim=16)
         for block_m in (16, 32, 64, 128) for block_n in (32, 64) for waves in (0, 2)
         if (block_m, block_n) != (64, 64)],
    # Under the interpreter every program runs in Python: 64-wide tiles keep the tests fast while
    # lengths such as 80, 20 or 17 still exercise multi-block loops and masking.
    interpreter=dict(INTERPRETER_CONFIG),
    # Untuned defaults, chosen for the Nitro group sizes from register counts (no spills on
    # sm_90 and gfx942 for head_dim 32 and 64).
    defaults=[("cuda", "", dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),
              ("hip", "", dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1, matrix_instr_nonkdim=16))],
)
BACKWARD_CONFIGS = ConfigTable(
    cuda=[dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
          for block_m in (16, 32, 64) for block_n in (32, 64, 128) for warps in (4, 8) for stages in (1, 2)
          if (warps == 4 and block_n <= 64) or (warps == 8 and block_n >= 64)],
    hip=[dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1, waves_per_eu=waves,
              matrix_instr_nonkdim=16)
         for block_m in (16, 32, 64) for block_n in (32, 64) for waves in (0, 2)
         if (block_m, block_n) != (64, 64)],
    interpreter=dict(INTERPRETER_CONFIG),
    defaults=[("cuda", "", dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)),
              ("hip", "", dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, matrix_instr_nonkdim=16))],
)
CONFIGS = {"joint_attention": FORWARD_CONFIGS, "joint_attention_backward": BACKWARD_CONFIGS}


OPS = ConfigTables(CONFIGS)
candidate_configs, default_config = OPS.candidate_configs, OPS.default_config


def tuning_bucket(shape: dict) -> str:
    """Configs depend on head_dim, the tokens per group (tile fit) and the program count."""
    group_tokens = (shape["len_img"] + shape["len_txt"]) // shape["groups"]
    heads = shape["batch"] * shape["groups"] * shape["heads"]
    return f"d{shape['head_dim']}_g{triton.next_power_of_2(group_tokens)}_{'many' if heads >= 1024 else 'few'}"


def _index_64(*tensors: Optional[torch.Tensor]) -> bool:
    """64-bit offsets when any tensor the kernels address (inputs, outputs, statistics; None:
    absent) spans 2^31 elements or more. Partial sums per program are smaller than the outputs."""
    return needs_int64(*(storage_span(t.shape, t.stride()) for t in tensors if t is not None))


def _strides(x: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, position, head) strides of a (B, L, H, d) view with unit stride over d."""
    return x.stride(0), x.stride(1), x.stride(2)


def _tiles(len_img: int, len_txt: int, groups: int, block: int) -> Tuple[int, int]:
    """Tiles of ``block`` members covering one group's image members, and its text members."""
    return triton.cdiv(len_img // groups, block), triton.cdiv(len_txt // groups, block)


def _problem_shape(q_img, q_txt, groups) -> dict:
    """The shape fields :func:`tuning_bucket` reads."""
    batch, len_img, heads, head_dim = q_img.shape
    return dict(batch=batch, heads=heads, head_dim=head_dim, len_img=len_img,
                len_txt=0 if q_txt is None else q_txt.shape[1], groups=groups)


def joint_attention_forward(
    q_img, k_img, v_img, q_txt, k_txt, v_txt, norms: Optional[Sequence[torch.Tensor]],
    groups: int, group_len: int, eps: float, text_output: bool, config: Optional[dict] = None,
):
    """Launch the forward kernel on validated inputs (see :func:`joint_attention`).

    ``q_txt``/``k_txt``/``v_txt`` may be None (self-attention); ``norms`` is None or the four
    q/k-norm weights (q_img, k_img, q_txt, k_txt). ``config`` overrides the tuned launch config.
    Returns (out_img, out_txt | None, lse_img, lse_txt | None): outputs contiguous (B, L, H, d)
    in the input dtype, log-sum-exps (B, H, L) fp32 in base 2 of the scaled scores.
    """
    batch, len_img, heads, head_dim = q_img.shape
    has_text = q_txt is not None
    len_txt = q_txt.shape[1] if has_text else 0
    if config is None:
        config = get_config("joint_attention", q_img.device, tuning_bucket(_problem_shape(q_img, q_txt, groups)))
    text_queries = has_text and text_output

    def outputs(length):  # (out, lse) of a stream with ``length`` positions
        return (torch.empty(batch, length, heads, head_dim, device=q_img.device, dtype=q_img.dtype),
                torch.empty(batch, heads, length, device=q_img.device, dtype=torch.float32))

    out_img, lse_img = outputs(len_img)
    out_txt, lse_txt = outputs(len_txt) if text_queries else (None, None)
    # Absent text tensors are stood in for by image ones that the kernel never touches.
    txt = (q_txt, k_txt, v_txt) if has_text else (q_img, k_img, v_img)
    norm_ptrs = tuple(norms) if norms is not None else (None,) * 4

    img_blocks, txt_blocks = _tiles(len_img, len_txt, groups, config["BLOCK_M"])
    grid = (batch * groups * heads, img_blocks + (txt_blocks if text_queries else 0))
    sm_scale = 1.0 / math.sqrt(head_dim)
    index_64 = _index_64(q_img, k_img, v_img, q_txt, k_txt, v_txt, out_img, out_txt, lse_img, lse_txt)
    _joint_attention_fwd_kernel[grid](
        q_img, k_img, v_img, *txt,
        out_img, out_txt if text_queries else out_img, lse_img, lse_txt if text_queries else lse_img,
        *norm_ptrs,
        *_strides(q_img), *_strides(k_img), *_strides(v_img), *_strides(txt[0]), *_strides(txt[1]), *_strides(txt[2]),
        len_img, len_txt, heads, sm_scale * LOG2_E, eps,
        GROUPS=groups, GROUP_LEN=group_len, HEAD_DIM=head_dim, HAS_QK_NORM=norms is not None, INDEX_64=index_64,
        **FORWARD_CONFIGS.launch_options(config),
    )
    return out_img, out_txt, lse_img, lse_txt


def joint_attention_backward(
    grad_out_img, grad_out_txt, q_img, k_img, v_img, q_txt, k_txt, v_txt,
    norms: Optional[Sequence[torch.Tensor]], out_img, out_txt, lse_img, lse_txt,
    groups: int, group_len: int, eps: float, config: Optional[dict] = None,
):
    """Launch the backward kernels (dq first, as it also writes ``delta = rowsum(dO * O)``).

    Arguments as returned by / passed to :func:`joint_attention_forward`; ``grad_out_txt`` is None
    exactly when ``out_txt`` is. Returns (dq_img, dk_img, dv_img, dq_txt, dk_txt, dv_txt,
    norm_grads): gradients contiguous (B, L, H, d) in the input dtype (text ones None without a
    text stream; dq_txt zeros without text output); norm_grads None or the four weight
    gradients in the weights' dtype (the q_txt one zeros without text output).
    """
    batch, len_img, heads, head_dim = q_img.shape
    has_text = q_txt is not None
    len_txt = q_txt.shape[1] if has_text else 0
    text_queries = out_txt is not None
    if config is None:
        config = get_config("joint_attention_backward", q_img.device,
                            tuning_bucket(_problem_shape(q_img, q_txt, groups)))
    grad_out_img = grad_out_img if grad_out_img.stride(-1) == 1 else grad_out_img.contiguous()
    if text_queries and grad_out_txt.stride(-1) != 1:
        grad_out_txt = grad_out_txt.contiguous()
    txt = (q_txt, k_txt, v_txt) if has_text else (q_img, k_img, v_img)
    norm_ptrs = tuple(norms) if norms is not None else (None,) * 4

    def empty_like_stream(length):
        return torch.empty(batch, length, heads, head_dim, device=q_img.device, dtype=q_img.dtype)

    dq_img, dk_img, dv_img = empty_like_stream(len_img), empty_like_stream(len_img), empty_like_stream(len_img)
    dk_txt, dv_txt = (empty_like_stream(len_txt), empty_like_stream(len_txt)) if has_text else (None, None)
    # Without text output the text queries get zero gradients, as in the reference (not None, so
    # optimizers treat their parameters alike).
    dq_txt = empty_like_stream(len_txt) if text_queries else (torch.zeros_like(dk_txt) if has_text else None)
    delta_img = torch.empty_like(lse_img)
    delta_txt = torch.empty_like(lse_txt) if text_queries else None
    # Absent text tensors are stood in for by image ones that the kernels never touch.
    stand_in = dict(
        out_txt=out_txt if text_queries else out_img, grad_txt=grad_out_txt if text_queries else grad_out_img,
        lse_txt=lse_txt if text_queries else lse_img, delta_txt=delta_txt if text_queries else delta_img,
        dq_txt=dq_txt if text_queries else dq_img,
        dk_txt=dk_txt if has_text else dk_img, dv_txt=dv_txt if has_text else dv_img,
    )
    input_strides = (*_strides(q_img), *_strides(k_img), *_strides(v_img),
                     *_strides(txt[0]), *_strides(txt[1]), *_strides(txt[2]),
                     *_strides(grad_out_img), *_strides(stand_in["grad_txt"]))
    sm_scale = 1.0 / math.sqrt(head_dim)
    rows = batch * groups * heads
    meta = dict(GROUPS=groups, GROUP_LEN=group_len, HEAD_DIM=head_dim, HAS_QK_NORM=norms is not None,
                INDEX_64=_index_64(q_img, k_img, v_img, q_txt, k_txt, v_txt, grad_out_img, grad_out_txt, out_img,
                                   out_txt, lse_img, lse_txt),
                **BACKWARD_CONFIGS.launch_options(config))

    img_q_blocks, txt_q_blocks = _tiles(len_img, len_txt, groups, config["BLOCK_M"])
    q_blocks = img_q_blocks + (txt_q_blocks if text_queries else 0)
    dq_norm_partial = (torch.empty(rows, q_blocks, head_dim, device=q_img.device, dtype=torch.float32)
                       if norms is not None else None)
    _joint_attention_bwd_dq_kernel[(rows, q_blocks)](
        q_img, k_img, v_img, *txt, out_img, stand_in["out_txt"], grad_out_img, stand_in["grad_txt"],
        lse_img, stand_in["lse_txt"], delta_img, stand_in["delta_txt"], dq_img, stand_in["dq_txt"],
        *norm_ptrs, dq_norm_partial, *input_strides,
        len_img, len_txt, heads, sm_scale, sm_scale * LOG2_E, eps, **meta,
    )

    img_k_blocks, txt_k_blocks = _tiles(len_img, len_txt, groups, config["BLOCK_N"])
    k_blocks = img_k_blocks + txt_k_blocks
    dk_norm_partial = (torch.empty(rows, k_blocks, head_dim, device=q_img.device, dtype=torch.float32)
                       if norms is not None else None)
    _joint_attention_bwd_dkdv_kernel[(rows, k_blocks)](
        q_img, k_img, v_img, *txt, grad_out_img, stand_in["grad_txt"], lse_img, stand_in["lse_txt"],
        delta_img, stand_in["delta_txt"], dk_img, dv_img, stand_in["dk_txt"], stand_in["dv_txt"],
        *norm_ptrs, dk_norm_partial, *input_strides,
        len_img, len_txt, len_txt if text_queries else 0, heads, sm_scale, sm_scale * LOG2_E, eps, **meta,
    )

    norm_grads = None
    if norms is not None:
        def reduce(partial, weight):
            return partial.sum(dim=(0, 1)).to(weight.dtype)

        norm_grads = (
            reduce(dq_norm_partial[:, :img_q_blocks], norms[0]),
            reduce(dk_norm_partial[:, :img_k_blocks], norms[1]),
            reduce(dq_norm_partial[:, img_q_blocks:], norms[2]) if text_queries else torch.zeros_like(norms[2]),
            reduce(dk_norm_partial[:, img_k_blocks:], norms[3]),
        )
    return dq_img, dk_img, dv_img, dq_txt, dk_txt, dv_txt, norm_grads


# --------------------------------------------------------------------------------------------
# Autograd Function
# --------------------------------------------------------------------------------------------
class JointAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels. Inputs as :func:`joint_attention` (text tensors None for
    self-attention, the four norm weights all None or all given), then groups, group_len, eps,
    text_output. Returns (out_img, out_txt | None)."""

    @staticmethod
    def forward(ctx, q_img, k_img, v_img, q_txt, k_txt, v_txt, q_norm_img, k_norm_img, q_norm_txt, k_norm_txt,
                groups, group_len, eps, text_output):
        norms = None if q_norm_img is None else (q_norm_img, k_norm_img, q_norm_txt, k_norm_txt)
        out_img, out_txt, lse_img, lse_txt = joint_attention_forward(
            q_img, k_img, v_img, q_txt, k_txt, v_txt, norms, groups, group_len, eps, text_output)
        ctx.save_for_backward(q_img, k_img, v_img, q_txt, k_txt, v_txt, q_norm_img, k_norm_img, q_norm_txt,
                              k_norm_txt, out_img, out_txt, lse_img, lse_txt)
        ctx.asa = (groups, group_len, eps)
        return out_img, out_txt

    @staticmethod
    def backward(ctx, grad_out_img, grad_out_txt):
        q_img, k_img, v_img, q_txt, k_txt, v_txt, *norms, out_img, out_txt, lse_img, lse_txt = ctx.saved_tensors
        groups, group_len, eps = ctx.asa
        dq_img, dk_img, dv_img, dq_txt, dk_txt, dv_txt, norm_grads = joint_attention_backward(
            grad_out_img, grad_out_txt if out_txt is not None else None, q_img, k_img, v_img, q_txt, k_txt, v_txt,
            None if norms[0] is None else norms, out_img, out_txt, lse_img, lse_txt, groups, group_len, eps)
        return (dq_img, dk_img, dv_img, dq_txt, dk_txt, dv_txt, *(norm_grads or (None,) * 4), None, None, None, None)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_streams(streams: Sequence[Tuple[str, Tuple[torch.Tensor, ...]]], groups: int, group_len: int) -> None:
    """Raise KernelInputError naming the tensors when the (q, k, v) streams do not fit together."""
    if not (isinstance(groups, int) and isinstance(group_len, int) and groups >= 1 and group_len >= 1):
        raise KernelInputError(f"groups and group_len must be positive integers, got {groups!r} and {group_len!r}")
    names = [f"{kind}{suffix}" for suffix, _ in streams for kind in ("q", "k", "v")]
    tensors = [x for _, stream in streams for x in stream]
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise KernelInputError(f"{name} must be a 4-D (B, L, H, d) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise KernelInputError(f"{name} has dtype {x.dtype}; supported: float32, float16, bfloat16")
        if x.stride(-1) != 1 and x.shape[-1] > 1:
            raise KernelInputError(f"{name} must have unit stride over head_dim (its last dimension), "
                                   f"got stride {x.stride(-1)}")
    first_name, first = names[0], tensors[0]
    if first.shape[1] == 0:
        raise KernelInputError(f"{first_name} has no positions (shape {tuple(first.shape)})")
    batch, _, heads, head_dim = first.shape
    for name, x in zip(names[1:], tensors[1:]):
        if x.dtype != first.dtype:
            raise KernelInputError(f"dtype mismatch: {first_name} is {first.dtype} but {name} is {x.dtype}")
        if x.device != first.device:
            raise KernelInputError(f"device mismatch: {first_name} is on {first.device} but {name} is on {x.device}")
        if x.shape[3] != head_dim:
            raise KernelInputError(f"head_dim mismatch: {first_name} has head_dim {head_dim} but {name} has {x.shape[3]}")
        if (x.shape[0], x.shape[2]) != (batch, heads):
            raise KernelInputError(f"{name} has shape {tuple(x.shape)}: batch and heads must match {first_name}'s "
                                   f"{tuple(first.shape)}")
    for suffix, (q, k, v) in streams:
        for kind, x in (("k", k), ("v", v)):
            if x.shape[1] != q.shape[1]:
                raise KernelInputError(f"{kind}{suffix} has {x.shape[1]} positions but q{suffix} has {q.shape[1]}")
        if q.shape[1] % (groups * group_len):
            raise KernelInputError(f"length {q.shape[1]} of q{suffix}/k{suffix}/v{suffix} is not divisible by "
                                   f"groups * group_len = {groups} * {group_len}")


def _check_norms(norms: Dict[str, Optional[torch.Tensor]], like: torch.Tensor) -> Optional[Tuple[torch.Tensor, ...]]:
    """The four q/k-norm weights as a tuple of contiguous tensors (the kernels read d consecutive
    values: a strided or expanded weight is copied once), None when none is given;
    KernelInputError on a partial or bad set."""
    given = [name for name, w in norms.items() if w is not None]
    if not given:
        return None
    if len(given) != len(norms):
        missing = [name for name in norms if name not in given]
        raise KernelInputError(f"fused q/k norm needs all of {', '.join(norms)}; missing {', '.join(missing)}")
    for name, w in norms.items():
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (like.shape[-1],):
            raise KernelInputError(f"{name} must have shape ({like.shape[-1]},) (head_dim), "
                                   f"got {tuple(getattr(w, 'shape', ()))}")
        if w.dtype not in SUPPORTED_DTYPES:
            raise KernelInputError(f"{name} has dtype {w.dtype}; supported: float32, float16, bfloat16")
        if w.device != like.device:
            raise KernelInputError(f"device mismatch: {name} is on {w.device} but the attention inputs are on "
                                   f"{like.device}")
    dtypes = {name: w.dtype for name, w in norms.items()}
    if len(set(dtypes.values())) > 1:
        raise KernelInputError(f"the q/k norm weights must share one dtype, got {dtypes}")
    return tuple(w.contiguous() for w in norms.values())


def _select_backend(device: torch.device, backend: Optional[str], head_dim: int) -> str:
    """The backend to run; kernel backends also need a power-of-two head_dim in 16..128."""
    choice = select_backend(device, backend)
    if choice in KERNEL_BACKENDS and (head_dim & (head_dim - 1) or not 16 <= head_dim <= 128):
        raise KernelInputError(f"the Triton kernels need head_dim a power of two in 16..128, got {head_dim}")
    return choice


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def joint_attention(
    q_img: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor,
    q_txt: torch.Tensor, k_txt: torch.Tensor, v_txt: torch.Tensor,
    *,
    groups: int = 1,
    group_len: int = 1,
    q_norm_img: Optional[torch.Tensor] = None,
    k_norm_img: Optional[torch.Tensor] = None,
    q_norm_txt: Optional[torch.Tensor] = None,
    k_norm_txt: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    text_output: bool = True,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Joint (MMDiT) attention with Alternating Subregion Attention, differentiable.

    For each ASA group g (position p of a stream belongs to group ``(p // group_len) % groups``),
    ``softmax(q k^T / sqrt(d)) v`` over the group's image members followed by its text members;
    (groups, group_len) = (1, 1) is plain joint attention, Nitro-E uses (4, 1) and (4, 4).

    Args:
        q_img, k_img, v_img: (B, Li, H, d) image-stream projections; any strides with unit stride
            over d (e.g. ``qkv.view(B, Li, 3, H, d).unbind(2)``). float32, float16 or bfloat16.
        q_txt, k_txt, v_txt: (B, Lt, H, d) text-stream projections, same dtype, device, B, H, d.
            Li and Lt must be divisible by ``groups * group_len``.
        q_norm_img, k_norm_img, q_norm_txt, k_norm_txt: (d,) weights of the per-head q/k
            RMSNorm (fp32 statistics, ``eps``) applied to the raw projections; all or none, one
            dtype, any layout (copied once when not contiguous). The kernels multiply by the
            weight in fp32; the reference (diffusers) first rounds to a half-precision weight's
            dtype, so with fp16/bf16 weights the two differ by that one rounding.
        text_output: False returns no text output (context-pre-only block): the kernels skip
            the text queries entirely (text keys and values still attend) and give them zero
            gradients, as the reference does.
        backend: ``triton``/``interpret`` (the kernels), ``torch`` or ``reference``; default
            from :func:`nitro_ar.kernels.backend.select_backend`.
    Returns:
        (out_img (B, Li, H, d), out_txt (B, Lt, H, d) or None), contiguous, in the input dtype,
        so ``out.view(B, L, H * d)`` feeds the output projection.
    Raises:
        KernelInputError (a ValueError) naming the tensors on mismatched shapes, dtypes or devices, a non-unit
        stride over d, lengths not divisible by groups * group_len, or a partial set of norms;
        on the kernel backends also for a head_dim that is not a power of two in 16..128.
    """
    _check_streams([("_img", (q_img, k_img, v_img)), ("_txt", (q_txt, k_txt, v_txt))], groups, group_len)
    norms = _check_norms(dict(q_norm_img=q_norm_img, k_norm_img=k_norm_img, q_norm_txt=q_norm_txt,
                              k_norm_txt=k_norm_txt), q_img)
    choice = _select_backend(q_img.device, backend, q_img.shape[-1])
    if choice in KERNEL_BACKENDS:
        return JointAttentionFunction.apply(q_img, k_img, v_img, q_txt, k_txt, v_txt, *(norms or (None,) * 4),
                                            groups, group_len, eps, text_output)
    return reference.fused_joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, groups=groups,
                                           group_len=group_len, q_norm_img=q_norm_img, k_norm_img=k_norm_img,
                                           q_norm_txt=q_norm_txt, k_norm_txt=k_norm_txt, eps=eps,
                                           text_output=text_output)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Bidirectional multi-head attention over one stream, differentiable.

    Args:
        q, k, v: (B, L, H, d) with unit stride over d, e.g. ``qkv.view(B, L, 3, H, d).unbind(2)``
            (the transformer head: L = 256 or 1, H x 64). float32, float16 or bfloat16.
        backend: as for :func:`joint_attention`.
    Returns:
        (B, L, H, d) contiguous, in the input dtype: ``softmax(q k^T / sqrt(d)) v`` per head.
    """
    _check_streams([("", (q, k, v))], 1, 1)
    choice = _select_backend(q.device, backend, q.shape[-1])
    if choice in KERNEL_BACKENDS:
        out, _ = JointAttentionFunction.apply(q, k, v, None, None, None, None, None, None, None, 1, 1, 0.0, False)
        return out
    return reference.self_attention(q, k, v)
