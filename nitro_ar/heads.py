"""Nitro-AR's flow-matching prediction heads (eager reference) and their Euler sampler.

``MLPHead`` is the ``gan`` variant's per-token head (official ``SimpleMLPAdaLN``);
``TransformerHead`` is the ``joint_gan`` variant's joint-sampling head (official
``SimpleTransformerAdaLN``). Both predict the velocity ``noise - x0`` given the noisy token
``x``, the raw timestep ``t`` in (0, 1000] and the backbone condition ``c``.

Built with ``shortcut=True``, a head also embeds the step size ``dt`` it is asked to take (FAR's
shortcut head, Hang et al. 2025): ``step_embed`` (sinusoidal features + MLP, as the time
embedding, its last layer zero-initialised) joins the step-invariant part of the condition,
so until trained the head computes exactly the official function for every ``dt``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, TimestepEmbedder, modulate, sincos_pos_table
from .schedules import FlowSchedule, euler_step, head_schedule

__all__ = ["MLPHead", "TransformerHead", "FlowHead", "sample_head", "euler_sample", "step_embedder", "embed_step_size",
           "EulerSampler"]


def step_embedder(width: int) -> TimestepEmbedder:
    """The shortcut head's step-size embedding: a TimestepEmbedder whose last Linear is zero,
    so it adds exactly 0 until trained (keys ``step_embed.mlp.{0,2}.{weight,bias}``)."""
    embed = TimestepEmbedder(width)
    nn.init.zeros_(embed.mlp[2].weight)
    nn.init.zeros_(embed.mlp[2].bias)
    return embed


def embed_step_size(step_embed: Optional[nn.Module], dt: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``step_embed(dt)`` in ``like``'s dtype: (1, W) for a 0-dim ``dt`` (one step size for every
    row: embedded once), (N, W) for ``dt`` (N,); None for a head without step embedding.

    dt: step size in the units of the timesteps (T * d, T = 1000 training timesteps); None is
    d = 0, the flow-matching field (what the official samplers, which pass no step size, get)."""
    if step_embed is None:
        return None
    dt = torch.as_tensor(0.0 if dt is None else dt, dtype=torch.float32, device=like.device).reshape(-1)
    return step_embed(dt, like.dtype).to(like.dtype)


class EulerSampler:
    """The reference heads' sampling loop as a method; accelerated heads override it."""

    def sample(self, z: torch.Tensor, noise: torch.Tensor, schedule: FlowSchedule, cfg: float = 1.0) -> torch.Tensor:
        """:func:`euler_sample` over this head (arguments and result as :func:`sample_head`)."""
        return euler_sample(self, z, noise, schedule, cfg)


# --------------------------------------------------------------------------------------------
# MLP head (gan)
# --------------------------------------------------------------------------------------------
class MLPResBlock(nn.Module):
    """LayerNorm -> modulate(shift, scale) -> Linear, SiLU, Linear -> gated residual.

    Keys: ``in_ln``, ``mlp.0``, ``mlp.2``, ``adaLN_modulation.1`` (W -> 3W: shift, scale, gate).
    """

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, W), y (N, W) -> (N, W)."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """Norm (LayerNorm without affine, or RMSNorm), modulate, Linear(W -> out).

    Keys: ``linear``, ``adaLN_modulation.1`` (W -> 2W: shift, scale), ``norm_final`` when RMSNorm.
    """

    def __init__(self, width: int, out_channels: int, rms: bool):
        super().__init__()
        self.norm_final = RMSNorm(width) if rms else nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MLPHead(EulerSampler, nn.Module):
    """Per-token velocity MLP: x (N, C), t (N,), c (N, Dz) -> v (N, C)."""

    def __init__(self, in_channels: int, width: int, depth: int, z_channels: int, shortcut: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(MLPResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, in_channels, rms=False)
        self.step_embed = step_embedder(width) if shortcut else None

    def condition(self, t: torch.Tensor, c: torch.Tensor, dtype: torch.dtype, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = time_embed(t) + cond_embed(c), or time_embed(t) + (cond_embed(c) + step_embed(dt))
        for a shortcut head given a step size ``dt`` (0-dim or (N,)): (N, W)."""
        cond = self.cond_embed(c)
        step = embed_step_size(self.step_embed, dt, cond)
        if step is not None:
            cond = cond + step
        return self.time_embed(t, dtype=dtype) + cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.input_proj(x)
        y = self.condition(t, c, h.dtype, dt)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


# --------------------------------------------------------------------------------------------
# Transformer head (joint_gan)
# --------------------------------------------------------------------------------------------
class HeadAttention(nn.Module):
    """Bidirectional self-attention over the tokens of one image; keys ``qkv`` (no bias), ``proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, W) -> (B, L, W)."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(b, n, w)
        return self.proj(out)


class SwiGLU(nn.Module):
    """timm's ``SwiGLU`` as built by the official head: ``fc2(GELU(fc1_g(x)) * fc1_x(x))`` with
    exact (erf) GELU, despite the name."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1_g = nn.Linear(width, hidden)
        self.fc1_x = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1_g(x)) * self.fc1_x(x))


class TransformerHeadBlock(nn.Module):
    """x += g1 * attn(RMSNorm(x) (1 + s1) + b1); x += g2 * SwiGLU(RMSNorm(x) (1 + s2) + b2).

    (g1, g2, s1, s2, b1, b2) = ``ada_lin.1``(SiLU(c)) per token. Keys: ``norm1``, ``attn.*``,
    ``norm2``, ``mlp.*``, ``ada_lin.1``.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width = width
        self.norm1 = RMSNorm(width)
        self.attn = HeadAttention(width, heads)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, int(width * 4.0 * 2 / 3.0))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, W), c (B, L, W) -> (B, L, W)."""
        b, n, _ = c.shape
        g1, g2, s1, s2, b1, b2 = self.ada_lin(c).view(b, n, 6, self.width).unbind(2)
        x = x + self.attn(modulate(self.norm1(x), b1, s1)) * g1
        return x + self.mlp(modulate(self.norm2(x), b2, s2)) * g2


