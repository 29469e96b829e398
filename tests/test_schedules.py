"""Flow-matching and masking schedules, bit for bit against diffusers' scheduler."""
import math

import numpy as np
import pytest
import torch

from nitro_ar.errors import InvalidArgumentError
from nitro_ar.schedules import (
    FlowSchedule,
    cfg_for_step,
    euler_step,
    flow_schedule,
    head_schedule,
    mar_mask_len,
    shortcut_schedule,
    step_head_counts,
)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 20])
def test_flow_schedule_matches_diffusers(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(steps)
    ours = flow_schedule(steps, shift=shift)
    assert torch.equal(ours.timesteps, sch.timesteps)
    assert torch.equal(ours.sigmas, sch.sigmas)


def _official_head_timesteps(sch, n, transformer):
    if n == 1:
        sch.set_timesteps(1)
        return list(sch.timesteps)
    sch.set_timesteps(n + 1)
    ts = [t for t in sch.timesteps if t != 1]
    if transformer or n == 2:
        ts = [t.long().float() for t in ts]
    return ts


@pytest.mark.parametrize("transformer", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 3, 6, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_schedule_and_step_match_official_rule(steps, transformer, dtype):
    """The official head: n+1 timesteps, t == 1 dropped, truncation; scheduler.step per step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    official = _official_head_timesteps(sch, steps, transformer)
    ours = head_schedule(steps, truncate="transformer" if transformer else "mlp")
    assert torch.equal(ours.timesteps, torch.stack(official))
    assert len(ours) == steps
    x_ref = torch.randn(7, 32).to(dtype)
    x = x_ref.clone()
    for i, t in enumerate(official):
        v = torch.randn(7, 32).to(dtype)
        x_ref = sch.step(v, t, x_ref, return_dict=False)[0].to(dtype)
        x = euler_step(x, v, ours.sigmas[i], ours.sigmas[i + 1])
        assert torch.equal(x, x_ref)
    if steps > 1:
        assert ours.sigmas[-1].item() == pytest.approx(0.001, rel=1e-6)


def test_truncation_only_changes_network_timesteps():
    mlp, tr = head_schedule(6, truncate="mlp"), head_schedule(6, truncate="transformer")
    assert mlp.timesteps[1].item() == pytest.approx(833.5, abs=0.01)
    assert tr.timesteps[1].item() == 833.0
    assert torch.equal(mlp.sigmas, tr.sigmas)
    assert head_schedule(2, truncate="mlp").timesteps.tolist() == [1000.0, 500.0]


def test_head_schedule_rejects_bad_rule():
    with pytest.raises(ValueError):
        head_schedule(3, truncate="other")


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 64])
def test_mar_schedule_predicts_every_token_once(steps):
    seq, masked, total = 256, 256, 0
    for k in range(steps):
        nxt = mar_mask_len(k, steps, seq, masked)
        expected = max(1, min(masked - 1, math.floor(seq * math.cos(math.pi / 2 * (k + 1) / steps))))
        assert nxt == expected
        predicted = masked if k == steps - 1 else masked - nxt
        assert predicted >= 1
        total += predicted
        masked = nxt
    assert total == seq


def disa_published(ar_steps, upper, lower, strategy):
    """Head steps of AR step k as DiSA's published sampler picks them
    (Qinyu-Allen-Zhao/DiSA@283fa59, MAR_DiSA/models/diffloss.py: candidate counts
    lower..upper, schedule_id by strategy, int() of the float expression)."""
    candidates = list(range(lower, upper + 1))
    last = ar_steps - 1
    ids = {
        "linear": lambda k: int((last - k) / last * (len(candidates) - 1)),
        "cosine": lambda k: int((math.cos(math.pi * k / last) + 1) / 2 * (len(candidates) - 1)),
        "two-stage": lambda k: len(candidates) - 1 if k < last / 2 else 0,
    }
    return [candidates[ids[strategy](k)] for k in range(ar_steps)]


def test_disa_counts_are_the_published_ones():
    # The vector: 20 AR steps, 3 -> 1 linear: 31 head steps (rounding to nearest: 40).
    assert step_head_counts(20, 3, "linear", 1) == [3] + [2] * 9 + [1] * 10
    assert sum(step_head_counts(20, 3, "linear", 1, rounding="nearest")) == 40
    assert sum(step_head_counts(64, 50, "linear", 5)) == 1733
    assert sum(step_head_counts(64, 50, "cosine", 5)) == 1729
    assert sum(step_head_counts(20, 20, "linear", 5)) == 241
    assert step_head_counts(21, 5, "two-stage", 1).count(5) == 10  # k < (K - 1) / 2
    assert step_head_counts(21, 5, "two-stage", 1, rounding="nearest").count(5) == 11
    for ar_steps in (2, 3, 7, 20, 21, 64):
        for upper, lower in ((3, 1), (20, 5), (50, 5), (6, 6)):
            for strategy in ("linear", "cosine", "two-stage"):
                expected = disa_published(ar_steps, upper, lower, strategy)
                assert step_head_counts(ar_steps, upper, strategy, lower) == expected, (ar_steps, upper, lower, strategy)


def test_disa_schedules():
    assert step_head_counts(4, 3) == [3, 3, 3, 3]
    assert step_head_counts(1, 20, "linear", 5) == [20]  # the published code divides by zero here
    assert step_head_counts(5, 20, "linear", 5) == [20, 16, 12, 8, 5]
    assert step_head_counts(5, 20, "linear", 5, rounding="nearest") == [20, 16, 12, 9, 5]  # the former counts
    cos = step_head_counts(5, 20, "cosine", 5)
    assert cos[0] == 20 and cos[-1] == 5 and cos == sorted(cos, reverse=True)
    assert step_head_counts(4, 20, "two-stage", 5) == [20, 20, 5, 5]
    assert step_head_counts(3, [4, 2, 1]) == [4, 2, 1]
    assert step_head_counts(3, (4, 2, 1)) == [4, 2, 1]


@pytest.mark.parametrize("head_steps, message", [
    ("11", "head_steps='11'"),  # once parsed as [1, 1]
    (2.9, "head_steps=2.9"),  # once run as 2
    (3.0, "head_steps=3.0"),
    (True, "head_steps=True"),
    (0, "head_steps=0"),
    ([4, 2], "one integer >= 1 per AR step"),
    ([4, 2.5, 1], r"head_steps\[1\]=2.5"),
    ([4, 0, 1], r"head_steps\[1\]=0"),
    ([4, False, 1], r"head_steps\[1\]=False"),
    (None, "head_steps=None"),
])
def test_head_steps_are_validated_strictly(head_steps, message):
    with pytest.raises(InvalidArgumentError, match=message):
        step_head_counts(3, head_steps)


def test_schedule_arguments_are_validated():
    with pytest.raises(InvalidArgumentError, match="head_steps_end=None"):
        step_head_counts(3, 20, "linear")
    with pytest.raises(InvalidArgumentError, match="head_steps_end=1.5"):
        step_head_counts(3, 20, "linear", 1.5)
    with pytest.raises(InvalidArgumentError, match="head_steps_schedule='log'"):
        step_head_counts(3, 20, "log", 5)
    with pytest.raises(InvalidArgumentError, match="rounding='up'"):
        step_head_counts(3, 20, "linear", 5, rounding="up")
    with pytest.raises(InvalidArgumentError, match="ar_steps=0"):
        step_head_counts(0, 20)
    assert step_head_counts(3, np.int64(4)) == [4, 4, 4]  # integer types other than int are integers


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 16, 17, 32])
def test_shortcut_schedule_is_uniform_from_noise_to_data(steps):
    schedule = shortcut_schedule(steps)
    assert isinstance(schedule, FlowSchedule) and len(schedule) == steps
    expected = torch.tensor([1 - i / steps for i in range(steps + 1)], dtype=torch.float64).float()
    assert torch.equal(schedule.sigmas, expected) and schedule.sigmas[-1] == 0  # ends at 0, not 0.001
    assert torch.equal(schedule.timesteps, expected[:-1] * 1000)  # float timesteps, never truncated
    d = 1 / steps if steps <= 16 else 0.0  # FAR: the flow-matching field above 16 steps
    assert schedule.step_size.dtype == torch.float32 and schedule.step_size.dim() == 0
    assert schedule.step_size.item() == pytest.approx(1000 * d)
    assert shortcut_schedule(steps, num_train_timesteps=500).step_size.item() == pytest.approx(500 * d)
    with pytest.raises(InvalidArgumentError):
        shortcut_schedule(0)


def test_cfg_schedules():
    assert cfg_for_step(4.0, "constant", 256, 100) == 4.0
    assert cfg_for_step(4.0, "linear", 256, 256) == 1.0
    assert cfg_for_step(4.0, "linear", 256, 0) == 4.0
    with pytest.raises(ValueError):
        cfg_for_step(4.0, "cosine", 256, 0)
