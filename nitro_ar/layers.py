"""Eager reference primitives: the single source of truth for the model layer, tests and benchmarks.

Every function reproduces the arithmetic of the official Nitro-AR / Nitro-E code (diffusers and
timm building blocks) exactly, including where it computes in fp32 and where it casts back, so
that fp32 outputs match the official implementation to rounding. The Triton kernels in
``nitro_ar.kernels`` are tested against these functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "rms_norm",
    "layer_norm",
    "modulate",
    "adaln_affine",
    "AdaLNAffine",
    "gated_residual_norm_modulate",
    "timestep_embedding",
    "sincos_pos_table",
    "asa_group",
    "asa_ungroup",
    "joint_attention",
    "RMSNorm",
    "FeedForward",
    "TimestepEmbedder",
]


# --------------------------------------------------------------------------------------------
# Norms and modulation
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
    """Nitro-E's AdaLN-affine modulation: ``bias[6, D] + temb.view(B, 6, D) * (1 + scale[6, D])``.

    Args:
        temb: (B, 6 * D) shared timestep projection.
        bias, scale: (6, D) per-block parameters.
    Returns:
        (B, 6, D): chunks (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
    """
    batch = temb.shape[0]
    return bias[None] + temb.reshape(batch, 6, -1) * (1 + scale[None])


@dataclass(eq=False, frozen=True)
class AdaLNAffine:
    """Nitro-E's AdaLN-affine modulation as an argument of the fused norm (evaluated in the kernel).

    Chunk k of the modulation is ``bias[k] + temb.view(B, K, D)[:, k] * (1 + scale[k])`` (one
    (D,) row per batch element). Nitro-E's order (K = 6) is shift_msa, scale_msa, gate_msa,
    shift_mlp, scale_mlp, gate_mlp: norm1 uses ``shift_chunk=0, scale_chunk=1``; the fused
    residual + norm2 uses ``gate_chunk=2, shift_chunk=3, scale_chunk=4``.

    Attributes:
        temb: (B, K * D) timestep projection, same dtype as x, unit stride over its last dim.
        bias, scale: (K, D) contiguous block parameters (``scale_shift_bias``,
            ``scale_shift_scale``), x's dtype or float32.
        shift_chunk, scale_chunk: chunk indices of shift and scale (both or neither).
        gate_chunk: chunk index of the residual gate, or None.
    """

    temb: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor
    shift_chunk: Optional[int] = None
    scale_chunk: Optional[int] = None
    gate_chunk: Optional[int] = None


def gated_residual_norm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor],
    norm: nn.Module,
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The "gate, add, norm, modulate" step between two sub-layers of a block.

    ``x_new = x + gate * y`` (or ``x + y`` without gate), then
    ``out = norm(x_new) * (1 + scale) + shift`` (or ``norm(x_new)`` without modulation).

    Args:
        x, y: (B, L, D). gate/shift/scale: broadcastable to (B, L, D) or None.
        norm: ``nn.LayerNorm`` or :class:`RMSNorm` module.
    Returns:
        (x_new, out), both (B, L, D).
    """
    x_new = x + (y if gate is None else gate * y)
    out = norm(x_new)
    if scale is not None:
        out = modulate(out, shift, scale)
    return x_new, out


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight (the official ``RMSNorm`` of the joint model and head).

    State dict: ``weight`` (D,). Forward: (..., D) -> (..., D), same dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


# --------------------------------------------------------------------------------------------
# Feed-forward and embeddings
# --------------------------------------------------------------------------------------------
class _GELUProj(nn.Module):
    """diffusers' ``GELU`` activation module: a projection followed by tanh-approximate GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """MMDiT feed-forward: Linear(D -> mult*D), GELU(tanh), Linear(mult*D -> D).

    Keys match diffusers' ``FeedForward``: ``net.0.proj.*``, ``net.2.*`` (``net.1`` is dropout).
    """

    def __init__(self, dim: int, mult: int = 3):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of raw timesteps, cosines first: [cos(t f_i), sin(t f_i)].

    ``f_i = exp(-ln(max_period) * i / (dim // 2))``, computed in fp32 (official MAR head and
    diffusers ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`` agree on this).

    Args:
        t: (N,) timesteps, any dtype, may be fractional.
    Returns:
        (N, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """256 sinusoidal features -> Linear -> SiLU -> Linear. Keys: ``mlp.0.*``, ``mlp.2.*``.

    Forward: t (N,) -> (N, hidden) in ``dtype`` (default: the weights' dtype).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        if dtype is not None:
            t_freq = t_freq.to(dtype)
        return self.mlp(t_freq)


def sincos_pos_table(
    dim: int,
    grid: int,
    *,
    max_size: int = 96,
    base_size: Optional[int] = None,
    interpolation_scale: float = 1.0,
    full: bool = False,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """diffusers-style 2-D sin-cos position table, centre-cropped to ``grid x grid``.

    Built on a ``max_size x max_size`` grid with coordinate ``index / (max_size / base_size) /
    interpolation_scale`` (fp32); first half of the channels encodes the column, second half the
    row; each half is ``[sin(p w_k), cos(p w_k)]`` with ``w_k = 10000^(-k / (dim / 4))``, evaluated
    in float64 and returned as float32.

    Args:
        dim: channels (multiple of 4).
        grid: side of the crop (tokens per row).
        full: return the whole ``max_size**2`` table (Nitro-E stores it) instead of the crop.
    Returns:
        (1, grid * grid, dim) or (1, max_size * max_size, dim), float32.
    """
    if dim % 4:
        raise ValueError(f"position table needs a channel count divisible by 4, got {dim}")
    if grid > max_size:
        raise ValueError(f"grid {grid} is larger than the position table ({max_size})")
    base_size = grid if base_size is None else base_size
    coords = torch.arange(max_size, dtype=torch.float32, device=device) / (max_size / base_size) / interpolation_scale
    coords = coords.double()
    omega = torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4.0)
    omega = 1.0 / 10000**omega
    ang = coords[:, None] * omega[None]  # (max_size, dim/4)
    enc = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)  # (max_size, dim/2)
    # table[r, c] = [enc(col c), enc(row r)]
    col = enc[None, :, :].expand(max_size, max_size, dim // 2)
    row = enc[:, None, :].expand(max_size, max_size, dim // 2)
    table = torch.cat([col, row], dim=-1).float()
    if not full:
        top = (max_size - grid) // 2
        table = table[top : top + grid, top : top + grid]
    return table.reshape(1, -1, dim).contiguous()


# --------------------------------------------------------------------------------------------
# Joint attention with Alternating Subregion Attention (ASA)
# --------------------------------------------------------------------------------------------
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
