"""Nitro-AR training objectives: masked AR flow matching, and adversarial head fine-tuning.

Masked AR pre-training (the official recipe):

- a random generation order per image; one mask ratio per optimizer step, drawn from a
  truncated normal on [``mask_ratio_min``, 1] with loc 1 and scale 0.25 ("mar"), or
  ``cos(pi/2 * U)`` ("maskgit"); ``ceil(L * ratio)`` tokens are masked, the first of the order;
- masked inputs hold ``mask_token``; in ``joint_gan``, the global token (the thumbnail latent)
  when every token is masked or when ``global_token_dependency`` is on;
- 10% of the prompts are replaced by the empty-prompt embedding (classifier-free guidance);
- the head learns the flow-matching velocity ``noise - x0`` at ``x_t = (1 - s) x0 + s noise``,
  on masked tokens only, with logit-normal timesteps (diffusers'
  ``compute_density_for_timestep_sampling("logit_normal")`` indexed into the training
  timesteps of ``FlowMatchEulerDiscreteScheduler``): the MLP head (``gan``) draws one timestep
  per token and sees every token ``diffusion_batch_mul`` times; the transformer head
  (``joint_gan``) draws one per image;
- ``joint_gan`` adds the global-token loss: the global head predicts the thumbnail latent from
  the first block group run on ``mask_token``.

Random numbers come from explicit ``torch.Generator`` objects seeded from (seed, optimizer
step, position of the sample in the step's batch), so a run is reproducible, resumes exactly,
and gives the same numbers however the batch is split across processes or micro-batches.

Adversarial fine-tuning of the head (LADD-style, as in the Nitro-AR post): the backbone is
frozen; the head, run for a few Euler steps with the official schedule (3 for the MLP head, 6
for the transformer head), generates the masked tokens; a discriminator made of the frozen
backbone (features of the completed token grid) and a small trainable MLP scores each
generated token against the ground truth; non-saturating GAN losses, alternating updates.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .nitro_ar_model import NitroAR

__all__ = [
    "ObjectiveSettings",
    "StepDraws",
    "draw_step",
    "mix_seed",
    "sample_mask_ratio",
    "num_masked_tokens",
    "logit_normal_timestep_indices",
    "training_timesteps",
    "patchify",
    "MaskedARObjective",
    "HeadGenerator",
    "TokenDiscriminator",
    "freeze_all_but_head",
    "generator_loss",
    "discriminator_loss",
    "official_head_init",
]

RATIO_SAMPLERS = ("mar", "maskgit")
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class ObjectiveSettings:
    """Knobs of the masked AR objective; defaults are the released configs'."""

    mask_ratio_min: float = 0.7
    ratio_sampling: str = "mar"  # "mar" (truncated normal) or "maskgit" (cosine)
    diffusion_batch_mul: int = 2  # head passes per token (gan config: 2; joint config: 1)
    text_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    global_token_dependency: bool = False  # joint_gan: global token in every masked input
    global_loss_weight: float = 1.0  # joint_gan: weight of the global-token loss

    def __post_init__(self) -> None:
        if self.ratio_sampling not in RATIO_SAMPLERS:
            raise ValueError(f"ratio_sampling must be one of {RATIO_SAMPLERS}, got {self.ratio_sampling!r}")
        if not 0.0 <= self.mask_ratio_min < 1.0:
            raise ValueError(f"mask_ratio_min must be in [0, 1), got {self.mask_ratio_min}")
        if self.diffusion_batch_mul < 1:
            raise ValueError(f"diffusion_batch_mul must be >= 1, got {self.diffusion_batch_mul}")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError(f"text_dropout must be in [0, 1], got {self.text_dropout}")


# --------------------------------------------------------------------------------------------
# random draws
# --------------------------------------------------------------------------------------------
def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 over the parts): distinct parts, unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK)) & _MASK
        state = (state + 0x9E3779B97F4A7C15) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        state = z ^ (z >> 31)
    return state >> 1


