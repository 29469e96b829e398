"""Sampling schedules: flow-matching Euler timesteps, the MAR masking schedule, DiSA, CFG.

The flow-matching rule reproduces diffusers' ``FlowMatchEulerDiscreteScheduler`` (the official
code's scheduler) in the same precisions (numpy float64 spacing, float32 sigmas), so timesteps
and sigmas are bit-identical to the official ones.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from .kernels import reference

__all__ = [
    "FlowSchedule",
    "flow_schedule",
    "head_schedule",
    "mar_mask_len",
    "step_head_counts",
    "cfg_for_step",
    "euler_step",
]


@dataclass(frozen=True)
class FlowSchedule:
    """Euler steps of a flow-matching sampler.

    ``timesteps[i]`` (float32) is what the network is given at step i; the step moves the state
    from ``sigmas[i]`` to ``sigmas[i + 1]`` (float32). ``len(sigmas) == len(timesteps) + 1``.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

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


def step_head_counts(ar_steps: int, head_steps, schedule: str = "constant", end_steps: int = None) -> List[int]:
    """Head (Euler) steps for each AR step: DiSA step annealing.

    Args:
        head_steps: the count at the first AR step (or a sequence of per-step counts, returned as is).
        schedule: "constant"; or, falling from ``head_steps`` to ``end_steps`` over the AR steps,
            "linear", "cosine" (half-cosine), "two-stage" (first half ``head_steps``, then
            ``end_steps``). DiSA (Zhao et al. 2025) uses e.g. 20 -> 5.
    """
    if isinstance(head_steps, Sequence):
        counts = [int(c) for c in head_steps]
        if len(counts) != ar_steps:
            raise ValueError(f"{len(counts)} head step counts given for {ar_steps} AR steps")
    elif schedule == "constant":
        counts = [int(head_steps)] * ar_steps
    else:
        if end_steps is None:
            raise ValueError(f"schedule {schedule!r} needs end_steps")
        start, end, span = float(head_steps), float(end_steps), max(ar_steps - 1, 1)
        if schedule == "linear":
            counts = [round(start + (end - start) * k / span) for k in range(ar_steps)]
        elif schedule == "cosine":
            counts = [round(end + (start - end) * (1 + math.cos(math.pi * k / span)) / 2) for k in range(ar_steps)]
        elif schedule == "two-stage":
            counts = [int(start) if k < (ar_steps + 1) // 2 else int(end) for k in range(ar_steps)]
        else:
            raise ValueError(f"unknown head step schedule {schedule!r}")
    if min(counts) < 1:
        raise ValueError(f"head step counts must be >= 1, got {counts}")
    return counts


def cfg_for_step(cfg: float, schedule: str, seq_len: int, mask_len: int) -> float:
    """Guidance weight of one AR step: constant, or "linear" ``1 + (w-1) (L - mask_len) / L``."""
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * (seq_len - mask_len) / seq_len
    raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")
