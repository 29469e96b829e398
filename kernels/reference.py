"""Eager references of the fused ops: the one definition each op is computed and tested against.

Plain PyTorch (as flash-linear-attention's ``naive.py``): the ``torch`` / ``reference`` backends of
the kernels, every fallback of :mod:`nitro_ar.fast`, the model layer (:mod:`nitro_ar.layers` and
:func:`nitro_ar.schedules.euler_step` re-export these), the tests and the benchmarks all call
these functions. Each one reproduces the official code's arithmetic exactly: where it computes
in fp32, where it casts back, the order of the operations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "layer_norm",
    "modulate",
    "adaln_affine",
    "AdaLNAffine",
    "modulated_norm",
    "qk_rms_norm",
    "asa_group",
    "asa_ungroup",
    "joint_attention",
    "fused_joint_attention",
    "self_attention",
    "guided_velocity",
    "euler_step",
    "flow_step",
    "NormPrologue",
    "AddSiLUPrologue",
    "FlowEpilogue",
    "LinearProblem",
    "ACTIVATIONS",
    "activation",
    "fused_linear",
    "linear_problems",
]


# --------------------------------------------------------------------------------------------
# Norms and modulation (kernel: modulated_norm)
# --------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm as the official code computes it: statistics and product in fp32, cast back.

    ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps))`` then ``type_as(x)``.

    Args:
        x: (..., D) any float dtype.
        weight: (D,) or None.
    Returns:
        (..., D) in ``x.dtype``.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight * y
    return y.type_as(x)


def layer_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """``torch.nn.functional.layer_norm`` over the last dim. x: (..., D); weight/bias: (D,) or None."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``; shift/scale broadcast against x (per batch or per token)."""
    return x * (1 + scale) + shift