def sample_mask_ratio(generator: torch.Generator, method: str, mask_ratio_min: float) -> float:
    """One mask ratio. "mar": truncated normal on [mask_ratio_min, 1], loc 1, scale 0.25 (by
    inverting the normal CDF in float64); "maskgit": cos(pi/2 * U), U uniform on [0, 1)."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    if method == "maskgit":
        return float(torch.cos(u * (math.pi / 2)))
    if method != "mar":
        raise ValueError(f"ratio sampling must be one of {RATIO_SAMPLERS}, got {method!r}")
    loc, scale = 1.0, 0.25
    lo = torch.special.ndtr(torch.tensor((mask_ratio_min - loc) / scale, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor(0.0, dtype=torch.float64))
    return float((loc + scale * torch.special.ndtri(lo + u * (hi - lo))).clamp(mask_ratio_min, 1.0))


def num_masked_tokens(seq_len: int, ratio: float) -> int:
    """``ceil(L * ratio)``, at least 1 and at most L."""
    return int(min(seq_len, max(1, math.ceil(seq_len * ratio))))


def logit_normal_timestep_indices(
    count: int, generator: torch.Generator, num_train_timesteps: int, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """(count,) int64 indices into the training timesteps: ``(sigmoid(N(mean, std)) * T).long()``,
    as diffusers' ``compute_density_for_timestep_sampling("logit_normal")`` + the official code."""
    u = torch.sigmoid(torch.normal(mean, std, size=(count,), generator=generator))
    return (u * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)


@functools.lru_cache(maxsize=8)
def training_timesteps(num_train_timesteps: int = 1000, shift: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training (timesteps, sigmas), each (T,) float32, as diffusers'
    ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift)`` builds them: timesteps from
    T down to 1, sigma = shifted t / T. Cached: treat as read-only."""
    t = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
    sigmas = t / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * num_train_timesteps, sigmas


@dataclass
class StepDraws:
    """Random numbers of one micro-batch of B images with L tokens of C channels.

    ``orders`` (B, L) int64: generation order per image (the first ``num_masked`` are masked).
    ``text_drop`` (B,) bool. ``noise`` (B, R, L, C) float32 and ``t_index`` (B, R, L) (per-token
    timesteps, MLP head) or (B, R, 1) (per-image, transformer head) int64, R =
    ``diffusion_batch_mul``. ``global_noise`` (B, 1, C) and ``global_t_index`` (B,) for
    ``joint_gan``.
    """

    num_masked: int
    orders: torch.Tensor
    text_drop: torch.Tensor
    noise: torch.Tensor
    t_index: torch.Tensor
    global_noise: Optional[torch.Tensor] = None
    global_t_index: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "StepDraws":
        def move(x):
            return None if x is None else x.to(device, non_blocking=True)

        return StepDraws(self.num_masked, move(self.orders), move(self.text_drop), move(self.noise),
                         move(self.t_index), move(self.global_noise), move(self.global_t_index))

    def masked_positions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(image index, token index) of every masked token, each (B * num_masked,), image-major."""
        batch = self.orders.shape[0]
        rows = torch.arange(batch, device=self.orders.device).repeat_interleave(self.num_masked)
        return rows, self.orders[:, : self.num_masked].reshape(-1)

    def mask(self) -> torch.Tensor:
        """(B, L) bool, True where the token is masked."""
        mask = torch.zeros(self.orders.shape, dtype=torch.bool, device=self.orders.device)
        return mask.scatter_(1, self.orders[:, : self.num_masked], True)