class TransformerHead(EulerSampler, nn.Module):
    """Joint-sampling velocity transformer: x (B, L, C), t (B,), c (B, L, Dz) -> v (B, L, C).

    Tokens of one image attend to each other; L is the full grid (position table added) or 1
    (the global token, no position table). Heads of 64 channels.
    """

    def __init__(self, in_channels: int, width: int, depth: int, z_channels: int, grid: int = 16, shortcut: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.t_norm = RMSNorm(width)
        self.c_norm = RMSNorm(width)
        self.res_blocks = nn.ModuleList(TransformerHeadBlock(width, width // 64) for _ in range(depth))
        self.final_layer = FinalLayer(width, in_channels, rms=True)
        self.grid = grid
        self.register_buffer("pos_embed_lv0", self.position_table(), persistent=False)
        self.step_embed = step_embedder(width) if shortcut else None

    def position_table(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """(1, grid^2, W) float32; the official head fixes base size 16, interpolation 1."""
        return sincos_pos_table(self.input_proj.out_features, self.grid, base_size=16, device=device)

    def build_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Recompute the (non-persistent) position table, e.g. after a meta-device load."""
        self.pos_embed_lv0 = self.position_table(device).to(dtype)

    def condition(self, t: torch.Tensor, c: torch.Tensor, dtype: torch.dtype, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RMSNorm_t(t_emb) + RMSNorm_c(cond_embed(c)), or RMSNorm_t(t_emb) + (RMSNorm_c(cond_embed(c))
        + step_embed(dt)) for a shortcut head given a step size ``dt`` (0-dim or (B,)): (B, L, W).
        The step embedding stays outside the norms (an RMSNorm of a zero-initialised vector
        would have ~1/sqrt(eps) gradients)."""
        t_emb = self.time_embed(t, dtype).unsqueeze(1)
        cond = self.c_norm(self.cond_embed(c))
        step = embed_step_size(self.step_embed, dt, cond)
        if step is not None:
            cond = cond + step.unsqueeze(1)
        return self.t_norm(t_emb) + cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.input_proj(x)
        if h.shape[1] > 1:
            if h.shape[1] != self.pos_embed_lv0.shape[1]:
                raise ValueError(f"transformer head takes {self.pos_embed_lv0.shape[1]} tokens or 1, got {h.shape[1]}")
            h = h + self.pos_embed_lv0
        y = self.condition(t, c, h.dtype, dt)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class FlowHead(nn.Module):
    """Container matching the official ``DiffLoss`` key prefix (``diffloss.net.*``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


def check_head_inputs(z: torch.Tensor, noise: torch.Tensor, cfg: float) -> None:
    """ValueError unless ``noise`` has the rows and shape that conditions ``z`` call for."""
    guided = cfg != 1.0
    if guided and z.shape[0] % 2:
        raise ValueError(f"with cfg != 1, z must hold [uncond; cond] rows (an even count), got {z.shape[0]}")
    rows = z.shape[0] // 2 if guided else z.shape[0]
    if noise.shape[0] != rows or noise.shape[1:-1] != z.shape[1:-1]:
        raise ValueError(f"noise {tuple(noise.shape)} does not fit conditions z {tuple(z.shape)} (cfg={cfg})")


def sample_head(
    net: nn.Module,
    z: torch.Tensor,
    noise: torch.Tensor,
    schedule: FlowSchedule,
    cfg: float = 1.0,
) -> torch.Tensor:
    """The official head sampling loop with explicit starting noise: ``net.sample(...)``.

    Args:
        net: a head (:class:`MLPHead`, :class:`TransformerHead` or an accelerated subclass,
            whose ``sample`` overrides the reference loop).
        z: conditions, (N, Dz) for the MLP head or (B, L, Dz) for the transformer head; with
            ``cfg != 1`` z holds [uncond; cond] (2N or 2B rows).
        noise: starting latents, N or B rows, same trailing shape as the head's x.
        schedule: from :func:`nitro_ar.schedules.head_schedule` (on the host or on z's device).
        cfg: guidance weight; ``v = v_u + cfg (v_c - v_u)``.
    Returns:
        Sampled tokens, like ``noise``, in ``z.dtype``.
    """
    return net.sample(z, noise, schedule, cfg)


def euler_sample(net: nn.Module, z: torch.Tensor, noise: torch.Tensor, schedule: FlowSchedule, cfg: float = 1.0) -> torch.Tensor:
    """The reference Euler loop of :func:`sample_head` (arguments and result alike)."""
    check_head_inputs(z, noise, cfg)
    guided = cfg != 1.0
    x = noise.to(device=z.device, dtype=z.dtype)
    timesteps = schedule.timesteps.to(z.device)
    step_size = getattr(schedule, "step_size", None)  # a shortcut schedule's d (the heads' step embedding)
    for i in range(len(schedule)):
        x_in = torch.cat([x, x]) if guided else x
        t = timesteps[i].expand(x_in.shape[0])
        v = net(x_in, t, z) if step_size is None else net(x_in, t, z, step_size)
        if guided:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        x = euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1]).to(z.dtype)
    return x


def head_steps_schedule(num_steps: int, transformer: bool, num_train_timesteps: int, shift: float) -> FlowSchedule:
    """:func:`head_schedule` with the truncation rule of the MLP or transformer head."""
    return head_schedule(
        num_steps,
        truncate="transformer" if transformer else "mlp",
        num_train_timesteps=num_train_timesteps,
        shift=shift,
    )
