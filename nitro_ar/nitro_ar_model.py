"""Nitro-AR: masked autoregressive generation with continuous tokens (eager reference).

Random numbers of :meth:`NitroAR.generate` are drawn in this fixed order, on the generator's
device (CPU generator: the same numbers on every device), in float32, then cast:

- ``gan``: one ``torch.randperm(L)`` per image (the generation order, images in batch order);
  then, per AR step, ``randn(rows, C)`` for the tokens predicted at that step (rows ordered by
  image, then by position).
- ``joint_gan``: ``randn(B, 1, C)`` for the global token; one ``randperm(L)`` per image; then,
  per AR step, ``randn(B, L, C)``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .checkpoint import PretrainedMixin
from .config import NitroARConfig
from .heads import FlowHead, MLPHead, TransformerHead, head_steps_schedule, sample_head
from .layers import RMSNorm
from .mmdit import EMMDiTTrunk, GELUTanh, compress_tokens, reconstruct_tokens, shuffle_body
from .schedules import cfg_for_step, mar_mask_len, step_head_counts
from .utils import check_tensor

__all__ = ["NitroAR"]


class _ShuffleBlock(nn.Module):
    """Official ``Downsample`` / ``Upsample``: keys ``body.1``, ``body.3``."""

    def __init__(self, dim: int, ratio: int, down: bool):
        super().__init__()
        self.body = shuffle_body(dim, ratio, down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class NitroAR(EMMDiTTrunk, PretrainedMixin):
    """Nitro-AR: E-MMDiT backbone (no timestep) + flow-matching head(s).

    Parameter names are the official checkpoint's (``block_groups.*``, ``downsamplers.*``,
    ``diffloss.net.*``, ...). See :class:`nitro_ar.NitroARConfig` for the variants.
    """

    config_class = NitroARConfig

    def __init__(self, config: NitroARConfig):
        super().__init__()
        self.config = config
        dim, joint = config.inner_dim, config.variant == "joint_gan"
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.in_channels))
        self.context_embedder = nn.Linear(config.caption_channels, dim)
        self.x_proj = nn.Linear(config.in_channels, dim)
        self.z_proj_ln = RMSNorm(dim) if joint else nn.LayerNorm(dim, eps=1e-6)
        self.block_groups = self.build_block_groups(config, norm_type=config.norm_type, adaln_affine=False)
        self.downsamplers = nn.ModuleList([nn.ModuleList([_ShuffleBlock(dim, 2, True), _ShuffleBlock(dim, 4, True)])])
        self.upsamplers = nn.ModuleList([nn.ModuleList([_ShuffleBlock(dim, 2, False), _ShuffleBlock(dim, 4, False)])])
        self.mergers = nn.ModuleList([nn.Sequential(nn.Linear(3 * dim, dim), GELUTanh(), nn.Linear(dim, dim))])
        self.diffloss = FlowHead(self._make_head())
        if joint:
            self.global_z_proj = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            if config.global_head:
                self.diffloss_global = FlowHead(self._make_head())
        self.register_buffer("pos_embed_lv0", config.position_table(), persistent=False)

    # ------------------------------------------------------------------ construction helpers
    def _make_head(self) -> nn.Module:
        cfg = self.config
        if cfg.variant == "gan":
            return MLPHead(cfg.out_channels, cfg.diffloss_w, cfg.diffloss_d, cfg.inner_dim)
        return TransformerHead(cfg.out_channels, cfg.diffloss_w, cfg.diffloss_d, cfg.inner_dim, grid=cfg.grid_size)

    @property
    def seq_len(self) -> int:
        return self.config.num_tokens

    @property
    def is_joint(self) -> bool:
        return self.config.variant == "joint_gan"

    # ------------------------------------------------------------------ backbone
    def compress(self, h: torch.Tensor) -> torch.Tensor:
        down2, down4 = self.downsamplers[0]
        return compress_tokens(h, down2, down4, self.config.grid_size)

    def reconstruct(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up2, up4 = self.upsamplers[0]
        return reconstruct_tokens(h, skip, up2, up4, self.mergers[0], self.config.grid_size)

    def _check_text(self, text: torch.Tensor) -> None:
        check_tensor("text", text, 3, self.config.caption_channels)

    def backbone(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Backbone conditions for every token.

        Args:
            tokens: (B, L, C) latent tokens (masked positions hold ``mask_token``), L = grid^2.
            text: (B, Lt, C_text) text-encoder hidden states.
        Returns:
            (B, L, D) hidden states (D = heads * head_dim) that condition the head.
        """
        check_tensor("tokens", tokens, 3, self.config.in_channels)
        self._check_text(text)
        if tokens.shape[1] != self.seq_len or tokens.shape[0] != text.shape[0]:
            raise ValueError(f"tokens {tuple(tokens.shape)} and text {tuple(text.shape)}: expected (B, {self.seq_len}, C) and (B, Lt, C_text)")
        h = self.z_proj_ln(self.x_proj(tokens) + self.pos_embed_lv0)
        return self.run_trunk(h, self.context_embedder(text), None, self.pos_embed_lv0)

    def global_backbone(self, text: torch.Tensor) -> torch.Tensor:
        """joint_gan: condition of the global token: (B, Lt, C_text) -> (B, 1, D).

        Input is ``mask_token`` per image (no position table), only block group 0 runs, then
        ``global_z_proj``.
        """
        self._require_joint("global_backbone")
        self._check_text(text)
        tokens = self.mask_token.repeat(text.shape[0], 1, 1)
        h = self.z_proj_ln(self.x_proj(tokens))
        h, _ = self.run_group(0, h, self.context_embedder(text), None)
        return self.global_z_proj(h)

    # ------------------------------------------------------------------ heads
    def _require_joint(self, what: str) -> None:
        if not self.is_joint:
            raise ValueError(f"{what} exists only in the joint_gan variant (this model is {self.config.variant!r})")

    @property
    def global_net(self) -> nn.Module:
        """The head that samples the global token (``diffloss_global``, else ``diffloss``)."""
        self._require_joint("the global head")
        holder = getattr(self, "diffloss_global", None)
        return (self.diffloss if holder is None else holder).net

    def head(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Velocity prediction of the head.

        MLP head (gan): x (N, C), t (N,), c (N, D) -> (N, C). Transformer head (joint_gan):
        x (B, L, C), t (B,), c (B, L, D) -> (B, L, C). t is the raw timestep in (0, 1000].
        """
        return self.diffloss.net(x, t, c)

    def global_head(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """joint_gan global-token head: x (B, 1, C), t (B,), c (B, 1, D) -> (B, 1, C)."""
        return self.global_net(x, t, c)

    def head_schedule(self, num_steps: int):
        """The official Euler schedule of this model's head for ``num_steps`` steps."""
        return head_steps_schedule(num_steps, self.is_joint, self.config.num_sampling_steps, self.config.shift)

    def head_sample(self, z: torch.Tensor, *, num_steps: int, cfg: float = 1.0, noise: torch.Tensor) -> torch.Tensor:
        """The official head sampling loop with explicit starting noise.

        Args:
            z: conditions, (N, D) (gan) or (B, L, D) (joint_gan); [uncond; cond] when cfg != 1.
            noise: (N, C) or (B, L, C) starting latents (half of z's rows when cfg != 1).
        Returns:
            Sampled tokens shaped like ``noise``, in z's dtype.
        """
        return sample_head(self.diffloss.net, z, noise, self.head_schedule(num_steps), cfg)

    def global_head_sample(self, z: torch.Tensor, *, num_steps: int, cfg: float = 1.0, noise: torch.Tensor) -> torch.Tensor:
        """joint_gan: sample the global token. z (B or 2B, 1, D), noise (B, 1, C) -> (B, 1, C)."""
        return sample_head(self.global_net, z, noise, self.head_schedule(num_steps), cfg)

    # ------------------------------------------------------------------ sampling
    def _draw_orders(self, batch: int, generator, device) -> torch.Tensor:
        return torch.stack([torch.randperm(self.seq_len, generator=generator, device=device) for _ in range(batch)])

    @torch.no_grad()
    def generate(
        self,
        text_emb: torch.Tensor,
        uncond_emb: Optional[torch.Tensor] = None,
        *,
        ar_steps: Optional[int] = None,
        head_steps: Union[int, Sequence[int], None] = None,
        cfg: Optional[float] = None,
        cfg_schedule: str = "constant",
        head_steps_schedule: str = "constant",
        head_steps_end: Optional[int] = None,
        refine: bool = False,
        global_token_dependency: bool = False,
        generator: Optional[torch.Generator] = None,
        callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """Generate image latents with masked AR sampling.

        Args:
            text_emb: (B, Lt, C_text) prompt embeddings.
            uncond_emb: (1 or B, Lt, C_text) empty-prompt embeddings; required when cfg != 1.
            ar_steps: AR iterations (default: the config's, 20 for gan, 1 for joint_gan).
            head_steps: Euler steps of the head per AR step (default 3 gan / 6 joint_gan), or a
                list with one count per AR step.
            cfg: guidance weight (default 4.0); ``cfg_schedule`` "constant" or "linear".
            head_steps_schedule, head_steps_end: DiSA step annealing ("linear", "cosine",
                "two-stage") from ``head_steps`` down to ``head_steps_end``.
            refine: re-predict every already generated token at each step (not only new ones).
            global_token_dependency: joint_gan: keep the global token in positions not predicted
                at the first step (the official inference replaces them by the mask token).
            generator: source of all random numbers (see the module docstring for their order).
            callback: called as ``callback(step, tokens)`` after each AR step.
        Returns:
            (B, C, H, W) latents in the model's scaled latent space (divide by
            ``config.scaling_factor`` before the VAE decoder).
        """
        cfg_ = self.config
        ar_steps = cfg_.ar_steps if ar_steps is None else int(ar_steps)
        head_steps = cfg_.head_steps if head_steps is None else head_steps
        guidance = cfg_.cfg if cfg is None else float(cfg)
        if ar_steps < 1:
            raise ValueError(f"ar_steps must be >= 1, got {ar_steps}")
        counts = step_head_counts(ar_steps, head_steps, head_steps_schedule, head_steps_end)
        self._check_text(text_emb)
        batch, device, dtype = text_emb.shape[0], self.device, self.dtype
        text_emb = text_emb.to(device=device, dtype=dtype)
        guided = guidance != 1.0
        if guided:
            if uncond_emb is None:
                raise ValueError("uncond_emb is required when cfg != 1")
            self._check_text(uncond_emb)
            if uncond_emb.shape[0] not in (1, batch) or uncond_emb.shape[1] != text_emb.shape[1]:
                raise ValueError(f"uncond_emb {tuple(uncond_emb.shape)} does not fit text_emb {tuple(text_emb.shape)}")
            uncond = uncond_emb.to(device=device, dtype=dtype).expand(batch, -1, -1)
            text_in = torch.cat([uncond, text_emb])
        else:
            text_in = text_emb
        gen_device = generator.device if generator is not None else device
        chans, seq = cfg_.in_channels, self.seq_len

        def randn(*shape):
            return torch.randn(*shape, generator=generator, device=gen_device).to(device=device, dtype=dtype)

        def doubled(x):
            return torch.cat([x, x]) if guided else x

        if self.is_joint:
            global_noise = randn(batch, 1, chans)
            global_token = self.global_head_sample(
                self.global_backbone(text_in), num_steps=counts[0], cfg=guidance, noise=global_noise
            )
            tokens = global_token.expand(batch, seq, chans).clone()
        else:
            tokens = self.mask_token.to(dtype).expand(batch, seq, chans).clone()
        orders = self._draw_orders(batch, generator, gen_device).to(device)
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        for step in range(ar_steps):
            z = self.backbone(doubled(tokens), text_in)
            mask_len = mar_mask_len(step, ar_steps, seq, int(mask.sum(-1)[0]))
            mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :mask_len], True)
            last = step == ar_steps - 1
            if refine:
                to_pred = torch.ones_like(mask) if last else ~mask_next
            else:
                to_pred = mask if last else mask & ~mask_next
            mask = mask_next
            weight = cfg_for_step(guidance, cfg_schedule, seq, mask_len)
            new_tokens = tokens.clone()
            if self.is_joint:
                sampled = self.head_sample(z, num_steps=counts[step], cfg=weight, noise=randn(batch, seq, chans))
                if not global_token_dependency and step == 0:
                    new_tokens = self.mask_token.to(dtype).expand(batch, seq, chans).clone()
                new_tokens[to_pred] = sampled[to_pred]
            else:
                rows = to_pred.nonzero(as_tuple=True)
                z_rows = torch.cat([z[:batch][rows], z[batch:][rows]]) if guided else z[rows]
                new_tokens[rows] = self.head_sample(
                    z_rows, num_steps=counts[step], cfg=weight, noise=randn(rows[0].numel(), chans)
                )
            tokens = new_tokens
            if callback is not None:
                callback(step, tokens)
        grid = cfg_.grid_size
        return tokens.reshape(batch, grid, grid, chans).permute(0, 3, 1, 2).contiguous()