def adaln_affine(temb: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Nitro-E's AdaLN-affine modulation: ``bias[K, D] + temb.view(B, K, D) * (1 + scale[K, D])``.

    Args:
        temb: (B, K * D) shared timestep projection.
        bias, scale: (K, D) per-block parameters (Nitro-E: K = 6).
    Returns:
        (B, K, D): Nitro-E's chunks are (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
    """
    batch = temb.shape[0]
    return bias[None] + temb.reshape(batch, bias.shape[0], -1) * (1 + scale[None])


@dataclass(eq=False, frozen=True)
class AdaLNAffine:
    """Nitro-E's AdaLN-affine modulation as an argument of the fused norm (evaluated in the kernel).

    Chunk k of the modulation is ``bias[k] + temb.view(B, K, D)[:, k] * (1 + scale[k])`` (one
    (D,) row per batch element). Nitro-E's order (K = 6) is shift_msa, scale_msa, gate_msa,
    shift_mlp, scale_mlp, gate_mlp: norm1 uses ``shift_chunk=0, scale_chunk=1``; the fused
    residual + norm2 uses ``gate_chunk=2, shift_chunk=3, scale_chunk=4``.

    Attributes:
        temb: (B, K * D) timestep projection, same dtype as x, unit stride over its last dim.
        bias, scale: (K, D) block parameters (``scale_shift_bias``, ``scale_shift_scale``), x's
            dtype or float32.
        shift_chunk, scale_chunk: chunk indices of shift and scale (both or neither).
        gate_chunk: chunk index of the residual gate, or None.
    """

    temb: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor
    shift_chunk: Optional[int] = None
    scale_chunk: Optional[int] = None
    gate_chunk: Optional[int] = None


def _against(x: torch.Tensor, row: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A shift/scale/gate broadcastable against x: a per-batch (B, D) row of a (B, L, D) x gets
    its token axis; per-token tensors and (B, 1, D) rows are used as they are."""
    return row[:, None] if row is not None and row.dim() == 2 and x.dim() == 3 else row


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
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Gated residual + norm + modulation: ``x_new = x + gate * residual``,
    ``out = norm(x_new) * (1 + scale) + shift``, each step optional.

    The arguments of :func:`nitro_ar.kernels.modulated_norm.modulated_norm` (x (B, L, D) or
    (N, D); per-token or per-batch ((B, D) or (B, 1, D)) shift / scale / gate, or chunks of an
    :class:`AdaLNAffine`), unchecked. The official op order: ``x + gate * residual``, then the
    norm module's computation (``F.layer_norm`` or :func:`rms_norm`), then :func:`modulate`.

    Returns:
        ``out``, or ``(x_new, out)`` when ``residual`` is given, in x's dtype.
    """
    if adaln is not None:
        rows = adaln_affine(adaln.temb, adaln.bias, adaln.scale)
        if adaln.shift_chunk is not None:
            shift, scale = rows[:, adaln.shift_chunk], rows[:, adaln.scale_chunk]
        if adaln.gate_chunk is not None:
            gate = rows[:, adaln.gate_chunk]
    x_new = x
    if residual is not None:
        x_new = x + (residual if gate is None else _against(x, gate) * residual)
    out = rms_norm(x_new, weight, eps) if norm == "rms" else layer_norm(x_new, weight, bias, eps)
    if scale is not None:
        out = modulate(out, _against(x, shift), _against(x, scale))
    out = out.to(x.dtype)
    return (x_new.to(x.dtype), out) if residual is not None else out


# --------------------------------------------------------------------------------------------
# Attention (kernel: joint_attention)
# --------------------------------------------------------------------------------------------
def qk_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-head RMSNorm of diffusers' ``Attention(qk_norm="rms_norm")`` (``QKRMSNorm``).

    fp32 statistics; with a half-precision weight the normalised value is rounded to the weight
    dtype before the product, as diffusers does. x: (..., d); weight: broadcastable to x.
    """
    y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        return y.to(weight.dtype) * weight
    return (y * weight).to(x.dtype)


def asa_group(x: torch.Tensor, groups: int, group_len: int) -> torch.Tensor:
    """Split a stream into ASA groups: ``b (l s n) ... -> (b s) (l n) ...``.

    Position p of a length-L stream goes to group ``(p // n) % s``, keeping order inside a group.
    x: (B, L, ...) with L divisible by s * n. Returns (B * s, L / s, ...), a copy.
    """
    if groups == 1:
        return x
    b, length = x.shape[:2]
    rest = x.shape[2:]
    if length % (groups * group_len):
        raise ValueError(f"stream length {length} is not divisible by s * n = {groups} * {group_len}")
    x = x.reshape(b, length // (groups * group_len), groups, group_len, *rest)
    x = x.transpose(1, 2)
    return x.reshape(b * groups, length // groups, *rest)


def asa_ungroup(x: torch.Tensor, groups: int, group_len: int) -> torch.Tensor:
    """Inverse of :func:`asa_group`: ``(b s) (l n) ... -> b (l s n) ...``."""
    if groups == 1:
        return x
    bs, glen = x.shape[:2]
    rest = x.shape[2:]
    b = bs // groups
    x = x.reshape(b, groups, glen // group_len, group_len, *rest).transpose(1, 2)
    return x.reshape(b, glen * groups, *rest)


def joint_attention(
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    q_txt: torch.Tensor,
    k_txt: torch.Tensor,
    v_txt: torch.Tensor,
    groups: int = 1,
    group_len: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference joint (MMDiT) attention with ASA: cat + rearrange + SDPA + inverse.

    For each ASA group, softmax(q k^T / sqrt(d)) v over that group's image members followed by
    its text members; no mask.

    Args:
        q_img, k_img, v_img: (B, Li, H, d) image-stream projections (after q/k norm).
        q_txt, k_txt, v_txt: (B, Lt, H, d) text-stream projections.
        groups, group_len: ASA (s, n); (1, 1) is plain joint attention.
    Returns:
        (out_img (B, Li, H, d), out_txt (B, Lt, H, d)) in the query dtype.
    """
    li = q_img.shape[1]
    q = torch.cat([asa_group(q_img, groups, group_len), asa_group(q_txt, groups, group_len)], dim=1)
    k = torch.cat([asa_group(k_img, groups, group_len), asa_group(k_txt, groups, group_len)], dim=1)
    v = torch.cat([asa_group(v_img, groups, group_len), asa_group(v_txt, groups, group_len)], dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out.transpose(1, 2).to(q.dtype)
    gli = li // groups
    out_img = asa_ungroup(out[:, :gli], groups, group_len)
    out_txt = asa_ungroup(out[:, gli:], groups, group_len)
    return out_img, out_txt


def fused_joint_attention(
    q_img, k_img, v_img, q_txt, k_txt, v_txt, *, groups: int = 1, group_len: int = 1,
    q_norm_img: Optional[torch.Tensor] = None, k_norm_img: Optional[torch.Tensor] = None,
    q_norm_txt: Optional[torch.Tensor] = None, k_norm_txt: Optional[torch.Tensor] = None,
    eps: float = 1e-6, text_output: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What :func:`nitro_ar.kernels.joint_attention.joint_attention` computes (same arguments,
    unchecked): the per-head q/k RMSNorm (:func:`qk_rms_norm`, all four weights or none), then
    :func:`joint_attention`. The text queries are always computed (so without ``text_output``
    their gradients are zeros, as in the kernels). Returns (out_img, out_txt | None), contiguous.
    """
    norms = (q_norm_img, k_norm_img, q_norm_txt, k_norm_txt)
    if q_norm_img is not None:
        q_img, k_img, q_txt, k_txt = (qk_rms_norm(x, w, eps) for x, w in zip((q_img, k_img, q_txt, k_txt), norms))
    out_img, out_txt = joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, groups, group_len)
    return out_img.contiguous(), out_txt.contiguous() if text_output else None


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional multi-head attention over one stream: (B, L, H, d) -> (B, L, H, d), contiguous."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Guided Euler step (kernel: flow_step)
# --------------------------------------------------------------------------------------------
def guided_velocity(v: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance of v = [uncond; cond] (2N rows): ``v_u + cfg * (v_c - v_u)``, N rows."""
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step as diffusers computes it: ``x.float() + (sigma_next - sigma) * v``, cast to v's dtype.

    sigma, sigma_next: 0-dim float32 tensors (so a half-precision ``v`` keeps its dtype in the
    product, exactly as in the scheduler).
    """
    dt = (sigma_next - sigma).to(v.device)
    return (x.float() + dt * v).to(v.dtype)


def flow_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              cfg: float = 1.0) -> torch.Tensor:
    """Guidance combine (when v holds 2N rows [uncond; cond]) then :func:`euler_step`: what
    :func:`nitro_ar.kernels.flow_step.flow_step` computes. x: (N, ...); v: (2N or N, ...)."""
    if v.shape[0] != x.shape[0]:
        v = guided_velocity(v, cfg)
    return euler_step(x, v, sigma, sigma_next)


# --------------------------------------------------------------------------------------------
# Linear with fused prologue and epilogue (kernel: fused_linear)
# --------------------------------------------------------------------------------------------
# Activations an epilogue applies to ``x @ W^T + b``. "gelu_mul" is the official SwiGLU's
# ``GELU(g) * v`` (exact GELU) with W = [W_g; W_v] stacked: the output is half as wide.
ACTIVATIONS = (None, "gelu_tanh", "silu", "gelu_mul")


@dataclass(eq=False, frozen=True)
class NormPrologue:
    """The GEMM input is the modulated norm of x's rows: ``norm(x) * (1 + scale) + shift``.

    Attributes:
        norm: ``"layer"`` or ``"rms"``; eps: its epsilon; weight / bias: (K,) or None (x's
            dtype or float32).
        shift, scale: per token (x's shape) or per batch ((B, K) / (B, 1, K)), both or neither.
        adaln: an :class:`AdaLNAffine` with ``shift_chunk`` / ``scale_chunk`` instead of tensors.
    """

    norm: str
    eps: float
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    adaln: Optional[AdaLNAffine] = None


@dataclass(eq=False, frozen=True)
class AddSiLUPrologue:
    """The GEMM input is ``SiLU(x + addend)``; ``addend`` broadcasts against x (e.g. a per-step
    time embedding (S, 1, K) against per-row conditions (1, R, K))."""

    addend: torch.Tensor


@dataclass(eq=False, frozen=True)
class FlowEpilogue:
    """The GEMM output is a velocity and the result the Euler step of ``state`` it gives.

    x is (G, R, K) with G = 2 ([uncond; cond] rows of the same R tokens) or 1; the velocity
    ``v = v_u + cfg (v_c - v_u)`` (G = 2) and the result ``(state.float() + (sigma_next -
    sigma) v).to(dtype)``, state (R, N). sigma / sigma_next: 0-dim float32 tensors on x's device.
    """

    state: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    cfg: float = 1.0


@dataclass(eq=False)
class LinearProblem:
    """One GEMM of a (grouped) fused linear: the arguments of :func:`fused_linear` for one
    problem, plus ``out``, where to write the result (e.g. a column slice of a concatenation)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    prologue: Union[NormPrologue, AddSiLUPrologue, None] = None
    residual: Optional[torch.Tensor] = None
    gate: Union[torch.Tensor, AdaLNAffine, None] = None
    out: Optional[torch.Tensor] = None


def activation(y: torch.Tensor, kind: Optional[str]) -> torch.Tensor:
    """The epilogue activations of :data:`ACTIVATIONS` in plain torch: y (..., N) -> (..., N),
    or (..., N / 2) for ``"gelu_mul"``."""
    if kind is None:
        return y
    if kind == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if kind == "silu":
        return F.silu(y)
    if kind == "gelu_mul":
        gate, value = y.chunk(2, dim=-1)
        return F.gelu(gate) * value
    raise ValueError(f"unknown activation {kind!r}")


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    prologue: Union[NormPrologue, AddSiLUPrologue, None] = None,
    activation_kind: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    gate: Union[torch.Tensor, AdaLNAffine, None] = None,
    flow: Optional[FlowEpilogue] = None,
) -> torch.Tensor:
    """What :func:`nitro_ar.kernels.fused_linear.fused_linear` computes, one problem, unchecked:

    ``a = prologue(x)``; ``y = activation(a @ weight^T + bias)``; then ``residual + gate * y``
    (``residual + y`` without gate), or the Euler step of ``flow``.

    Args:
        x: (B, L, K) (or (N, K)). weight: (N, K) (``"gelu_mul"``: (2H, K)). bias: (N,) or None.
        prologue: :class:`NormPrologue` (:func:`modulated_norm` of x) or :class:`AddSiLUPrologue`.
        residual: broadcastable to the output; gate: per token / per batch tensor, or an
            :class:`AdaLNAffine` whose ``gate_chunk`` is the gate.
        flow: :class:`FlowEpilogue` (x is (G, R, K)); excludes residual and activation.
    Returns:
        (B, L, N) in x's dtype ((R, N) with ``flow``).
    """
    a = x
    if isinstance(prologue, NormPrologue):
        a = modulated_norm(x, norm=prologue.norm, eps=prologue.eps, weight=prologue.weight, bias=prologue.bias,
                           shift=prologue.shift, scale=prologue.scale, adaln=prologue.adaln)
    elif isinstance(prologue, AddSiLUPrologue):
        a = F.silu(x + prologue.addend)
    y = activation(F.linear(a, weight, bias), activation_kind)
    if flow is not None:
        return flow_step(flow.state, y.flatten(0, 1) if y.dim() == 3 else y, flow.sigma, flow.sigma_next, flow.cfg)
    if residual is None:
        return y
    if isinstance(gate, AdaLNAffine):
        gate = adaln_affine(gate.temb, gate.bias, gate.scale)[:, gate.gate_chunk]
    return residual + (y if gate is None else _against(y, gate) * y)


def linear_problems(problems: Sequence[LinearProblem], activation_kind: Optional[str] = None,
                    flow: Optional[FlowEpilogue] = None) -> List[torch.Tensor]:
    """:func:`fused_linear` of each :class:`LinearProblem`, written into its ``out`` when given."""
    results = []
    for p in problems:
        y = fused_linear(p.x, p.weight, p.bias, prologue=p.prologue, activation_kind=activation_kind,
                         residual=p.residual, gate=p.gate, flow=flow)
        results.append(y if p.out is None else p.out.copy_(y))
    return results
