"""A toy conditional distribution in a head's token space, to compare flow-matching and shortcut
heads (shared by tests/test_shortcut.py and bench/test_bench_shortcut.py).

Each of ``classes`` conditions is a mixture of ``modes`` isotropic Gaussians in ``channels``
dimensions (means on a sphere of radius ``radius``, std ``std``); the head's condition is a
fixed random vector per class. Both heads are the same :class:`nitro_ar.heads.MLPHead` with a
step embedding, trained with :func:`nitro_ar.shortcut.shortcut_errors` for the same number of
steps and batch: the flow-matching head with ``fraction = 0`` (every row at d = 0), the
shortcut head with the given fraction. Both sample with the same uniform Euler steps
(:func:`nitro_ar.schedules.shortcut_schedule`), the flow-matching head at d = 0.
"""
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from nitro_ar.heads import MLPHead, euler_sample
from nitro_ar.objectives import logit_normal_timestep_indices, training_timesteps
from nitro_ar.schedules import shortcut_schedule
from nitro_ar.shortcut import ShortcutSettings, shortcut_errors


@dataclass(frozen=True)
class Toy:
    channels: int = 32
    classes: int = 4
    modes: int = 4
    cond_dim: int = 16
    radius: float = 2.0
    std: float = 0.15
    seed: int = 0

    def tables(self):
        """(means (K, M, C), condition vectors (K, Dz)), fixed by the seed."""
        g = torch.Generator().manual_seed(self.seed)
        means = torch.randn(self.classes, self.modes, self.channels, generator=g)
        means = self.radius * means / means.norm(dim=-1, keepdim=True)
        return means, torch.randn(self.classes, self.cond_dim, generator=g)

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N,) class labels -> (N, C) samples of their mixtures."""
        means, _ = self.tables()
        mode = torch.randint(self.modes, labels.shape, generator=generator)
        noise = torch.randn(labels.shape[0], self.channels, generator=generator)
        return means[labels, mode] + self.std * noise


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance of two equally sized (N, C) samples (random unit directions)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a.double() @ directions, dim=0)
    pb, _ = torch.sort(b.double() @ directions, dim=0)
    return float((pa - pb).square().mean().sqrt())


def train_head(toy: Toy, fraction: float, *, steps: int, batch: int = 256, width: int = 128, depth: int = 2,
               lr: float = 2e-3, ema_rate: Optional[float] = 0.99, seed: int = 0) -> MLPHead:
    """Train a fresh shortcut-capable MLP head on the toy; ``fraction`` 0 is plain flow matching.
    The self-consistency teacher is the EMA of the weights (rate ``ema_rate``; None: the online head)."""
    torch.manual_seed(seed)
    head = MLPHead(toy.channels, width, depth, toy.cond_dim, shortcut=True)
    settings = ShortcutSettings(fraction=fraction)
    timesteps, sigmas = training_timesteps(1000, 1.0)
    _, conds = toy.tables()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    shadow = {name: p.detach().clone() for name, p in head.named_parameters()} if ema_rate is not None else None
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        labels = torch.randint(toy.classes, (batch,), generator=g)
        x0 = toy.sample(labels, g)
        noise = torch.randn(x0.shape, generator=g)
        index = logit_normal_timestep_indices(batch, g, 1000)
        uniforms = torch.rand(batch, 3, generator=g)
        loss = shortcut_errors(head, x0, noise, conds[labels], sigmas[index], timesteps[index], uniforms, settings,
                               1000, shadow).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if shadow is not None:
            with torch.no_grad():
                for name, p in head.named_parameters():
                    shadow[name].lerp_(p.detach(), 1.0 - ema_rate)
    if shadow is not None:  # sample with the EMA weights
        head.load_state_dict({**head.state_dict(), **shadow})
    return head.eval()


@torch.no_grad()
def sample(head: MLPHead, toy: Toy, labels: torch.Tensor, steps: int, shortcut: bool, seed: int = 0) -> torch.Tensor:
    """Euler samples in ``steps`` uniform steps; the step embedding gets 1000 / steps (shortcut)
    or 0 (flow matching)."""
    _, conds = toy.tables()
    schedule = shortcut_schedule(steps)  # carries the step size to the head's embedding
    if not shortcut:
        schedule = dataclasses.replace(schedule, step_size=torch.zeros(()))
    noise = torch.randn(labels.shape[0], toy.channels, generator=torch.Generator().manual_seed(seed))
    return euler_sample(head, conds[labels], noise, schedule)


def compare(toy: Toy, *, steps: int, fraction: float, step_counts: Sequence[int] = (1, 2, 4, 8), samples: int = 512,
            **train) -> Dict[str, Dict[int, float]]:
    """{"flow_matching" | "shortcut": {head steps: mean over classes of the sliced W2 to true samples}}."""
    heads = {"flow_matching": train_head(toy, 0.0, steps=steps, **train),
             "shortcut": train_head(toy, fraction, steps=steps, **train)}
    g = torch.Generator().manual_seed(1234)
    result: Dict[str, Dict[int, float]] = {name: {} for name in heads}
    for n in step_counts:
        for name, head in heads.items():
            distances = []
            for k in range(toy.classes):
                labels = torch.full((samples,), k)
                real = toy.sample(labels, g)
                fake = sample(head, toy, labels, n, shortcut=name == "shortcut", seed=k)
                distances.append(sliced_wasserstein(fake, real, seed=k))
            result[name][n] = sum(distances) / len(distances)
    return result
