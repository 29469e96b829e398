"""Flow-matching and masking schedules, bit for bit against diffusers' scheduler."""
import math

import pytest
import torch

from nitro_ar.schedules import (
    cfg_for_step,
    euler_step,
    flow_schedule,
    head_schedule,
    mar_mask_len,
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


def test_disa_schedules():
    assert step_head_counts(4, 3) == [3, 3, 3, 3]
    assert step_head_counts(5, 20, "linear", 5) == [20, 16, 12, 9, 5]
    cos = step_head_counts(5, 20, "cosine", 5)
    assert cos[0] == 20 and cos[-1] == 5 and cos == sorted(cos, reverse=True)
    assert step_head_counts(4, 20, "two-stage", 5) == [20, 20, 5, 5]
    assert step_head_counts(3, [4, 2, 1]) == [4, 2, 1]
    with pytest.raises(ValueError):
        step_head_counts(3, [4, 2])
    with pytest.raises(ValueError):
        step_head_counts(3, 20, "linear")


def test_cfg_schedules():
    assert cfg_for_step(4.0, "constant", 256, 100) == 4.0
    assert cfg_for_step(4.0, "linear", 256, 256) == 1.0
    assert cfg_for_step(4.0, "linear", 256, 0) == 4.0
    with pytest.raises(ValueError):
        cfg_for_step(4.0, "cosine", 256, 0)
