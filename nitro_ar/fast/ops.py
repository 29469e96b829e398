"""Backend-aware entry points of the fused ops, with a per-op fallback to the eager reference.

Each op runs the Triton kernel on the ``triton`` / ``interpret`` backends and its eager
reference (:mod:`nitro_ar.kernels.reference`, the one definition of each op) otherwise. The
choice is made in one place, :func:`nitro_ar.kernels.backend.kernel_runs`: a case a kernel does
not handle (a dtype or a shape it was not built for) falls back to the reference for that call,
with one warning per op and reason; bad input still raises ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..kernels import reference
from ..kernels.backend import KERNEL_BACKENDS, KERNEL_DTYPES, fallback_warning, kernel_runs, requested_gemm_path
from ..kernels.reference import AddSiLUPrologue, FlowEpilogue, LinearProblem, NormPrologue
from ..layers import norm_spec

__all__ = ["DropIn", "KERNEL_BACKENDS", "KERNEL_DTYPES", "fallback_warning", "norm_spec", "modulated_norm",
           "joint_attention", "qk_rms_norm", "self_attention", "LinearProblem", "NormPrologue", "AddSiLUPrologue",
           "FlowEpilogue", "norm_prologue", "linear", "linear_group", "fused_path"]

logger = logging.getLogger("nitro_ar")


class DropIn:
    """The fast-path state every drop-in keeps: the backend it runs on, set by
    :func:`nitro_ar.fast.swap_classes` (``prepare_fast``) and dropped on restore
    (``release_fast``). Drop-ins with more state (fused weights) extend both."""

    backend: str = "torch"

    def prepare_fast(self, backend: str) -> None:
        self.backend = backend

    def release_fast(self) -> None:
        for name in ("backend", *self._fast_state()):
            self.__dict__.pop(name, None)

    def _fast_state(self) -> Tuple[str, ...]:
        """Names of the attributes ``prepare_fast`` adds beyond ``backend``."""
        return ()


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
    kind, eps, weight, bias = norm_spec(norm)
    if backend in KERNEL_BACKENDS:
        # Mixed dtypes (bf16 autocast: an fp32 residual stream meets bf16 branch outputs and
        # modulations): promote as eager PyTorch would, since the kernel takes one dtype.
        x, shift, scale, residual, gate, adaln = _promoted(x, shift, scale, residual, gate, adaln)
    kwargs = dict(norm=kind, eps=eps, weight=weight, bias=bias, shift=shift, scale=scale, residual=residual,
                  gate=gate, adaln=adaln)
    if backend in KERNEL_BACKENDS:
        # The kernel reads rows with unit stride; a transposed activation (e.g. after a patch
        # embedding) is made contiguous once here.
        x = x if x.stride(-1) == 1 else x.contiguous()
        kwargs["residual"] = residual if residual is None or residual.stride(-1) == 1 else residual.contiguous()
    if not kernel_runs("modulated_norm", backend, (x, residual, shift, scale, gate)):
        return reference.modulated_norm(x, **kwargs)
    from ..kernels.modulated_norm import modulated_norm as fused

    return fused(x, backend=backend, **kwargs)


def _promoted(x, shift, scale, residual, gate, adaln):
    """The activations of :func:`modulated_norm` cast to their promoted floating dtype (as
    ``x + gate * residual`` would be in eager PyTorch); unchanged when they already agree."""
    activations = [t for t in (x, shift, scale, residual, gate, None if adaln is None else adaln.temb) if t is not None]
    dtypes = {t.dtype for t in activations if t.is_floating_point()}
    if len(dtypes) <= 1:
        return x, shift, scale, residual, gate, adaln
    # torch.promote_types would be a dispatched op per call; for floating dtypes: the widest, and
    # float32 for float16 with bfloat16.
    dtype = max(dtypes, key=lambda d: torch.finfo(d).bits)
    dtype = torch.float32 if torch.finfo(dtype).bits == 16 else dtype

    def cast(t):
        return t if t is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype)

    if adaln is not None:
        adaln = dataclasses.replace(adaln, temb=cast(adaln.temb))
    return cast(x), cast(shift), cast(scale), cast(residual), cast(gate), adaln


def _head_dim_reason(head_dim: int):
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
    weights = {} if qk_norms is None else dict(
        q_norm_img=qk_norms[0].weight, k_norm_img=qk_norms[1].weight,
        q_norm_txt=qk_norms[2].weight, k_norm_txt=qk_norms[3].weight,
    )
    if kernel_runs("joint_attention", backend, tensors, _head_dim_reason(q_img.shape[-1])):
        from ..kernels.joint_attention import joint_attention as fused

        return fused(*tensors, groups=groups, group_len=group_len, eps=eps, text_output=text_output,
                     backend=backend, **weights)
    if qk_norms is not None:
        q_img, k_img = qk_rms_norm(q_img, k_img, qk_norms[0], qk_norms[1])
        q_txt, k_txt = qk_rms_norm(q_txt, k_txt, qk_norms[2], qk_norms[3])
    return reference.fused_joint_attention(*(q_img, k_img, v_img, q_txt, k_txt, v_txt), groups=groups,
                                           group_len=group_len, text_output=text_output)


def qk_rms_norm(q: torch.Tensor, k: torch.Tensor, norm_q: nn.Module, norm_k: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-head q and k RMSNorms (:func:`nitro_ar.kernels.reference.qk_rms_norm`) as one
    computation when q and k are the two leading slices of one fused (B, L, 3, H, d)
    projection (one weight per slice, stacked), else one each."""
    fused_view = (
        q.dim() == 4 and q.shape == k.shape and q.stride() == k.stride()
        and k.data_ptr() - q.data_ptr() == q.stride(1) // 3 * q.element_size() and q.stride(1) % 3 == 0
        and norm_q.eps == norm_k.eps and norm_q.weight.dtype == norm_k.weight.dtype
    )
    if not fused_view:
        return norm_q(q), norm_k(k)
    qk = q.as_strided((*q.shape[:2], 2, *q.shape[2:]), (q.stride(0), q.stride(1), q.stride(1) // 3, *q.stride()[2:]))
    weight = torch.stack([norm_q.weight, norm_k.weight]).unsqueeze(1)  # (2, 1, d)
    y = reference.qk_rms_norm(qk, weight, norm_q.eps)
    return y[:, :, 0], y[:, :, 1]


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Bidirectional attention over one stream: (B, L, H, d) views -> (B, L, H, d)."""
    if kernel_runs("self_attention", backend, (q, k, v), _head_dim_reason(q.shape[-1])):
        from ..kernels.joint_attention import self_attention as fused

        return fused(q, k, v, backend=backend)
    return reference.self_attention(q, k, v)


# --------------------------------------------------------------------------------------------
# Linear layers with fused neighbours (kernel: fused_linear)
# --------------------------------------------------------------------------------------------
def fused_path(backend: str, module: nn.Module, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``module`` runs its fused-GEMM structure for these inputs: a kernel backend, GEMMs
    not forced to the library (``NITRO_AR_GEMM=library``), no autocast, no autograd graph to build.
    Otherwise it runs the structure whose every kernel has a backward (:func:`modulated_norm`
    with the residual fused into the norm, library GEMMs, attention): training, differentiable
    sampling, the torch backend. Within the fused structure each launch still takes the tuned
    path of its shape bucket (:func:`nitro_ar.kernels.fused_linear.gemm_path`)."""
    if backend not in KERNEL_BACKENDS or requested_gemm_path() == "library":
        return False
    # Under autocast eager casts each GEMM's operands; the fused launches take one dtype.
    device_type = tensors[0].device.type if tensors and tensors[0] is not None else "cpu"
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in (*tensors, *module.parameters()))


def norm_prologue(norm: nn.Module, *, shift=None, scale=None, adaln=None) -> NormPrologue:
    """The :class:`NormPrologue` of a norm module (``nn.LayerNorm`` or ``RMSNorm``) with its
    modulation (per token / per batch tensors, or the shift and scale chunks of ``adaln``)."""
    kind, eps, weight, bias = norm_spec(norm)
    return NormPrologue(kind, eps, weight, bias, shift, scale, adaln)


def linear_group(problems: Sequence[LinearProblem], *, backend: str, activation: Optional[str] = None,
                 flow: Optional[FlowEpilogue] = None) -> List[torch.Tensor]:
    """Up to two GEMMs with fused prologue / epilogue in one launch
    (:func:`nitro_ar.kernels.fused_linear.grouped_linear`); the eager reference on other
    backends and for dtypes the kernel does not take. Returns each problem's output."""
    tensors = [t for p in problems for t in (p.x, p.weight, p.residual)]
    if kernel_runs("fused_linear", backend, tensors):
        from ..kernels.fused_linear import grouped_linear

        return grouped_linear(problems, activation=activation, flow=flow, backend=backend)
    return reference.linear_problems(problems, activation, flow)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, backend: str,
           activation: Optional[str] = None, flow: Optional[FlowEpilogue] = None, **problem) -> torch.Tensor:
    """One GEMM with fused prologue / epilogue: :func:`linear_group` of one problem."""
    return linear_group([LinearProblem(x, weight, bias, **problem)], backend=backend, activation=activation,
                        flow=flow)[0]
