"""TensorAR-style refinement for masked AR with continuous tokens (window k).

TensorAR (Cheng et al. 2025, arXiv 2505.16324) predicts, at each AR step, an overlapping window
of k tokens, so every token is predicted k times and the first token of each window is final;
training noises each input token by its position in the window (its age) so the model learns
to refine instead of copying. This module adapts it to Nitro-AR's masked AR:

What follows the paper:
- every token is predicted k times: at the step that first generates it and at the k - 1 steps
  after it; it is final after that, and after the last AR step k - 1 flush passes refine the
  remaining window to final (Algorithm 1) (``generate(window=k)``; ``flush_window=False``
  finalises at once instead, this package's option);
- re-predicted tokens are sampled again from fresh noise (the window is regenerated whole);
- in training, tokens of the window are noised on their way in by a schedule over their
  position in the window, one of the paper's four kinds (linear, sine, square root,
  exponential), and the loss covers them as well as the new tokens;
- the new parameters start as the identity (the paper's residual design keeps the base
  model's output): the age embedding is zero-initialised, so the model is the official one
  until trained; k = 1 is plain masked AR.

What is this package's adaptation (guesses, not from the paper):
- a window is "the tokens of the last k - 1 AR steps", not k adjacent raster tokens: a token's
  age a is the number of AR steps since it was first generated (0 at the step after), and
  tokens with ``a <= k - 2`` are re-predicted; at training time the tokens of the last k - 1
  steps are reconstructed from the cosine schedule of ``K`` AR steps and the generation order
  (:func:`band_bounds`: the mask length placed on the sampling schedule's grid, so the bands are
  those sampling sees, rather than the continuous ``M_j = floor(L cos(pi/2 (u - j/K)))`` of the
  design notes, which is one token off at the grid's own points);
- the noise is continuous, on the token values, ``x~ = (1 - beta) x0 + beta eps``, eps ~ N(0, I)
  (the paper's Algorithm 2 mixes in a random codebook embedding and snaps to the codebook;
  it also reports Gaussian noise on embeddings working almost as well);
- ``beta_a = gamma(1 - (a + 1) / k)``, newest noisiest, with gamma(u) = u, sin(pi u / 2),
  sqrt(u), (e^u - 1) / (e - 1) (the paper's formulas did not survive extraction);
- the age is told to the backbone by ``age_embed`` (k - 1 rows, added after ``x_proj``) in
  place of the paper's input encoder / output decoder; the loss weight of a window token is 1
  (the same as a masked token); joint_gan needs >= 2 AR steps (one step has no history).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .nitro_ar_model import NitroAR, masked_before_steps
from .objectives import MaskedARObjective, ObjectiveSettings, StepDraws, _flow_pair, _masked_inputs, draw_step, mix_seed, patchify

__all__ = ["AGE_NOISE", "age_noise_level", "band_bounds", "band_ages", "RefineDraws", "draw_refine_step",
           "RefineObjective", "with_refine_window", "complete_age_embedding", "official_age_state"]

AGE_NOISE = ("linear", "sine", "sqrt", "exponential")
AGE_KEY = "age_embed.weight"
_INPUT_NOISE_STREAM = 17  # the third part of the input noise's seed: (seed, step, position, 17)


def _gamma(schedule: str, u: float) -> float:
    if schedule == "linear":
        return u
    if schedule == "sine":
        return math.sin(math.pi * u / 2.0)
    if schedule == "sqrt":
        return math.sqrt(u)
    if schedule == "exponential":
        return (math.exp(u) - 1.0) / (math.e - 1.0)
    raise ConfigError(f"refine_noise must be one of {AGE_NOISE}, got {schedule!r}")


def age_noise_level(age: int, window: int, schedule: str = "sine") -> float:
    """``beta_a = gamma(1 - (a + 1) / k)``: the input noise level of a token of age ``a``
    (0 <= a <= k - 2) in a window of ``k`` (newest noisiest, in (0, 1))."""
    if not 0 <= age <= window - 2:
        raise ConfigError(f"age must be in [0, {window - 2}] for window {window}, got {age}")
    return _gamma(schedule, 1.0 - (age + 1) / window)


def band_bounds(seq_len: int, num_masked: int, ar_steps: int, window: int) -> List[int]:
    """Order positions of the window bands: ``[M_0, ..., M_{k-1}]``, ``M_0 = num_masked``.

    The training mask is placed on the K-step cosine schedule of generation
    (:func:`masked_before_steps`, the numbers ``generate`` uses): t is the last step before
    which at least ``num_masked`` tokens are still masked, and ``M_j`` are the tokens still
    masked before step t - j, so order positions ``M_{j-1}:M_j`` are the tokens that step
    t - j generated (age j - 1 at step t). When ``num_masked`` is a mask length of the schedule
    the bands are exactly those of sampling with ``window=k``. Non-decreasing, at most L.
    """
    bounds = masked_before_steps(ar_steps, seq_len)
    step = max(t for t in range(ar_steps) if bounds[t] >= num_masked)
    return [num_masked] + [max(num_masked, bounds[max(step - j, 0)]) for j in range(1, window)]


def band_ages(orders: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """(B, L) int64 age rows for the backbone: ``j - 1`` at order positions ``M_{j-1}:M_j``,
    ``len(bounds) - 1`` (no embedding) elsewhere."""
    ages = torch.full_like(orders, len(bounds) - 1)
    for j in range(1, len(bounds)):
        ages = ages.scatter(1, orders[:, bounds[j - 1] : bounds[j]], j - 1)
    return ages


@dataclass
class RefineDraws(StepDraws):
    """:class:`StepDraws` plus ``input_noise`` (B, L, C) float32, eps of the window tokens."""

    input_noise: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "RefineDraws":
        moved = StepDraws.to(self, device)
        return RefineDraws(**vars(moved), input_noise=self.input_noise.to(device, non_blocking=True))


def draw_refine_step(model: NitroAR, settings: ObjectiveSettings, *, seed: int, step: int,
                     positions: Sequence[int]) -> RefineDraws:
    """:func:`draw_step`'s numbers (unchanged) plus the input noise, per sample from a generator
    seeded with (seed, step, position, 17): reproducible however the batch is split."""
    base = draw_step(model, settings, seed=seed, step=step, positions=positions)
    cfg = model.config
    noise = [torch.randn(cfg.num_tokens, cfg.in_channels,
                         generator=torch.Generator().manual_seed(mix_seed(seed, step, position, _INPUT_NOISE_STREAM)))
             for position in positions]
    return RefineDraws(**vars(base), input_noise=torch.stack(noise))


class RefineObjective(MaskedARObjective):
    """The masked AR loss plus the window tokens of a refinement window ``k``.

    Inputs: masked tokens hold ``mask_token`` as in pre-training; the tokens of the last k - 1
    AR steps (:func:`band_bounds`, K = ``ar_steps``) hold ``(1 - beta_a) x0 + beta_a eps`` and
    get their age embedding; the head's flow-matching loss covers masked and window tokens
    (target: the clean token). ``image_loss`` is the masked part, ``refine_loss`` the window
    part, ``loss`` the mean over both sets of tokens.
    """

    def __init__(self, model: NitroAR, empty_text: torch.Tensor, settings: ObjectiveSettings, *,
                 noise: str = "sine", ar_steps: Optional[int] = None):
        super().__init__(model, empty_text, settings)
        self.window = model.config.refine_window
        self.ar_steps = model.config.ar_steps if ar_steps is None else ar_steps
        if self.window < 2:
            raise ConfigError("refine training needs a model with refine_window >= 2 (NitroARConfig.refine_window)")
        if self.ar_steps < 2:
            raise ConfigError(f"refine training needs >= 2 AR steps (a window spans earlier steps), got {self.ar_steps}"
                              + (" (joint_gan's released config samples in 1 step: set ar_steps)" if model.is_joint else ""))
        _gamma(noise, 0.5)  # named error for an unknown schedule
        self.noise = noise
        levels = [age_noise_level(a, self.window, noise) for a in range(self.window - 1)] + [0.0]
        self.register_buffer("levels", torch.tensor(levels), persistent=False)  # row k-1: clean

    def forward(self, latents: torch.Tensor, text: torch.Tensor, draws: RefineDraws,
                thumbnails: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Losses of one micro-batch (arguments as :meth:`MaskedARObjective.forward`; draws from
        :func:`draw_refine_step`). Returns ``loss``, ``image_loss``, ``refine_loss`` (0 when
        the window is empty) and, for joint_gan, ``global_loss``."""
        model = self.model
        tokens = patchify(latents)
        inputs, text, mask = _masked_inputs(model, self.settings, tokens, text, self.empty_text, draws, thumbnails)
        bounds = band_bounds(tokens.shape[1], draws.num_masked, self.ar_steps, self.window)
        ages = band_ages(draws.orders, bounds)
        beta = self.levels[ages][..., None].to(tokens.dtype)
        noised = (1.0 - beta) * tokens + beta * draws.input_noise.to(tokens.dtype)
        band = ages < self.window - 1
        inputs = torch.where(band[..., None], noised, inputs)
        z = model.backbone(inputs, text, ages)
        per_token, weight = self._per_token_loss(tokens, z, draws, bounds[-1])  # (B, L), over orders[:, :M_{k-1}]
        masked_w, band_w = weight * mask, weight * band
        image_loss = (per_token * masked_w).sum() / masked_w.sum()
        refine_loss = (per_token * band_w).sum() / band_w.sum().clamp(min=1.0)
        loss = (per_token * weight).sum() / weight.sum()
        out = {"image_loss": image_loss, "refine_loss": refine_loss}
        if model.is_joint:
            out["global_loss"] = self._global_loss(text, thumbnails, draws)
            loss = loss + self.settings.global_loss_weight * out["global_loss"]
        out["loss"] = loss
        return out

    def _per_token_loss(self, tokens: torch.Tensor, z: torch.Tensor, draws: StepDraws,
                        covered: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, L) float32 squared error (mean over channels and head passes) and its (B, L)
        weight: the head passes per token at order positions ``:covered``, 0 elsewhere.

        MLP head: per-token timesteps; the transformer head: one timestep per image (per-image
        means, then the batch mean, as pre-training, here over masked + window tokens)."""
        batch, seq, chans = tokens.shape
        repeats = draws.noise.shape[1]
        if self.model.is_joint:
            error = self._joint_head_errors(tokens, z, draws).view(batch, repeats, seq).mean(1)
            # every image covers the same number of tokens: the global mean is the mean of per-image means
            return error, torch.zeros_like(error).scatter(1, draws.orders[:, :covered], 1.0)
        rows = torch.arange(batch, device=tokens.device).repeat_interleave(covered)
        cols = draws.orders[:, :covered].reshape(-1)
        x0 = tokens[rows, cols].repeat(repeats, 1)
        cond = z[rows, cols].repeat(repeats, 1)
        noise = draws.noise[rows, :, cols].transpose(0, 1).reshape(x0.shape)
        index = draws.t_index[rows, :, cols].transpose(0, 1).reshape(-1)
        x_t, target = _flow_pair(x0, noise, self.train_sigmas[index][:, None])
        v = self.model.head(x_t, self.train_timesteps[index], cond)
        error = (v.float() - target.float()).square().mean(-1).view(repeats, -1).mean(0)
        per_token = torch.zeros(batch, seq, dtype=error.dtype, device=tokens.device).index_put((rows, cols), error)
        weight = torch.zeros_like(per_token).index_put((rows, cols), torch.ones_like(error))
        return per_token, weight


def with_refine_window(model: NitroAR, window: int) -> NitroAR:
    """``model`` with ``config.refine_window = window`` (itself when it already has it): the
    same weights and a zero age embedding, so it computes what ``model`` computes. A model
    whose age embedding has another size is refused (ConfigError)."""
    if model.config.refine_window == window:
        return model
    if hasattr(model, "age_embed"):
        raise ConfigError(f"this model was trained for refine_window={model.config.refine_window}, not {window}")
    config = dataclasses.replace(model.config, refine_window=window)
    widened = NitroAR(config).to(device=model.device, dtype=model.dtype)
    widened.load_state_dict(complete_age_embedding(widened, model.state_dict()), strict=True)
    return widened.train(model.training)


# --------------------------------------------------------------------------------------------
# checkpoints: official files have no age embedding
# --------------------------------------------------------------------------------------------
def complete_age_embedding(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with a zero ``age_embed.weight`` when ``model`` has one and ``state`` lacks it
    (an official checkpoint): the windowed model then equals the official one."""
    state = dict(state)
    embed = getattr(model, "age_embed", None)
    if embed is not None and AGE_KEY not in state:
        dtype = next(iter(state.values())).dtype if state else torch.float32
        state[AGE_KEY] = torch.zeros(embed.weight.shape, dtype=dtype)
    return state


def official_age_state(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` without ``age_embed.weight``, for the official layout; CheckpointError when the
    embedding is trained (not zero): the official model has none and would compute another
    function."""
    state = dict(state)
    weight = state.pop(AGE_KEY, None)
    if weight is not None and bool(weight.detach().ne(0).any()):
        raise CheckpointError("this model's age embedding (refinement window) is trained: the official layout has no "
                              "age embedding; save it with save_pretrained instead")
    return state
