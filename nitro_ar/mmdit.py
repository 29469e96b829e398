"""E-MMDiT building blocks shared by Nitro-AR and Nitro-E (eager reference).

Module and parameter names follow the official checkpoints, so a state dict loads as is.
"""
from __future__ import annotations

import abc
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import FeedForward, RMSNorm, adaln_affine, joint_attention, modulate

__all__ = [
    "QKRMSNorm",
    "JointAttention",
    "JointTransformerBlock",
    "GELUTanh",
    "shuffle_body",
    "compress_tokens",
    "reconstruct_tokens",
    "EMMDiTTrunk",
]


class QKRMSNorm(nn.Module):
    """Per-head RMSNorm of diffusers' ``Attention(qk_norm="rms_norm")``.

    fp32 statistics; with half-precision weights the normalised value is rounded to the weight
    dtype before the product, as diffusers does. (..., d) -> (..., d).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            return y.to(self.weight.dtype) * self.weight
        return (y * self.weight).to(x.dtype)


class JointAttention(nn.Module):
    """MMDiT joint attention over an image and a text stream (diffusers ``JointAttnProcessor2_0``).

    Keys: ``to_q/to_k/to_v`` (image), ``add_q_proj/add_k_proj/add_v_proj`` (text),
    ``norm_q/norm_k/norm_added_q/norm_added_k`` (per-head RMSNorm, when ``qk_norm``),
    ``to_out.0`` and, unless ``context_pre_only``, ``to_add_out``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: Optional[str], context_pre_only: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.context_pre_only = heads, head_dim, context_pre_only
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        if qk_norm == "rms_norm":
            self.norm_q, self.norm_k = QKRMSNorm(head_dim), QKRMSNorm(head_dim)
            self.norm_added_q, self.norm_added_k = QKRMSNorm(head_dim), QKRMSNorm(head_dim)
        else:
            self.norm_q = self.norm_k = self.norm_added_q = self.norm_added_k = None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = None if context_pre_only else nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor, proj: nn.Linear, norm: Optional[nn.Module]) -> torch.Tensor:
        y = proj(x).unflatten(-1, (self.heads, self.head_dim))
        return norm(y) if norm is not None else y

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, asa: Tuple[int, int] = (1, 1)
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden (B, Li, D), context (B, Lt, D) -> (image out (B, Li, D), text out (B, Lt, D) or None)."""
        q = self._heads(hidden, self.to_q, self.norm_q)
        k = self._heads(hidden, self.to_k, self.norm_k)
        v = self._heads(hidden, self.to_v, None)
        cq = self._heads(context, self.add_q_proj, self.norm_added_q)
        ck = self._heads(context, self.add_k_proj, self.norm_added_k)
        cv = self._heads(context, self.add_v_proj, None)
        out_img, out_txt = joint_attention(q, k, v, cq, ck, cv, asa[0], asa[1])
        out_img = self.to_out[0](out_img.flatten(-2))
        out_txt = None if self.context_pre_only else self.to_add_out(out_txt.flatten(-2))
        return out_img, out_txt


def _block_norms(norm_type: str, dim: int) -> Tuple[nn.Module, nn.Module]:
    """(pre-attention norm, pre-FF norm) of a joint block."""
    if norm_type == "layer":
        return nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    if norm_type == "rms":
        return RMSNorm(dim), RMSNorm(dim)
    raise ValueError(f"norm_type must be 'layer' or 'rms', got {norm_type!r}")


class JointTransformerBlock(nn.Module):
    """One E-MMDiT joint block (image + text streams, one joint attention).

    Args:
        norm_type: "layer" (LayerNorm, Nitro-AR ``gan`` and Nitro-E) or "rms" (``joint_gan``).
        qk_norm: None or "rms_norm".
        context_pre_only: last block: no text output, no text FF.
        adaln_affine: Nitro-E's timestep modulation (parameters ``scale_shift_bias/_scale`` and
            ``_c`` twins for the text stream).
        asa: Alternating Subregion Attention (s, n); (1, 1) is full joint attention.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        norm_type: str = "layer",
        qk_norm: Optional[str] = "rms_norm",
        context_pre_only: bool = False,
        adaln_affine: bool = False,
        asa: Tuple[int, int] = (1, 1),
    ):
        super().__init__()
        self.context_pre_only, self.adaln, self.asa = context_pre_only, adaln_affine, tuple(asa)
        if adaln_affine:
            self.scale_shift_bias = nn.Parameter(torch.randn(6, dim) / dim**0.5)
            self.scale_shift_scale = nn.Parameter(torch.randn(6, dim) / dim**0.5)
            if not context_pre_only:
                self.scale_shift_bias_c = nn.Parameter(torch.randn(6, dim) / dim**0.5)
                self.scale_shift_scale_c = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.norm1, self.norm2 = _block_norms(norm_type, dim)
        self.norm1_context, norm2_context = _block_norms(norm_type, dim)
        self.attn = JointAttention(dim, heads, head_dim, qk_norm, context_pre_only)
        self.ff = FeedForward(dim)
        if context_pre_only:
            self.norm2_context = self.ff_context = None
        else:
            self.norm2_context, self.ff_context = norm2_context, FeedForward(dim)

    def modulation(self, temb: Optional[torch.Tensor], context: bool) -> Optional[Tuple[torch.Tensor, ...]]:
        """The six (B, 1, D) AdaLN-affine chunks of one stream, or None without AdaLN."""
        if not self.adaln or (context and self.context_pre_only):
            return None
        if context:
            mod = adaln_affine(temb, self.scale_shift_bias_c, self.scale_shift_scale_c)
        else:
            mod = adaln_affine(temb, self.scale_shift_bias, self.scale_shift_scale)
        return mod.chunk(6, dim=1)

    @staticmethod
    def _pre_attention(x: torch.Tensor, norm: nn.Module, mod) -> torch.Tensor:
        h = norm(x)
        return h if mod is None else modulate(h, mod[0], mod[1])

    @staticmethod
    def _post_attention(x: torch.Tensor, attn: torch.Tensor, norm: nn.Module, ff: nn.Module, mod) -> torch.Tensor:
        """x + gate * attn, then x + gate * FF(modulate(norm(x)))."""
        x = x + (attn if mod is None else mod[2] * attn)
        h = norm(x)
        if mod is not None:
            h = modulate(h, mod[3], mod[4])
        h = ff(h)
        return x + (h if mod is None else mod[5] * h)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, temb: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x (B, Li, D), c (B, Lt, D), temb (B, 6D) or None -> (x, c or None for the last block)."""
        mod_x, mod_c = self.modulation(temb, False), self.modulation(temb, True)
        attn_x, attn_c = self.attn(
            self._pre_attention(x, self.norm1, mod_x), self._pre_attention(c, self.norm1_context, mod_c), self.asa
        )
        x = self._post_attention(x, attn_x, self.norm2, self.ff, mod_x)
        if self.context_pre_only:
            return x, None
        return x, self._post_attention(c, attn_c, self.norm2_context, self.ff_context, mod_c)


class GELUTanh(nn.Module):
    """tanh-approximate GELU as a module (``torch.nn.GELU('tanh')``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def shuffle_body(dim: int, ratio: int, down: bool) -> nn.Sequential:
    """Pixel(un)shuffle by ``ratio``, 1x1 conv back to ``dim``, GELU(tanh), 1x1 conv.

    Keys ``1.*`` and ``3.*`` as in the official ``Downsample``/``Upsample``/``TokenCompressor``.
    """
    shuffle = nn.PixelUnshuffle(ratio) if down else nn.PixelShuffle(ratio)
    channels = dim * ratio * ratio if down else dim // (ratio * ratio)
    return nn.Sequential(shuffle, nn.Conv2d(channels, dim, 1), GELUTanh(), nn.Conv2d(dim, dim, 1))


def _to_image(tokens: torch.Tensor, side: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _to_tokens(image: torch.Tensor) -> torch.Tensor:
    return image.flatten(2).transpose(1, 2)


def compress_tokens(h: torch.Tensor, body2x: nn.Module, body4x: nn.Module, grid: int) -> torch.Tensor:
    """Multi-path token compression: (B, grid^2, D) -> (B, (grid/2)^2 + (grid/4)^2, D)."""
    image = _to_image(h, grid)
    return torch.cat([_to_tokens(body2x(image)), _to_tokens(body4x(image))], dim=1)


def reconstruct_tokens(
    h: torch.Tensor, skip: torch.Tensor, body2x: nn.Module, body4x: nn.Module, merger: nn.Module, grid: int
) -> torch.Tensor:
    """Inverse of :func:`compress_tokens`, merged with the pre-compression ``skip`` tokens.

    h (B, (grid/2)^2 + (grid/4)^2, D), skip (B, grid^2, D) -> (B, grid^2, D).
    """
    x2, x4 = torch.split(h, [(grid // 2) ** 2, (grid // 4) ** 2], dim=1)
    x2 = _to_tokens(body2x(_to_image(x2, grid // 2)))
    x4 = _to_tokens(body4x(_to_image(x4, grid // 4)))
    return merger(torch.cat([x2, x4, skip], dim=2))


class EMMDiTTrunk(nn.Module, abc.ABC):
    """The three block groups with token compression after group 0 and reconstruction after
    group 1 (plus position reinforcement). Subclasses own the modules and name them as their
    official checkpoint does; they implement :meth:`compress` and :meth:`reconstruct`.
    """

    gradient_checkpointing: bool = False

    def build_block_groups(self, config, *, norm_type: str, adaln_affine: bool) -> nn.ModuleList:
        groups, index = nn.ModuleList(), 0
        last_group = len(config.block_groups) - 1
        for g, count in enumerate(config.block_groups):
            blocks = nn.ModuleList()
            for i in range(count):
                blocks.append(
                    JointTransformerBlock(
                        config.inner_dim,
                        config.num_attention_heads,
                        config.attention_head_dim,
                        norm_type=norm_type,
                        qk_norm=config.qk_norm,
                        context_pre_only=(g == last_group and i == count - 1),
                        adaln_affine=adaln_affine,
                        asa=config.asa_for_block(index),
                    )
                )
                index += 1
            groups.append(blocks)
        return groups

    def build_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Recompute the (non-persistent) position-reinforcement table, e.g. after a meta-device load."""
        self.pos_embed_lv0 = self.config.position_table(device=device).to(dtype)

    @abc.abstractmethod
    def compress(self, h: torch.Tensor) -> torch.Tensor:
        """(B, grid^2, D) -> (B, (grid/2)^2 + (grid/4)^2, D) through this model's modules."""

    @abc.abstractmethod
    def reconstruct(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Compressed tokens + skip (B, grid^2, D) -> (B, grid^2, D) through this model's modules."""

    def run_group(self, group: int, h: torch.Tensor, c: torch.Tensor, temb: Optional[torch.Tensor]):
        """Run the blocks of one group; returns (h, c)."""
        for block in self.block_groups[group]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h, c = checkpoint(block, h, c, temb, use_reentrant=False)
            else:
                h, c = block(h, c, temb)
        return h, c

    def run_trunk(self, h: torch.Tensor, c: torch.Tensor, temb: Optional[torch.Tensor], pos: torch.Tensor):
        """All three groups; ``pos`` (1, L, D) is re-added after reconstruction. Returns h (B, L, D)."""
        h, c = self.run_group(0, h, c, temb)
        skip = h
        h, c = self.run_group(1, self.compress(h), c, temb)
        h = self.reconstruct(h, skip) + pos
        h, _ = self.run_group(2, h, c, temb)
        return h
