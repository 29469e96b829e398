"""Sampling schedules: flow-matching Euler timesteps, the MAR masking schedule, DiSA, CFG, and
the shortcut head's uniform steps.

The flow-matching rule reproduces diffusers' ``FlowMatchEulerDiscreteScheduler`` (the official
code's scheduler) in the same precisions (numpy float64 spacing, float32 sigmas), so timesteps
and sigmas are bit-identical to the official ones.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from .errors import invalid
from .kernels import reference

__all__ = [
    "FlowSchedule",
    "flow_schedule",
    "head_schedule",
    "mar_mask_len",
    "step_head_counts",
    "HEAD_STEP_SCHEDULES",
    "ShortcutSchedule",
    "shortcut_schedule",
    "cfg_for_step",
    "euler_step",
]


@dataclass(frozen=True)
class FlowSchedule:
    """Euler steps of a flow-matching sampler.

    ``timesteps[i]`` (float32) is what the network is given at step i; the step moves the state
    from ``sigmas[i]`` to ``sigmas[i + 1]`` (float32). ``len(sigmas) == len(timesteps) + 1``.

    ``time_embedding``: optionally, one sampling head's embedding of ``timesteps`` ((S, W), the
    head's ``schedule_time_embedding``), computed once for many sampling loops (NitroAR.generate:
    once per call); heads that hoist it use it, the reference loop embeds per step.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    time_embedding: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.timesteps)


