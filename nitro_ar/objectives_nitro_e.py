"""Nitro-E training objectives: rectified-flow pre-training with REPA (the official recipe), and
few-step adversarial distillation (the post's optional stage).

Pre-training, as the official ``train.py`` / ``core/loss.py`` / ``core/utils.py``:

- ``x_t = (1 - sigma) x0 + sigma * noise`` on the scaled latents, target ``noise - x0``, the
  network predicting velocity;
- timesteps: ``u`` from diffusers' ``compute_density_for_timestep_sampling`` (default
  ``logit_normal`` with mean 0, std 1; ``mode`` with ``mode_scale`` 1.29; ``uniform``), index
  ``(u * 1000).long()`` into ``FlowMatchEulerDiscreteScheduler(1000, shift 1).timesteps``, the
  sigma of that timestep; the squared error weighted by ``compute_loss_weighting_for_sd3`` (1
  for ``logit_normal``), averaged per sample, then over the batch;
- caption dropout as ``token_drop``: with probability ``class_dropout_prob`` (0.1) a sample's
  text embedding is replaced by the empty prompt's (the mask is not an input: the official
  model ignores ``encoder_attention_mask``, and so does :class:`NitroE`);
- REPA: projector MLPs (``Linear(D, 2048), SiLU, Linear(2048, 2048), SiLU, Linear(2048, 768)``,
  official names ``projectors.{i}.{0,2,4}.*``) read the image tokens after the first block group
  (the official code projects after group 0 whatever ``repa_depth`` >= 0 says: the only stage
  with all 256 tokens, one per DINOv2 patch) and are aligned to DINOv2 ViT-B/14 patch features
  (B, 256, 768) by negative cosine similarity (mean over tokens, then batch), weighted by
  ``proj_coeff`` (0.5). The projectors are training-only: they are not part of :class:`NitroE`
  (whose state dict stays the official inference layout) and are saved beside it.

Few-step distillation (the Nitro-E post: "a combined loss of adversarial loss and diffusion
loss; the discriminator is a feature extractor initialised by the same E-MMDiT model with
frozen parameters and a randomly initialised prediction head"; 20 -> 4 steps, 20k iterations;
no training code released, so these are this project's choices): the student (initialised from
the teacher) is given ``x_t`` at one of the 4-step sampler's timesteps and predicts ``x0`` in
one Euler jump ``x_t - sigma v``; its loss is ``adv_weight`` x the non-saturating generator
loss plus ``diffusion_weight`` x the rectified-flow loss at that timestep. The discriminator
re-noises real and generated ``x0`` with the same noise at a logit-normal sigma, runs the
frozen copy of the teacher and scores the image tokens after each block group with a light MLP
head per group (per-token logits). The real samples are the dataset's latents (the post uses
teacher-generated images). Generator and discriminator losses are Nitro-AR's
(:func:`nitro_ar.objectives.generator_loss` / :func:`~nitro_ar.objectives.discriminator_loss`).

Random numbers come from generators seeded by (seed, optimizer step, position of the sample in
the step's whole batch), as in :mod:`nitro_ar.objectives`, so runs resume exactly and give the
same numbers however a batch is split over processes or micro-batches.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import invalid
from .nitro_e_model import NitroE
from .objectives import discriminator_loss, generator_loss, logit_normal_timestep_indices, mix_seed, training_timesteps
from .schedules import flow_schedule

__all__ = [
    "NitroESettings",
    "FlowDraws",
    "draw_flow_step",
    "timestep_density",
    "loss_weighting",
    "build_projectors",
    "split_projector_state",
    "projection_loss",
    "GroupFeatures",
    "NitroEObjective",
    "StudentGenerator",
    "FeatureDiscriminator",
    "generator_loss",
    "discriminator_loss",
    "PROJECTOR_PREFIX",
]

DENSITY_SCHEMES = ("logit_normal", "mode", "uniform")
PROJECTOR_PREFIX = "projectors."


@dataclass(frozen=True)
class NitroESettings:
    """Knobs of the Nitro-E objectives; defaults are the official ``default_config.yaml``'s
    (``training:`` section) and, for distillation, this project's choices."""

    text_dropout: float = 0.1  # class_dropout_prob
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    proj_coeff: float = 0.5
    # distillation
    student_steps: int = 4
    adv_weight: float = 1.0
    diffusion_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weighting_scheme not in DENSITY_SCHEMES + ("sigma_sqrt", "cosmap", "none"):
            raise invalid("weighting_scheme", self.weighting_scheme, f"one of {DENSITY_SCHEMES + ('sigma_sqrt', 'cosmap', 'none')}")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise invalid("text_dropout", self.text_dropout, "a probability in [0, 1]")
        if self.student_steps < 1:
            raise invalid("student_steps", self.student_steps, "an integer >= 1")
        for name in ("proj_coeff", "adv_weight", "diffusion_weight", "logit_std"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise invalid(name, getattr(self, name), "a finite number >= 0")


# --------------------------------------------------------------------------------------------
# timesteps and random draws
# --------------------------------------------------------------------------------------------
def timestep_density(count: int, generator: torch.Generator, settings: NitroESettings, num_train_timesteps: int) -> torch.Tensor:
    """(count,) int64 indices into the training timesteps, ``(u * T).long()`` with ``u`` drawn as
    diffusers' ``compute_density_for_timestep_sampling(weighting_scheme)``: logit-normal,
    ``mode`` (``1 - u - mode_scale (cos^2(pi u / 2) - 1 + u)``) or uniform (any other scheme)."""
    scheme = settings.weighting_scheme
    if scheme == "logit_normal":
        return logit_normal_timestep_indices(count, generator, num_train_timesteps, settings.logit_mean, settings.logit_std)
    u = torch.rand(count, generator=generator)
    if scheme == "mode":
        u = 1 - u - settings.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``compute_loss_weighting_for_sd3``: ``sigma^-2`` (sigma_sqrt), ``2 / (pi (1 -
    2 s + 2 s^2))`` (cosmap), else 1. Same shape as ``sigmas``, float32."""
    sigmas = sigmas.float()
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


@dataclass
class FlowDraws:
    """Random numbers of one micro-batch of B samples.

    ``noise`` (B, C, H, W) float32; ``t_index`` (B,) int64 (pre-training: into the 1000 training
    timesteps; distillation: into the student's sampler steps); ``text_drop`` (B,) bool;
    distillation only: ``disc_noise`` (B, C, H, W), ``disc_t_index`` (B,) (training timesteps).
    """

    noise: torch.Tensor
    t_index: torch.Tensor
    text_drop: torch.Tensor
    disc_noise: Optional[torch.Tensor] = None
    disc_t_index: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "FlowDraws":
        def move(x):
            return None if x is None else x.to(device, non_blocking=True)

        return FlowDraws(move(self.noise), move(self.t_index), move(self.text_drop), move(self.disc_noise), move(self.disc_t_index))


def draw_flow_step(
    model: NitroE, settings: NitroESettings, *, seed: int, step: int, positions: Sequence[int], distill: bool = False
) -> FlowDraws:
    """All random numbers of one micro-batch, on the CPU, one generator per sample seeded with
    (seed, step, position of the sample in the optimizer step's whole batch)."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.grid_size, cfg.grid_size)
    noises, indices, drops, d_noises, d_indices = [], [], [], [], []
    for position in positions:
        gen = torch.Generator().manual_seed(mix_seed(seed, step, position, 7))
        noises.append(torch.randn(shape, generator=gen))
        drops.append(torch.rand((), generator=gen) < settings.text_dropout)
        if distill:
            indices.append(torch.randint(settings.student_steps, (1,), generator=gen))
            d_noises.append(torch.randn(shape, generator=gen))
            d_indices.append(timestep_density(1, gen, settings, cfg.num_train_timesteps))
        else:
            indices.append(timestep_density(1, gen, settings, cfg.num_train_timesteps))
    return FlowDraws(
        noise=torch.stack(noises), t_index=torch.cat(indices), text_drop=torch.stack(drops),
        disc_noise=torch.stack(d_noises) if distill else None, disc_t_index=torch.cat(d_indices) if distill else None,
    )


# --------------------------------------------------------------------------------------------
# REPA
# --------------------------------------------------------------------------------------------
def build_projectors(hidden_size: int, projector_dim: int = 2048, z_dims: Sequence[int] = (768,)) -> nn.ModuleList:
    """The official REPA projectors (``core/models/projector.py``), one per target feature width:
    Linear(hidden, projector_dim), SiLU, Linear(projector_dim, projector_dim), SiLU,
    Linear(projector_dim, z_dim); PyTorch's default initialisation, as officially."""
    return nn.ModuleList(
        nn.Sequential(
            nn.Linear(hidden_size, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )
        for z_dim in z_dims
    )


def split_projector_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(model tensors, projector tensors without the ``projectors.`` prefix) of an official
    training checkpoint (stage-1 files carry ``projectors.*`` beside the inference weights)."""
    model, projectors = {}, {}
    for key, value in state.items():
        if key.startswith(PROJECTOR_PREFIX):
            projectors[key[len(PROJECTOR_PREFIX):]] = value
        else:
            model[key] = value
    return model, projectors


def projection_loss(targets: Sequence[torch.Tensor], projected: Sequence[torch.Tensor]) -> torch.Tensor:
    """REPA loss: ``-cos(z, z_tilde)`` per token, mean over tokens, over targets, then the batch.

    targets / projected: matching lists of (B, N, Z) tensors. With one target (the official
    ``z_dims: [768]``) this is the official ``calc_proj_loss`` (computed in float32).
    """
    if len(targets) != len(projected) or not targets:
        raise invalid("targets", f"{len(targets)} tensors", f"as many as the projectors ({len(projected)})")
    total = 0.0
    for z, z_tilde in zip(targets, projected):
        if z.shape != z_tilde.shape:
            raise invalid("dino_feat", tuple(z.shape), f"shape {tuple(z_tilde.shape)} (B, image tokens, z_dim)")
        cos = (F.normalize(z_tilde.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1)
        total = total - cos.mean(-1)
    return (total / len(targets)).mean()


class GroupFeatures:
    """Forward hooks capturing the image tokens (B, L_g, D) after block groups of a
    :class:`NitroE` (eager or accelerated: :mod:`nitro_ar.fast` swaps classes, not modules).

    Only records while armed (``with features:``), so the recomputation of gradient
    checkpointing in backward does not overwrite what the forward captured.
    """

    def __init__(self, model: NitroE, groups: Sequence[int]):
        self.groups = tuple(groups)
        self.captured: Dict[int, torch.Tensor] = {}
        self._armed = False
        self._handles = [
            model.block_groups[g][-1].register_forward_hook(self._hook(g)) for g in self.groups
        ]

    def _hook(self, group: int):
        def hook(module, inputs, output):
            if self._armed:
                self.captured[group] = output[0]

        return hook

    def __enter__(self) -> "GroupFeatures":
        self.captured = {}
        self._armed = True
        return self

    def __exit__(self, *exc) -> None:
        self._armed = False

    def take(self) -> List[torch.Tensor]:
        missing = [g for g in self.groups if g not in self.captured]
        if missing:
            raise RuntimeError(f"block groups {missing} did not run")
        out = [self.captured[g] for g in self.groups]
        self.captured = {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# --------------------------------------------------------------------------------------------
# pre-training objective
# --------------------------------------------------------------------------------------------
def _drop_text(text: torch.Tensor, empty_text: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    return torch.where(drop[:, None, None], empty_text.to(text.dtype).expand_as(text), text)


def _flow_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor) -> torch.Tensor:
    """Official ``calc_diff_loss``: weighted squared error (float32), mean per sample, then batch."""
    return (weighting * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(1).mean()


class _FlowBase(nn.Module):
    def __init__(self, model: NitroE, empty_text: torch.Tensor, settings: NitroESettings):
        super().__init__()
        self.model, self.settings = model, settings
        self.register_buffer("empty_text", empty_text.detach().float(), persistent=False)
        timesteps, sigmas = training_timesteps(model.config.num_train_timesteps, model.config.shift)
        self.register_buffer("train_timesteps", timesteps.clone(), persistent=False)
        self.register_buffer("train_sigmas", sigmas.clone(), persistent=False)


class NitroEObjective(_FlowBase):
    """The official Nitro-E pre-training loss (rectified flow + optional REPA).

    The unit Accelerate / DDP wraps: the model and the projectors (when REPA is on) are its
    submodules, the projectors under the official names ``projectors.*``. ``empty_text``
    (1, Lt, Ct) is the empty-prompt embedding.
    """

    def __init__(self, model: NitroE, empty_text: torch.Tensor, settings: NitroESettings,
                 projectors: Optional[nn.ModuleList] = None):
        super().__init__(model, empty_text, settings)
        self.projectors = projectors
        self._features = GroupFeatures(model, (0,)) if projectors is not None else None

    def forward(self, latents: torch.Tensor, text: torch.Tensor, draws: FlowDraws,
                dino_feat: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Losses of one micro-batch.

        Args:
            latents: (B, C, H, W) float32 scaled latents (x 0.41407).
            text: (B, Lt, Ct) text embeddings.
            draws: from :func:`draw_flow_step`, on the same device.
            dino_feat: (B, 256, 768) DINOv2 patch features, needed with REPA.
        Returns:
            ``loss`` (float32 scalar), ``diff_loss`` and, with REPA, ``proj_loss``.
        """
        index = draws.t_index
        sigma = self.train_sigmas[index].view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * draws.noise
        target = draws.noise - latents
        text = _drop_text(text, self.empty_text, draws.text_drop)
        if self._features is None:
            pred = self.model(noisy, text, self.train_timesteps[index])
            diff = _flow_loss(pred, target, loss_weighting(self.settings.weighting_scheme, sigma))
            return {"loss": diff, "diff_loss": diff}
        if dino_feat is None:
            raise invalid("dino_feat", None, "DINOv2 features (B, 256, 768) when REPA is on (repa_depth >= 0)")
        with self._features:
            pred = self.model(noisy, text, self.train_timesteps[index])
        hidden = self._features.take()[0]
        proj = projection_loss([dino_feat], [p(hidden) for p in self.projectors])
        diff = _flow_loss(pred, target, loss_weighting(self.settings.weighting_scheme, sigma))
        return {"loss": diff + self.settings.proj_coeff * proj, "diff_loss": diff, "proj_loss": proj}


# --------------------------------------------------------------------------------------------
# few-step distillation
# --------------------------------------------------------------------------------------------
class StudentGenerator(_FlowBase):
    """The generator of few-step distillation: the student at one of its sampler's steps.

    ``forward`` returns the student's one-jump clean estimate ``x_t - sigma v`` (B, C, H, W),
    the rectified-flow loss at that step, and the text after dropout (B, Lt, Ct).
    """

    def __init__(self, model: NitroE, empty_text: torch.Tensor, settings: NitroESettings):
        super().__init__(model, empty_text, settings)
        schedule = flow_schedule(settings.student_steps, num_train_timesteps=model.config.num_train_timesteps,
                                 shift=model.config.shift)
        self.register_buffer("student_timesteps", schedule.timesteps.clone(), persistent=False)
        self.register_buffer("student_sigmas", schedule.sigmas[:-1].clone(), persistent=False)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, draws: FlowDraws):
        sigma = self.student_sigmas[draws.t_index].view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * draws.noise
        text = _drop_text(text, self.empty_text, draws.text_drop)
        v = self.model(noisy, text, self.student_timesteps[draws.t_index])
        diff = _flow_loss(v, draws.noise - latents, torch.ones_like(sigma))
        return noisy - sigma * v.float(), diff, text

    def renoise(self, x0: torch.Tensor, draws: FlowDraws) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x0 noised at the discriminator's sigma, its timestep (B,))."""
        sigma = self.train_sigmas[draws.disc_t_index].view(-1, 1, 1, 1)
        return (1.0 - sigma) * x0 + sigma * draws.disc_noise, self.train_timesteps[draws.disc_t_index]


class FeatureDiscriminator(nn.Module):
    """Frozen E-MMDiT feature extractor + light trainable heads.

    ``teacher`` is copied and frozen (so the features do not follow the student); it is held by
    reference, not as a submodule: this module's parameters and state dict are the heads only
    (``heads.{g}.*``). Gradients still flow through the frozen copy to the input latents.
    Heads: per block group g, ``Linear(D, hidden), SiLU, Linear(hidden, 1)`` on each image token.
    """

    def __init__(self, teacher: NitroE, hidden: int = 256, groups: Sequence[int] = (0, 1, 2)):
        super().__init__()
        extractor = copy.deepcopy(teacher).requires_grad_(False).eval()
        object.__setattr__(self, "extractor", extractor)
        self.features = GroupFeatures(extractor, groups)
        dim = teacher.config.inner_dim
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1)) for _ in groups
        )

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """latents (B, C, H, W) noised, text (B, Lt, Ct), timestep (B,) -> logits (B, tokens) float32."""
        with self.features:
            self.extractor(latents, text, timestep)
        feats = self.features.take()
        return torch.cat([head(f).squeeze(-1).float() for head, f in zip(self.heads, feats)], dim=1)

