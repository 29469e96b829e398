"""Eager reference primitives: the single source of truth for the model layer, tests and benchmarks.

Every function reproduces the arithmetic of the official Nitro-AR / Nitro-E code (diffusers and
timm building blocks) exactly, including where it computes in fp32 and where it casts back, so
that fp32 outputs match the official implementation to rounding. The references of the fused
ops (norms, modulation, AdaLN-affine, attention with ASA) are defined once beside the kernels in
:mod:`nitro_ar.kernels.reference` and re-exported here under their names.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import reference
from .kernels.reference import (
    AdaLNAffine,
    adaln_affine,
    asa_group,
    asa_ungroup,
    joint_attention,
    layer_norm,
    modulate,
    rms_norm,
)

__all__ = [
    "rms_norm",
    "layer_norm",
    "modulate",
    "adaln_affine",
    "AdaLNAffine",
    "norm_spec",
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
# Norms and modulation: the eager references live beside the kernels (nitro_ar.kernels.reference)
# --------------------------------------------------------------------------------------------
def norm_spec(norm: nn.Module) -> Tuple[str, float, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(kind, eps, weight, bias) of a norm module (``nn.LayerNorm`` over the last dim, or :class:`RMSNorm`)."""
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return "layer", norm.eps, norm.weight, norm.bias
    if isinstance(norm, RMSNorm):
        return "rms", norm.eps, norm.weight, None
    raise TypeError(f"unsupported norm module {type(norm).__name__}")


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
    ``out = norm(x_new) * (1 + scale) + shift`` (or ``norm(x_new)`` without modulation):
    :func:`nitro_ar.kernels.reference.modulated_norm` with the norm given as its module.

    Args:
        x, y: (B, L, D). gate/shift/scale: broadcastable to (B, L, D) or None.
        norm: ``nn.LayerNorm`` or :class:`RMSNorm` module.
    Returns:
        (x_new, out), both (B, L, D).
    """
    kind, eps, weight, bias = norm_spec(norm)
    return reference.modulated_norm(x, norm=kind, eps=eps, weight=weight, bias=bias, shift=shift, scale=scale,
                                    residual=y, gate=gate)


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
