"""FAR's shortcut head for Nitro-AR: step-size embeddings, checkpoint handling, and the objective.

FAR (Hang et al. 2025, "Fast Autoregressive Models for Continuous Latent Generation") replaces
the flow-matching head of a masked AR model by a *shortcut* head (Frans et al. 2024): the same
network, also given the step size d it is to take, trained so that one step of size 2d equals
two steps of size d. One head then samples at any step count from 1 to 8.

Conventions (this package's, :mod:`nitro_ar.objectives`): ``x_s = (1 - s) x0 + s noise``, the
head predicts ``v = noise - x0`` (= dx/ds), is given ``t = T s`` and ``dt = T d`` (T = 1000
training timesteps), and sampling runs s from 1 (noise) to 0 (data): ``x <- x - d v``. The
shortcut-models code runs its time the other way (t: 0 = noise -> 1 = data, ``v = x1 - x0``):
its ``x_{t+d} = x_t + d v`` is our ``x_{s-d} = x_s - d v`` with s = 1 - t.

Objective (per head row: a token for the MLP head, an image for the transformer head and the
global head): most rows learn flow matching at d = 0 exactly as in pre-training (logit-normal
timesteps); a fraction ``fraction`` (shortcut-models ``bootstrap_every = 8``: 1/8) learns
self-consistency: with h = d / 2 and the teacher u- (the EMA head, without gradients),

    v1 = u-(x_s, s, h),  x' = clip(x_s - h v1),  v2 = u-(x', s - h, h),
    target = clip((v1 + v2) / 2),   loss = |u(x_s, s, d) - target|^2.

Step sizes (``step_sizes``): "levels" (shortcut-models): d = 2^-k, k uniform in
0 .. log2(levels) - 1 (1 ... 1/64 for 128 levels), s on the student's grid ``1 - j d``, j uniform
in 0 .. 2^k - 1; the teacher's finest level 1 / levels is the flow-matching field (d = 0, which
is where this objective trains flow matching, as FAR does). "uniform" (FAR): s uniform on
(0, 1], h uniform on [0, s / 2).

Checkpoints: :func:`complete_step_embeddings` lets an official (flow-matching) checkpoint load
into a shortcut model (the embedding starts at exactly zero: the official function), and
:func:`official_state_dict` refuses to export a trained step embedding to the official layout.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, invalid
from .heads import step_embedder
from .objectives import MaskedARObjective, ObjectiveSettings, StepDraws, draw_step, mix_seed, patchify

logger = logging.getLogger("nitro_ar.shortcut")

__all__ = [
    "STEP_EMBED",
    "ShortcutSettings",
    "ShortcutDraws",
    "ShortcutObjective",
    "head_nets",
    "enable_shortcut",
    "match_config",
    "complete_step_embeddings",
    "official_state_dict",
    "draw_shortcut_step",
    "consistency_steps",
    "shortcut_errors",
]

STEP_EMBED = "step_embed"
STEP_SIZE_LAWS = ("levels", "uniform")
_SALT = 0x5C0  # keeps the shortcut draws apart from draw_step's


# --------------------------------------------------------------------------------------------
# step embeddings on a model
# --------------------------------------------------------------------------------------------
def head_nets(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(state-dict prefix, head network) of every head of a NitroAR model: ``diffloss.net.``
    and, for joint_gan with a global head, ``diffloss_global.net.``."""
    nets = [("diffloss.net.", model.diffloss.net)]
    holder = getattr(model, "diffloss_global", None)
    if holder is not None:
        nets.append(("diffloss_global.net.", holder.net))
    return nets


def enable_shortcut(model: nn.Module) -> nn.Module:
    """Give every head of ``model`` a step embedding (where it has none) and set
    ``model.config.shortcut``; returns ``model``. FAR's "FMSC" starts from a trained
    flow-matching head this way.

    The new embedding's first Linear is a copy of the head's time embedding's (deterministic,
    and not a dead unit: a zero first layer would give its zero last layer no gradient); its
    last Linear is zero, so the head's outputs do not change.
    """
    for _, net in head_nets(model):
        if getattr(net, STEP_EMBED, None) is None:
            embed = step_embedder(net.time_embed.mlp[2].out_features)
            reference = net.time_embed.mlp[0]
            embed = embed.to(device=reference.weight.device, dtype=reference.weight.dtype)
            with torch.no_grad():
                embed.mlp[0].weight.copy_(reference.weight)
                embed.mlp[0].bias.copy_(reference.bias)
            setattr(net, STEP_EMBED, embed)
    model.config.shortcut = True
    return model


