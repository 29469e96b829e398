"""Nitro-E: the E-MMDiT diffusion transformer (AdaLN-affine, ASA), eager reference.

:meth:`NitroE.generate` draws one ``randn(B, C, H, W)`` (float32, on the generator's device)
for the starting latents and nothing else.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import PretrainedMixin
from .config import NitroEConfig
from .layers import timestep_embedding
from .mmdit import EMMDiTTrunk, GELUTanh, compress_tokens, reconstruct_tokens, shuffle_body
from .nitro_ar_model import EagerSession, finite_number, integer_argument
from .schedules import euler_step, flow_schedule
from .utils import check_tensor

__all__ = ["NitroE"]


class PatchEmbed(nn.Module):
    """Conv patch embedding plus the centre crop of a stored 2-D sin-cos table.

    Keys: ``proj.*`` and the persistent buffer ``pos_embed`` (1, max_size^2, D).
    """

    def __init__(self, config: NitroEConfig):
        super().__init__()
        p = config.patch_size
        self.max_size = config.pos_embed_max_size
        self.proj = nn.Conv2d(config.in_channels, config.inner_dim, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", config.position_table(full=True))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W / p^2, D) with the position table added."""
        h = self.proj(latents)
        rows, cols = h.shape[-2:]
        top, left = (self.max_size - rows) // 2, (self.max_size - cols) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)
        pos = table[:, top : top + rows, left : left + cols].reshape(1, rows * cols, -1)
        return (h.flatten(2).transpose(1, 2) + pos).to(h.dtype)