def _shift(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _train_sigma_range(num_train_timesteps: int, shift: float) -> Tuple[float, float]:
    """(sigma_max, sigma_min) of the training schedule, as diffusers computes them (float32)."""
    t = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
    sigmas = _shift(t / num_train_timesteps, shift)
    return sigmas[0].item(), sigmas[-1].item()


@functools.lru_cache(maxsize=128)
def flow_schedule(num_steps: int, *, num_train_timesteps: int = 1000, shift: float = 1.0) -> FlowSchedule:
    """diffusers ``set_timesteps(num_steps)``: ``num_steps`` timesteps from 1000 down to ~1,
    sigmas ending with an appended 0 (the full-to-zero schedule Nitro-E samples with)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma_max, sigma_min = _train_sigma_range(num_train_timesteps, shift)
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = torch.from_numpy(_shift(t / num_train_timesteps, shift)).to(torch.float32)
    timesteps = sigmas * num_train_timesteps
    return FlowSchedule(timesteps, torch.cat([sigmas, torch.zeros(1)]))


@functools.lru_cache(maxsize=128)
def head_schedule(
    num_steps: int, *, truncate: str, num_train_timesteps: int = 1000, shift: float = 1.0
) -> FlowSchedule:
    """The official diffusion-head rule (cached: treat the returned tensors as read-only) for ``num_steps`` Euler steps.

    n = 1: one step, sigma 1 -> 0. n >= 2: ``set_timesteps(n + 1)`` with the timestep equal to 1
    dropped, so n steps stopping at sigma 0.001 (with shift 1). Timesteps handed to the network
    are truncated to integers for ``truncate="mlp"`` at n = 2 only and for
    ``truncate="transformer"`` at every n >= 2; sigmas always come from the step index.
    """
    if truncate not in ("mlp", "transformer"):
        raise ValueError(f"truncate must be 'mlp' or 'transformer', got {truncate!r}")
    if num_steps == 1:
        return flow_schedule(1, num_train_timesteps=num_train_timesteps, shift=shift)
    full = flow_schedule(num_steps + 1, num_train_timesteps=num_train_timesteps, shift=shift)
    keep = int((full.timesteps != 1).sum())  # only the last timestep can equal 1
    timesteps = full.timesteps[:keep]
    if truncate == "transformer" or num_steps == 2:
        timesteps = timesteps.long().float()
    return FlowSchedule(timesteps, full.sigmas[: keep + 1])


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step as diffusers computes it: ``x.float() + (sigma_next - sigma) * v``, cast to v's dtype.

    sigma, sigma_next: 0-dim float32 tensors (so a half-precision ``v`` keeps its dtype in the
    product, exactly as in the scheduler). Defined once in :func:`nitro_ar.kernels.reference.euler_step`.
    """
    return reference.euler_step(x, v, sigma, sigma_next)


def mar_mask_len(step: int, num_steps: int, seq_len: int, still_masked: int) -> int:
    """Tokens left masked after AR step ``step`` (0-based) of the MAR cosine schedule.

    ``floor(L * cos(pi/2 * (step+1)/K))`` clamped to ``[1, still_masked - 1]`` (at least one,
    so the last step predicts every remaining token).
    """
    ratio = np.cos(math.pi / 2.0 * (step + 1) / num_steps)
    mask_len = float(np.floor(seq_len * ratio))
    return int(max(1.0, min(float(still_masked - 1), mask_len)))


HEAD_STEP_SCHEDULES = ("constant", "linear", "cosine", "two-stage")
HEAD_STEP_ROUNDINGS = ("floor", "nearest")


def _step_count(name: str, value) -> int:
    """``value`` as a head step count: an integer >= 1 (bools, strings and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise invalid(name, value, "an integer >= 1")
    return int(value)


def step_head_counts(
    ar_steps: int, head_steps, schedule: str = "constant", end_steps: int = None, rounding: str = "floor"
) -> List[int]:
    """Head (Euler) steps for each AR step: DiSA step annealing, as its published code computes it.

    Step k of K AR steps gets ``end + floor((start - end) * f(k))`` head steps (DiSA,
    ``MAR_DiSA/models/diffloss.py``, with U = K - 1): linear ``f = (U - k) / U``, cosine
    ``f = (cos(pi k / U) + 1) / 2``; two-stage gives ``start`` while ``k < U / 2``, then ``end``.
    K = 20, 3 -> 1 linear: [3, 2 x 9, 1 x 10].

    Args:
        ar_steps: K, an integer >= 1 (K = 1 gives ``[start]``).
        head_steps: the count at the first AR step, an integer >= 1; or a sequence of K such
            integers, returned as a list.
        schedule: "constant" (``head_steps`` at every step; DiSA's "constant" is its lower
            count instead), or "linear", "cosine", "two-stage" from ``head_steps`` down to
            ``end_steps`` (DiSA uses e.g. 50 -> 5, the Nitro-AR post 20 -> 5).
        end_steps: the count at the last AR step (integer >= 1), for the annealed schedules.
        rounding: "floor" (DiSA's published code) or "nearest" (this package before it
            followed the published code: ``round`` for linear / cosine, and two-stage switching
            at ``k < (K + 1) // 2``).
    Raises:
        InvalidArgumentError naming the argument.
    """
    ar_steps = _step_count("ar_steps", ar_steps)
    if schedule not in HEAD_STEP_SCHEDULES:
        raise invalid("head_steps_schedule", schedule, f"one of {HEAD_STEP_SCHEDULES}")
    if rounding not in HEAD_STEP_ROUNDINGS:
        raise invalid("rounding", rounding, f"one of {HEAD_STEP_ROUNDINGS}")
    if isinstance(head_steps, (list, tuple)):
        counts = [_step_count(f"head_steps[{i}]", c) for i, c in enumerate(head_steps)]
        if len(counts) != ar_steps:
            raise invalid("head_steps", head_steps, f"one integer >= 1 per AR step ({ar_steps} of them)")
        return counts
    start = _step_count("head_steps", head_steps)
    if schedule == "constant":
        return [start] * ar_steps
    if end_steps is None:
        raise invalid("head_steps_end", end_steps, f"an integer >= 1 (schedule {schedule!r} anneals down to it)")
    end = _step_count("head_steps_end", end_steps)
    span = max(ar_steps - 1, 1)
    if schedule == "two-stage":
        switch = (lambda k: k < (ar_steps + 1) // 2) if rounding == "nearest" else (lambda k: k < span / 2)
        return [start if switch(k) else end for k in range(ar_steps)]
    if rounding == "nearest":  # the former formulas, verbatim (same ties)
        if schedule == "linear":
            return [round(start + (end - start) * k / span) for k in range(ar_steps)]
        return [round(end + (start - end) * (1 + math.cos(math.pi * k / span)) / 2) for k in range(ar_steps)]
    # DiSA's float expressions, in its order of operations, floored.
    if schedule == "linear":
        fractions = [(span - k) / span * (start - end) for k in range(ar_steps)]
    else:
        fractions = [(math.cos(math.pi * k / span) + 1) / 2 * (start - end) for k in range(ar_steps)]
    return [end + math.floor(f) for f in fractions]


@dataclass(frozen=True)
class ShortcutSchedule(FlowSchedule):
    """Euler steps of a shortcut head (FAR, Hang et al. 2025): N uniform steps of size d.

    ``sigmas[i] = 1 - i / N`` (float32, from 1 to exactly 0), ``timesteps = sigmas[:-1] * T``
    (float32, not truncated), and ``step_size`` (0-dim float32) = ``T * d``, the step size in the
    units of the timesteps that the head's step embedding is given: d = 1 / N for N <= 16 and
    d = 0 (the flow-matching field) above, as FAR samples. T = the training timesteps (1000).
    The Euler update is the ordinary one (:func:`euler_step`): ``x += (sigma' - sigma) v``.
    """

    step_size: torch.Tensor = None


SHORTCUT_MAX_STEPS = 16  # FAR App. B: d = 1/N up to 16 steps, d = 0 (flow matching) above


@functools.lru_cache(maxsize=128)
def shortcut_schedule(num_steps: int, *, num_train_timesteps: int = 1000) -> ShortcutSchedule:
    """The shortcut sampler's schedule for ``num_steps`` head steps (cached: read-only tensors)."""
    num_steps = _step_count("head_steps", num_steps)
    sigmas = torch.from_numpy(1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps).to(torch.float32)
    d = 1.0 / num_steps if num_steps <= SHORTCUT_MAX_STEPS else 0.0
    return ShortcutSchedule(
        timesteps=sigmas[:-1] * num_train_timesteps,
        sigmas=sigmas,
        step_size=torch.tensor(d * num_train_timesteps, dtype=torch.float32),
    )


def cfg_for_step(cfg: float, schedule: str, seq_len: int, mask_len: int) -> float:
    """Guidance weight of one AR step: constant, or "linear" ``1 + (w-1) (L - mask_len) / L``."""
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * (seq_len - mask_len) / seq_len
    raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")