def match_config(model: nn.Module) -> nn.Module:
    """``enable_shortcut(model)`` when ``model.config.shortcut`` is set, else ``model``.

    For models built from a config whose heads were constructed without step embeddings."""
    return enable_shortcut(model) if getattr(model.config, "shortcut", False) else model


def _step_keys(prefix: str) -> List[str]:
    return [f"{prefix}{STEP_EMBED}.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]


def complete_step_embeddings(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with the step-embedding tensors that ``model`` has and ``state`` lacks (an
    official checkpoint has none): the first Linear copied from the head's time embedding,
    the last Linear zero, as :func:`enable_shortcut` makes them. Other keys are untouched."""
    expected = model.state_dict()
    state = dict(state)
    for prefix, _ in head_nets(model):
        keys = _step_keys(prefix)
        if not all(k in expected for k in keys) or any(k in state for k in keys):
            continue
        for param in ("weight", "bias"):
            source = state.get(f"{prefix}time_embed.mlp.0.{param}")
            if source is not None:
                state[f"{prefix}{STEP_EMBED}.mlp.0.{param}"] = source.clone()
            last = expected[f"{prefix}{STEP_EMBED}.mlp.2.{param}"]
            dtype = source.dtype if source is not None else torch.float32
            state[f"{prefix}{STEP_EMBED}.mlp.2.{param}"] = torch.zeros(last.shape, dtype=dtype)
    return state


def official_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` without step-embedding tensors, for the official layout.

    Raises CheckpointError when a step embedding is trained (its last Linear is not zero): the
    official model has no step embedding, so the exported file would compute another function.
    """
    out = dict(state)
    for prefix, _ in head_nets(model):
        keys = [k for k in _step_keys(prefix) if k in out]
        trained = [k for k in keys if ".mlp.2." in k and bool(out[k].detach().ne(0).any())]
        if trained:
            raise CheckpointError(
                f"save_official: the shortcut step embedding of {prefix.rstrip('.')} is trained ({', '.join(trained)} "
                "not zero); the official layout has no step embedding, so the exported model would differ. "
                "Save it with save_pretrained instead."
            )
        for key in keys:
            del out[key]
    return out


# --------------------------------------------------------------------------------------------
# settings and random draws
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShortcutSettings:
    """Knobs of the shortcut objective (defaults: the shortcut-models code's).

    fraction: share of head rows trained for self-consistency (``1 / bootstrap_every``; the
        rest learn flow matching at d = 0). step_sizes: "levels" or "uniform" (module doc).
    levels: the finest level count (``denoise_timesteps``, a power of 2 >= 2).
    clip: bound of the teacher's intermediate state and target (shortcut-models: 4); None: off.
    """

    fraction: float = 1.0 / 8.0
    step_sizes: str = "levels"
    levels: int = 128
    clip: Optional[float] = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0.0 <= self.fraction <= 1.0:
            raise invalid("shortcut.fraction", self.fraction, "a number in [0, 1]", ConfigError)
        if self.step_sizes not in STEP_SIZE_LAWS:
            raise invalid("shortcut.step_sizes", self.step_sizes, f"one of {STEP_SIZE_LAWS}", ConfigError)
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2 or self.levels & (self.levels - 1):
            raise invalid("shortcut.levels", self.levels, "a power of 2 >= 2", ConfigError)
        if self.clip is not None and (isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not self.clip > 0):
            raise invalid("shortcut.clip", self.clip, "a number > 0, or null", ConfigError)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShortcutSettings":
        """From a mapping of field names (a TrainConfig's ``shortcut``); ConfigError for unknown ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown shortcut settings {unknown}; accepted: {sorted(names)}")
        return cls(**dict(data))

    @property
    def num_levels(self) -> int:
        """Student levels k = 0 .. num_levels - 1 (d = 2^-k); log2(levels)."""
        return int(math.log2(self.levels))


@dataclass
class ShortcutDraws(StepDraws):
    """:class:`StepDraws` plus three uniforms per head row (row selection, step size, sigma).

    ``uniforms`` is ``t_index``'s shape + (3,) float32; ``global_uniforms`` (B, 3) for joint_gan.
    """

    uniforms: Optional[torch.Tensor] = None
    global_uniforms: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "ShortcutDraws":
        base = StepDraws.to(self, device)

        def move(x):
            return None if x is None else x.to(device, non_blocking=True)

        return ShortcutDraws(**{f.name: getattr(base, f.name) for f in dataclasses.fields(StepDraws)},
                             uniforms=move(self.uniforms), global_uniforms=move(self.global_uniforms))


def draw_shortcut_step(model: nn.Module, settings: ObjectiveSettings, *, seed: int, step: int,
                       positions: Sequence[int]) -> ShortcutDraws:
    """:func:`nitro_ar.objectives.draw_step` plus the shortcut objective's uniforms, drawn per
    sample from a generator seeded with (seed, step, position, salt): reproducible and
    independent of how the batch is split, like every other draw."""
    base = draw_step(model, settings, seed=seed, step=step, positions=positions)
    rows = base.t_index.shape[1:]
    uniforms, global_uniforms = [], []
    for position in positions:
        gen = torch.Generator().manual_seed(mix_seed(seed, step, position, _SALT))
        uniforms.append(torch.rand(*rows, 3, generator=gen))
        if base.global_noise is not None:
            global_uniforms.append(torch.rand(3, generator=gen))
    return ShortcutDraws(**{f.name: getattr(base, f.name) for f in dataclasses.fields(StepDraws)},
                         uniforms=torch.stack(uniforms),
                         global_uniforms=torch.stack(global_uniforms) if global_uniforms else None)


# --------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------
def consistency_steps(uniforms: torch.Tensor, settings: ShortcutSettings):
    """(s, d, h, teacher d), each float32 (R,), of self-consistency rows from their uniforms (R, 3)
    (columns: selection, step size, sigma): the student steps d from s, the teacher takes two
    steps of h = d / 2 given the step size ``teacher d`` (h; 0 at the finest level, the
    flow-matching field)."""
    u_step, u_sigma = uniforms[:, 1].double(), uniforms[:, 2].double()
    if settings.step_sizes == "levels":
        levels = settings.num_levels
        k = (u_step * levels).floor().clamp(max=levels - 1)
        d = torch.exp2(-k)
        s = 1.0 - (u_sigma * torch.exp2(k)).floor().clamp(max=torch.exp2(k) - 1) * d  # grid: d <= s <= 1
        half = d / 2
        teacher_dt = torch.where(k == levels - 1, torch.zeros_like(half), half)
    else:
        s = 1.0 - u_sigma  # (0, 1]
        half = u_step * s / 2
        d, teacher_dt = 2 * half, half
    return tuple(v.float() for v in (s, d, half, teacher_dt))


def shortcut_errors(
    net: nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    cond: torch.Tensor,
    fm_sigmas: torch.Tensor,
    fm_timesteps: torch.Tensor,
    uniforms: torch.Tensor,
    settings: ShortcutSettings,
    num_train_timesteps: int = 1000,
    teacher: Optional[Mapping[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """Squared errors of a shortcut head on R rows (the loss is their mean, or a masked mean).

    Args:
        net: a head with a step embedding, called ``net(x, t, c, dt)``.
        x0, noise: (R, C) (MLP head) or (R, L, C) (transformer head) data and noise.
        cond: (R, Dz) or (R, L, Dz) conditions (detached for the teacher).
        fm_sigmas, fm_timesteps: (R,) float32 flow-matching sigma and timestep of each row
            (used by the rows that learn flow matching).
        uniforms: (R, 3) float32 in [0, 1): row selection, step size, sigma.
        settings: :class:`ShortcutSettings`. num_train_timesteps: T (t = T s, dt = T d).
        teacher: parameters of the teacher (e.g. the EMA's), by ``net``'s names; None: ``net``'s own.
    Returns:
        (v - target)^2, float32, shaped like x0.
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    total = float(num_train_timesteps)
    sigma, timesteps = fm_sigmas.clone(), fm_timesteps.clone()
    step = torch.zeros_like(sigma)  # the student's d; 0 = flow matching
    chosen = (uniforms[:, 0] < settings.fraction).nonzero().squeeze(1)
    if chosen.numel():
        s, d, half, teacher_dt = consistency_steps(uniforms[chosen], settings)
        sigma[chosen], step[chosen], timesteps[chosen] = s, d, s * total
    x_t = (1.0 - sigma.view(shape)) * x0 + sigma.view(shape) * noise
    target = (noise - x0).float()
    if chosen.numel():
        bound = settings.clip

        def clip(x):
            return x if bound is None else x.clamp(-bound, bound)

        def velocity(x, t):
            args = (x, t, c, teacher_dt * total)
            return (net(*args) if teacher is None else torch.func.functional_call(net, dict(teacher), args)).float()

        with torch.no_grad():
            x_s, c = x_t[chosen], cond[chosen].detach()
            v1 = velocity(x_s, s * total)
            x_mid = clip(x_s.float() - half.view(shape) * v1).to(x_s.dtype)  # x_{s-h}: toward the data
            v2 = velocity(x_mid, (s - half) * total)
            target = target.index_put((chosen,), clip((v1 + v2) / 2))
    v = net(x_t, timesteps, cond, step * total)
    return (v.float() - target).square()


class ShortcutObjective(MaskedARObjective):
    """Masked AR training with shortcut heads (``nitro-ar train`` ``mode: shortcut``).

    Same masking, text dropout and flow-matching rows as :class:`MaskedARObjective`; a
    ``settings.fraction`` of head rows learns self-consistency instead (module doc). The
    model's heads need step embeddings (:func:`enable_shortcut`). ``forward`` takes
    :class:`ShortcutDraws` (:func:`draw_shortcut_step`).

    Teacher: :meth:`set_teacher` hands over the EMA (an object whose ``shadow`` maps the
    model's parameter names to averaged tensors); without one the online head, without
    gradients, gives the targets.
    """

    def __init__(self, model: nn.Module, empty_text: torch.Tensor, settings: ObjectiveSettings,
                 shortcut: ShortcutSettings = ShortcutSettings()):
        super().__init__(model, empty_text, settings)
        missing = [prefix.rstrip(".") for prefix, net in head_nets(model) if getattr(net, STEP_EMBED, None) is None]
        if missing:
            raise ConfigError(f"shortcut training needs step embeddings on {missing}: nitro_ar.shortcut.enable_shortcut(model)")
        self.shortcut = shortcut
        self._teacher = None

    def set_teacher(self, ema: Optional[Any]) -> None:
        """Take the self-consistency targets from ``ema.shadow`` (None: from the online head)."""
        if ema is None:
            logger.warning("shortcut: no EMA of the weights; the self-consistency targets come from the online head "
                           "(without gradients). Turn the EMA on (ema: true) for the published recipe")
        self._teacher = ema

    def _rows(self, net: nn.Module, prefix: str, x0, noise, cond, fm_index, uniforms) -> torch.Tensor:
        teacher = None
        if self._teacher is not None:
            teacher = {name[len(prefix):]: value for name, value in self._teacher.shadow.items() if name.startswith(prefix)}
        return shortcut_errors(net, x0, noise, cond, self.train_sigmas[fm_index], self.train_timesteps[fm_index], uniforms,
                               self.shortcut, self.model.config.num_sampling_steps, teacher)

    def _token_loss(self, tokens: torch.Tensor, z: torch.Tensor, draws: ShortcutDraws) -> torch.Tensor:
        rows, cols = draws.masked_positions()
        repeats = draws.noise.shape[1]
        x0 = tokens[rows, cols].repeat(repeats, 1)
        cond = z[rows, cols].repeat(repeats, 1)
        noise = draws.noise[rows, :, cols].transpose(0, 1).reshape(x0.shape)
        index = draws.t_index[rows, :, cols].transpose(0, 1).reshape(-1)
        uniforms = draws.uniforms[rows, :, cols].transpose(0, 1).reshape(-1, 3)
        return self._rows(self.model.diffloss.net, "diffloss.net.", x0, noise, cond, index, uniforms).mean()

    def _joint_image_loss(self, tokens: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, draws: ShortcutDraws) -> torch.Tensor:
        batch, seq, chans = tokens.shape
        repeats = draws.noise.shape[1]
        flat = batch * repeats
        x0 = tokens[:, None].expand(batch, repeats, seq, chans).reshape(flat, seq, chans)
        cond = z[:, None].expand(batch, repeats, *z.shape[1:]).reshape(flat, seq, -1)
        errors = self._rows(self.model.diffloss.net, "diffloss.net.", x0, draws.noise.reshape(flat, seq, chans), cond,
                            draws.t_index.reshape(flat), draws.uniforms.reshape(flat, 3))
        weight = mask[:, None].expand(batch, repeats, seq).reshape(flat, seq).float()
        return ((errors.mean(-1) * weight).sum(1) / weight.sum(1)).mean()

    def _global_loss(self, text: torch.Tensor, thumbnails: Optional[torch.Tensor], draws: ShortcutDraws) -> torch.Tensor:
        if thumbnails is None:
            raise ValueError("joint_gan training needs the global-token thumbnails (a dataset built with thumbnails)")
        prefix = "diffloss_global.net." if hasattr(self.model, "diffloss_global") else "diffloss.net."
        x0 = patchify(thumbnails)
        errors = self._rows(self.model.global_net, prefix, x0, draws.global_noise, self.model.global_backbone(text),
                            draws.global_t_index, draws.global_uniforms)
        return errors.mean()