def draw_step(
    model: NitroAR,
    settings: ObjectiveSettings,
    *,
    seed: int,
    step: int,
    positions: Sequence[int],
) -> StepDraws:
    """All random numbers of one micro-batch, on the CPU.

    Args:
        seed: the run's seed. step: the optimizer step.
        positions: position of each local sample in the step's whole batch (over processes and
            accumulated micro-batches). The mask ratio is drawn once per optimizer step (the
            official code draws one per process and forward); everything else per sample from a
            generator seeded with (seed, step, position). So neither splitting a batch across
            processes nor accumulating it in micro-batches changes any number.
    """
    cfg = model.config
    seq, chans, repeats = cfg.num_tokens, cfg.in_channels, settings.diffusion_batch_mul
    batch_gen = torch.Generator().manual_seed(mix_seed(seed, step, -1))
    ratio = sample_mask_ratio(batch_gen, settings.ratio_sampling, settings.mask_ratio_min)
    per_token = not model.is_joint
    orders, drops, noises, t_indices, g_noises, g_indices = [], [], [], [], [], []
    for position in positions:
        gen = torch.Generator().manual_seed(mix_seed(seed, step, position))
        orders.append(torch.randperm(seq, generator=gen))
        drops.append(torch.rand((), generator=gen) < settings.text_dropout)
        noises.append(torch.randn(repeats, seq, chans, generator=gen))
        count = repeats * seq if per_token else repeats
        idx = logit_normal_timestep_indices(count, gen, cfg.num_sampling_steps, settings.logit_mean, settings.logit_std)
        t_indices.append(idx.view(repeats, seq if per_token else 1))
        if model.is_joint:
            g_noises.append(torch.randn(1, chans, generator=gen))
            g_indices.append(logit_normal_timestep_indices(1, gen, cfg.num_sampling_steps, settings.logit_mean, settings.logit_std))
    return StepDraws(
        num_masked=num_masked_tokens(seq, ratio),
        orders=torch.stack(orders),
        text_drop=torch.stack(drops),
        noise=torch.stack(noises),
        t_index=torch.stack(t_indices),
        global_noise=torch.stack(g_noises) if model.is_joint else None,
        global_t_index=torch.cat(g_indices) if model.is_joint else None,
    )


# --------------------------------------------------------------------------------------------
# masked AR flow-matching objective
# --------------------------------------------------------------------------------------------
def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C) tokens in raster order (token index h * W + w)."""
    return latents.flatten(2).transpose(1, 2)


def _masked_inputs(
    model: NitroAR,
    settings: ObjectiveSettings,
    tokens: torch.Tensor,
    text: torch.Tensor,
    empty_text: torch.Tensor,
    draws: StepDraws,
    thumbnails: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(backbone input tokens (B, L, C), text after dropout (B, Lt, Ct), mask (B, L) bool)."""
    mask = draws.mask()
    text = torch.where(draws.text_drop[:, None, None], empty_text.to(text.dtype).expand_as(text), text)
    fill = model.mask_token.to(tokens.dtype)
    if model.is_joint and (settings.global_token_dependency or draws.num_masked == tokens.shape[1]):
        if thumbnails is None:
            raise ValueError("joint_gan training needs the global-token thumbnails (a dataset built with thumbnails)")
        fill = patchify(thumbnails).to(tokens.dtype)
    return torch.where(mask[..., None], fill, tokens), text, mask


def _flow_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """(x_t, target velocity) of flow matching: x_t = (1 - s) x0 + s n, v = n - x0."""
    return (1.0 - sigma) * x0 + sigma * noise, noise - x0


