"""Backend-aware entry points of the fused ops, with a per-op fallback to plain torch.

Each op runs the Triton kernel on the ``triton`` / ``interpret`` backends and the torch
composition otherwise. A case a kernel does not handle (a dtype or a shape it was not built
for) falls back to torch for that call, with one warning per op and reason; bad input still
raises ``ValueError``.
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .. import layers

logger = logging.getLogger("nitro_ar")

KERNEL_BACKENDS = ("triton", "interpret")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set = set()


def fallback_warning(op: str, reason: str) -> None:
    """Warn once per (op, reason) that an op runs in torch instead of its kernel."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"nitro_ar.fast: {op} falls back to torch ({reason})", RuntimeWarning, stacklevel=3)


def _kernel_ok(op: str, backend: str, tensors: Sequence[torch.Tensor], extra_reason: Optional[str] = None) -> bool:
    if backend not in KERNEL_BACKENDS:
        return False
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            fallback_warning(op, f"dtype {t.dtype}")
            return False
    if extra_reason is not None:
        fallback_warning(op, extra_reason)
        return False
    return True


def norm_spec(norm: nn.Module) -> Tuple[str, float, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(kind, eps, weight, bias) of a reference norm module (``nn.LayerNorm`` or ``RMSNorm``)."""
    if isinstance(norm, nn.LayerNorm):
        return "layer", norm.eps, norm.weight, norm.bias
    if isinstance(norm, layers.RMSNorm):
        return "rms", norm.eps, norm.weight, None
    raise TypeError(f"unsupported norm module {type(norm).__name__}")


def modulated_norm(
    x: torch.Tensor,
    norm: nn.Module,
    *,
    backend: str,
    shift=None,
    scale=None,
    residual=None,
    gate=None,
    adaln=None,
):
    """``out = norm(x + gate * residual) * (1 + scale) + shift`` through the fused kernel.

    Arguments as :func:`nitro_ar.kernels.modulated_norm.modulated_norm`, with the norm given as
    its reference module. Returns ``out`` or ``(x_new, out)`` when ``residual`` is given.
    """
    if backend not in KERNEL_BACKENDS:  # plain torch: the composition, without kernel-side checks
        return _reference_modulated_norm(x, norm, shift, scale, residual, gate, adaln)
    kind, eps, weight, bias = norm_spec(norm)
    # The kernel reads rows with unit stride; a transposed activation (e.g. after a patch
    # embedding) is made contiguous once here.
    x = x if x.stride(-1) == 1 else x.contiguous()
    residual = residual if residual is None or residual.stride(-1) == 1 else residual.contiguous()
    tensors = [t for t in (x, residual, shift, scale, gate) if t is not None]
    if not _kernel_ok("modulated_norm", backend, tensors):
        return _reference_modulated_norm(x, norm, shift, scale, residual, gate, adaln)
    from ..kernels.modulated_norm import modulated_norm as fused

    return fused(x, norm=kind, eps=eps, weight=weight, bias=bias, shift=shift, scale=scale,
                 residual=residual, gate=gate, adaln=adaln, backend=backend)


def _reference_modulated_norm(x, norm, shift, scale, residual, gate, adaln):
    """The eager composition (``nitro_ar.layers``): the torch backend, and dtypes the kernel rejects."""
    if adaln is not None:
        chunks = layers.adaln_affine(adaln.temb, adaln.bias, adaln.scale).chunk(6, dim=1)
        if adaln.shift_chunk is not None:
            shift, scale = chunks[adaln.shift_chunk], chunks[adaln.scale_chunk]
        if adaln.gate_chunk is not None:
            gate = chunks[adaln.gate_chunk]
    if residual is None:
        out = norm(x)
        return out if scale is None else layers.modulate(out, shift, scale)
    return layers.gated_residual_norm_modulate(x, residual, gate, norm, shift, scale)


def _head_dim_reason(head_dim: int) -> Optional[str]:
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 128:
        return f"head_dim {head_dim} (kernels take powers of two 16..128)"
    return None


def joint_attention(
    q_img, k_img, v_img, q_txt, k_txt, v_txt, *, groups: int, group_len: int, qk_norms, eps: float,
    text_output: bool, backend: str,
):
    """Joint attention with ASA and optional fused per-head q/k RMSNorm.

    Inputs (B, L, H, d), possibly strided views of fused projections; ``qk_norms`` is None or
    the four norm modules (q_img, k_img, q_txt, k_txt). Returns (out_img, out_txt or None),
    (B, L, H, d).
    """
    tensors = (q_img, k_img, v_img, q_txt, k_txt, v_txt)
    if _kernel_ok("joint_attention", backend, tensors, _head_dim_reason(q_img.shape[-1])):
        from ..kernels.joint_attention import joint_attention as fused

        weights = {} if qk_norms is None else dict(
            q_norm_img=qk_norms[0].weight, k_norm_img=qk_norms[1].weight,
            q_norm_txt=qk_norms[2].weight, k_norm_txt=qk_norms[3].weight,
        )
        return fused(*tensors, groups=groups, group_len=group_len, eps=eps, text_output=text_output,
                     backend=backend, **weights)
    if qk_norms is not None:
        q_img, k_img = qk_rms_norm(q_img, k_img, qk_norms[0], qk_norms[1])
        q_txt, k_txt = qk_rms_norm(q_txt, k_txt, qk_norms[2], qk_norms[3])
    out_img, out_txt = layers.joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, groups, group_len)
    return out_img, (out_txt if text_output else None)


def qk_rms_norm(q: torch.Tensor, k: torch.Tensor, norm_q: nn.Module, norm_k: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-head q and k RMSNorms (``QKRMSNorm`` semantics) as one computation when q and
    k are the two leading slices of one fused (B, L, 3, H, d) projection, else one each."""
    fused_view = (
        q.dim() == 4 and q.shape == k.shape and q.stride() == k.stride()
        and k.data_ptr() - q.data_ptr() == q.stride(1) // 3 * q.element_size() and q.stride(1) % 3 == 0
    )
    if not fused_view:
        return norm_q(q), norm_k(k)
    qk = q.as_strided((*q.shape[:2], 2, *q.shape[2:]), (q.stride(0), q.stride(1), q.stride(1) // 3, *q.stride()[2:]))
    weight = torch.stack([norm_q.weight, norm_k.weight]).unsqueeze(1)  # (2, 1, d)
    y = qk * torch.rsqrt(qk.float().pow(2).mean(-1, keepdim=True) + norm_q.eps)
    y = y.to(weight.dtype) * weight if weight.dtype in (torch.float16, torch.bfloat16) else (y * weight).to(q.dtype)
    return y[:, :, 0], y[:, :, 1]


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Bidirectional attention over one stream: (B, L, H, d) views -> (B, L, H, d)."""
    if _kernel_ok("self_attention", backend, (q, k, v), _head_dim_reason(q.shape[-1])):
        from ..kernels.joint_attention import self_attention as fused

        return fused(q, k, v, backend=backend)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