class _TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class _TimestepEmbeddings(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = _TimestepEmbedding(256, dim)


class AdaLNSingle(nn.Module):
    """PixArt AdaLN-single: t -> [cos, sin](256) -> Linear, SiLU, Linear -> SiLU -> Linear(D, 6D).

    Keys: ``emb.timestep_embedder.linear_1/linear_2``, ``linear``. Forward: t (B,) -> (B, 6D).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.emb = _TimestepEmbeddings(dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = self.emb.timestep_embedder(timestep_embedding(timestep, 256).to(dtype))
        return self.linear(self.silu(emb))


class TokenCompressor(nn.Module):
    """Keys ``body2x.*``, ``body4x.*``."""

    def __init__(self, dim: int):
        super().__init__()
        self.body2x = shuffle_body(dim, 2, True)
        self.body4x = shuffle_body(dim, 4, True)


class TokenReconstructor(nn.Module):
    """Keys ``body2x.*``, ``body4x.*``, ``mergers.*``."""

    def __init__(self, dim: int):
        super().__init__()
        self.body2x = shuffle_body(dim, 2, False)
        self.body4x = shuffle_body(dim, 4, False)
        self.mergers = nn.Sequential(nn.Linear(3 * dim, dim), GELUTanh(), nn.Linear(dim, dim))


class NitroE(EMMDiTTrunk, PretrainedMixin):
    """Nitro-E velocity predictor: ``model(latents, text, timestep) -> velocity``."""

    config_class = NitroEConfig
    # Where the Euler steps of generate run: None (eager), or a graph runner set by nitro_ar.fast.
    sampling_runner = None

    def __init__(self, config: NitroEConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.pos_embed = PatchEmbed(config)
        self.context_embedder = nn.Linear(config.caption_channels, dim)
        self.adaln_single = AdaLNSingle(dim)
        self.block_groups = self.build_block_groups(config, norm_type="layer", adaln_affine=True)
        self.tokencompressor = nn.ModuleList([nn.ModuleList([TokenCompressor(dim)])])
        self.tokenreconstructor = nn.ModuleList([nn.ModuleList([TokenReconstructor(dim)])])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)
        self.register_buffer("pos_embed_lv0", config.position_table(), persistent=False)

    def compress(self, h: torch.Tensor) -> torch.Tensor:
        comp = self.tokencompressor[0][0]
        return compress_tokens(h, comp.body2x, comp.body4x, self.config.grid_size)

    def reconstruct(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        rec = self.tokenreconstructor[0][0]
        return reconstruct_tokens(h, skip, rec.body2x, rec.body4x, rec.mergers, self.config.grid_size)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Velocity prediction.

        Args:
            latents: (B, C, H, W) noisy scaled latents, H = W = ``config.sample_size``.
            text: (B, Lt, C_text) text-encoder hidden states.
            timestep: (B,) or scalar raw timesteps in [0, 1000].
        Returns:
            (B, C_out, H, W) velocity, in the latents' dtype.
        """
        cfg = self.config
        check_tensor("latents", latents, 4)
        check_tensor("text", text, 3, cfg.caption_channels)
        b, chans, height, width = latents.shape
        if chans != cfg.in_channels or height != cfg.grid_size or width != cfg.grid_size:
            raise ValueError(f"latents {tuple(latents.shape)}: expected (B, {cfg.in_channels}, {cfg.grid_size}, {cfg.grid_size})")
        if text.shape[0] != b:
            raise ValueError(f"text batch {text.shape[0]} != latents batch {b}")
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(b)
        h = self.pos_embed(latents)
        temb = self.adaln_single(timestep, h.dtype)
        h = self.run_trunk(h, self.context_embedder(text), temb, self.pos_embed_lv0)
        h = self.proj_out(self.norm_out(h))
        p = cfg.patch_size
        h = h.reshape(b, height // p, width // p, p, p, cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(b, cfg.out_channels, height, width)

    @torch.no_grad()
    def generate(
        self,
        text_emb: torch.Tensor,
        uncond_emb: Optional[torch.Tensor] = None,
        *,
        steps: Optional[int] = None,
        cfg: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """Flow-matching Euler sampling from noise (sigma 1) to data (sigma 0).

        Args:
            text_emb: (B, Lt, C_text); uncond_emb: (1 or B, Lt, C_text), needed when cfg > 1.
            steps: Euler steps (default 20; the distilled checkpoint: 4 with cfg 1).
            cfg: guidance weight (default 4.5); guidance is on when cfg > 1, as officially.
            generator: draws the starting noise (unless ``latents`` is given).
            latents: optional (B, C, H, W) starting noise.
        Returns:
            (B, C, H, W) scaled latents.
        """
        conf = self.config
        steps = conf.steps if steps is None else integer_argument("steps", steps, 1)
        guidance = finite_number("cfg", conf.cfg if cfg is None else cfg)
        check_tensor("text_emb", text_emb, 3, conf.caption_channels)
        batch, device, dtype = text_emb.shape[0], self.device, self.dtype
        text_in = text_emb.to(device=device, dtype=dtype)
        guided = guidance > 1.0
        if guided:
            if uncond_emb is None:
                raise ValueError("uncond_emb is required when cfg > 1")
            check_tensor("uncond_emb", uncond_emb, 3, conf.caption_channels)
            uncond = uncond_emb.to(device=device, dtype=dtype).expand(batch, -1, -1)
            text_in = torch.cat([uncond, text_in])
        shape = (batch, conf.in_channels, conf.grid_size, conf.grid_size)
        if latents is None:
            gen_device = generator.device if generator is not None else device
            latents = torch.randn(shape, generator=generator, device=gen_device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents {tuple(latents.shape)}: expected {shape}")
        schedule = flow_schedule(steps, num_train_timesteps=conf.num_train_timesteps, shift=conf.shift)
        inputs = {"text": text_in, "latents": latents.to(device=device, dtype=dtype)}

        def constants():
            return {"timesteps": schedule.timesteps.to(device, copy=True), "sigmas": schedule.sigmas.to(device, copy=True)}

        if self.sampling_runner is None:
            session = EagerSession({**inputs, **constants()})
        else:
            session = self.sampling_runner.session(self, ("NitroE", steps, guidance, guided), inputs, constants)
        source = "latents"
        for i in range(steps):
            target = "x1" if source != "x1" else "x0"  # never write what the step reads
            x = session.phase(self._euler_phase(i, guidance if guided else None, source), target,
                              fresh=callback is not None or i == steps - 1)
            source = target
            if callback is not None:
                callback(i, x)
        return x

    def _euler_phase(self, i: int, guidance: Optional[float], source: str):
        """Euler step i from ``buffers[source]``: velocity (guided when ``guidance`` is given), update."""

        def run(b):
            x = b[source]
            x_in = torch.cat([x, x]) if guidance is not None else x
            v = self(x_in, b["text"], b["timesteps"][i].expand(x_in.shape[0]))
            if guidance is not None:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            return euler_step(x, v, b["sigmas"][i], b["sigmas"][i + 1])

        return run