class MaskedARObjective(nn.Module):
    """The masked AR pre-training loss of a :class:`NitroAR` model.

    ``forward`` is the unit that Accelerate / DDP wraps: every trainable parameter of the model
    takes part in it. ``empty_text`` (1, Lt, Ct) is the empty-prompt embedding.
    """

    def __init__(self, model: NitroAR, empty_text: torch.Tensor, settings: ObjectiveSettings):
        super().__init__()
        self.model, self.settings = model, settings
        self.register_buffer("empty_text", empty_text.detach().float(), persistent=False)
        timesteps, sigmas = training_timesteps(model.config.num_sampling_steps, model.config.shift)
        self.register_buffer("train_timesteps", timesteps.clone(), persistent=False)
        self.register_buffer("train_sigmas", sigmas.clone(), persistent=False)

    def forward(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        draws: StepDraws,
        thumbnails: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Losses of one micro-batch.

        Args:
            latents: (B, C, H, W) float32 scaled image latents.
            text: (B, Lt, Ct) float32 text embeddings.
            draws: from :func:`draw_step`, on the same device.
            thumbnails: (B, C, 1, 1) float32 global-token latents (``joint_gan``).
        Returns:
            ``loss`` (the total, float32 scalar), ``image_loss`` and, for ``joint_gan``,
            ``global_loss``.
        """
        model = self.model
        tokens = patchify(latents)
        inputs, text, mask = _masked_inputs(model, self.settings, tokens, text, self.empty_text, draws, thumbnails)
        z = model.backbone(inputs, text)
        if model.is_joint:
            image_loss = self._joint_image_loss(tokens, z, mask, draws)
            global_loss = self._global_loss(text, thumbnails, draws)
            return {"loss": image_loss + self.settings.global_loss_weight * global_loss,
                    "image_loss": image_loss, "global_loss": global_loss}
        image_loss = self._token_loss(tokens, z, draws)
        return {"loss": image_loss, "image_loss": image_loss}

    def _token_loss(self, tokens: torch.Tensor, z: torch.Tensor, draws: StepDraws) -> torch.Tensor:
        """MLP head: per-token timesteps, R passes; the mean over masked tokens only (the
        official loss runs every token and weights the unmasked ones by 0: the same value)."""
        rows, cols = draws.masked_positions()
        repeats = draws.noise.shape[1]
        x0 = tokens[rows, cols].repeat(repeats, 1)
        cond = z[rows, cols].repeat(repeats, 1)
        noise = draws.noise[rows, :, cols].transpose(0, 1).reshape(x0.shape)
        index = draws.t_index[rows, :, cols].transpose(0, 1).reshape(-1)
        x_t, target = _flow_pair(x0, noise, self.train_sigmas[index][:, None])
        v = self.model.head(x_t, self.train_timesteps[index], cond)
        return (v.float() - target.float()).square().mean()

    def _joint_head_errors(self, tokens: torch.Tensor, z: torch.Tensor, draws: StepDraws) -> torch.Tensor:
        """Transformer head, one timestep per image and head pass: (B * R, L) float32 squared
        error per token (mean over channels), R = head passes per image."""
        batch, seq, chans = tokens.shape
        repeats = draws.noise.shape[1]
        flat = batch * repeats
        x0 = tokens[:, None].expand(batch, repeats, seq, chans).reshape(flat, seq, chans)
        cond = z[:, None].expand(batch, repeats, *z.shape[1:]).reshape(flat, seq, -1)
        index = draws.t_index.reshape(flat)
        x_t, target = _flow_pair(x0, draws.noise.reshape(flat, seq, chans), self.train_sigmas[index][:, None, None])
        v = self.model.head(x_t, self.train_timesteps[index], cond)
        return (v.float() - target.float()).square().mean(-1)

    def _joint_image_loss(self, tokens: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, draws: StepDraws) -> torch.Tensor:
        """Transformer head: one timestep per image; per-image mean over masked tokens, then
        the batch mean."""
        batch, seq, _ = tokens.shape
        per_token = self._joint_head_errors(tokens, z, draws)
        weight = mask[:, None].expand(batch, draws.noise.shape[1], seq).reshape(per_token.shape).float()
        return ((per_token * weight).sum(1) / weight.sum(1)).mean()

    def _global_loss(self, text: torch.Tensor, thumbnails: Optional[torch.Tensor], draws: StepDraws) -> torch.Tensor:
        if thumbnails is None:
            raise ValueError("joint_gan training needs the global-token thumbnails (a dataset built with thumbnails)")
        x0 = patchify(thumbnails)
        index = draws.global_t_index
        x_t, target = _flow_pair(x0, draws.global_noise, self.train_sigmas[index][:, None, None])
        v = self.model.global_head(x_t, self.train_timesteps[index], self.model.global_backbone(text))
        return (v.float() - target.float()).square().mean()


def official_head_init(model: NitroAR) -> None:
    """Initialise the head(s) as the official code does before training from scratch: Xavier-
    uniform Linear weights with zero biases, N(0, 0.02) timestep-MLP weights, zero final
    projection, and (MLP head) zero adaLN modulation, so the untrained head predicts 0."""
    nets = [model.diffloss.net] + ([model.diffloss_global.net] if hasattr(model, "diffloss_global") else [])
    for net in nets:
        for module in net.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in (net.time_embed.mlp[0], net.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(net.final_layer.linear.weight)
        nn.init.zeros_(net.final_layer.linear.bias)
        if not model.is_joint:
            for modulation in [block.adaLN_modulation[-1] for block in net.res_blocks] + [net.final_layer.adaLN_modulation[-1]]:
                nn.init.zeros_(modulation.weight)
                nn.init.zeros_(modulation.bias)


# --------------------------------------------------------------------------------------------
# adversarial fine-tuning of the head
# --------------------------------------------------------------------------------------------
def freeze_all_but_head(model: NitroAR) -> List[nn.Parameter]:
    """Freeze everything but the token head (``diffloss.net``); returns the head's parameters."""
    head = set(id(p) for p in model.diffloss.parameters())
    trainable = []
    for param in model.parameters():
        param.requires_grad_(id(param) in head)
        if id(param) in head:
            trainable.append(param)
    return trainable


class HeadGenerator(nn.Module):
    """The generator of adversarial fine-tuning: frozen backbone + few-step head sampling.

    ``forward`` masks the batch as in pre-training, computes the backbone conditions (no
    gradient: the backbone is frozen), and runs the head for ``head_steps`` Euler steps of the
    official schedule from ``draws.noise[:, 0]``, differentiably. Returns the completed token
    grid (B, L, C) (generated at masked positions, ground truth elsewhere), the real grid
    (B, L, C), the text after dropout (B, Lt, Ct) and the mask (B, L).
    """

    def __init__(self, model: NitroAR, empty_text: torch.Tensor, settings: ObjectiveSettings, head_steps: int):
        super().__init__()
        if head_steps < 1:
            raise ValueError(f"head_steps must be >= 1, got {head_steps}")
        self.model, self.settings, self.head_steps = model, settings, head_steps
        self.register_buffer("empty_text", empty_text.detach().float(), persistent=False)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, draws: StepDraws, thumbnails: Optional[torch.Tensor] = None):
        model = self.model
        tokens = patchify(latents)
        inputs, text, mask = _masked_inputs(model, self.settings, tokens, text, self.empty_text, draws, thumbnails)
        with torch.no_grad():
            z = model.backbone(inputs, text)
        noise = draws.noise[:, 0]
        if model.is_joint:
            sampled = model.head_sample(z, num_steps=self.head_steps, noise=noise)
            fake = torch.where(mask[..., None], sampled.to(tokens.dtype), tokens)
        else:
            rows, cols = draws.masked_positions()
            sampled = model.head_sample(z[rows, cols], num_steps=self.head_steps, noise=noise[rows, cols])
            fake = tokens.index_put((rows, cols), sampled.to(tokens.dtype))
        return fake, tokens, text, mask


class TokenDiscriminator(nn.Module):
    """Scores token latents as real or generated: frozen-backbone features + a small MLP.

    The completed token grid (B, L, C) runs through the frozen backbone with the prompt; for
    each masked position, the MLP reads [backbone feature (D), token latent (C)] and returns a
    logit. Only the MLP is a parameter of this module (the backbone is held by reference, so
    it is neither trained nor saved here); gradients still flow through the backbone to the
    tokens.
    """

    def __init__(self, model: NitroAR, hidden: int = 256):
        super().__init__()
        object.__setattr__(self, "_features", model)  # a reference, not a submodule
        dim, chans = model.config.inner_dim, model.config.in_channels
        self.score = nn.Sequential(
            nn.Linear(dim + chans, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, tokens: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, C), text (B, Lt, Ct), mask (B, L) bool -> logits (number masked,) float32,
        image-major."""
        features = self._features.backbone(tokens, text)
        picked = torch.cat([features[mask], tokens[mask].to(features.dtype)], dim=-1)
        return self.score(picked).squeeze(-1).float()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-D(fake))."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: mean softplus(-D(real)) + mean softplus(D(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
