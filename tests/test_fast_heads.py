"""Parity of the fast heads (:mod:`nitro_ar.fast.heads`) with the eager reference heads and sampler.

CPU: the Triton interpreter ("interpret") and the torch backend, fp32, reduced head sizes (the
interpreter is slow: few blocks, few tokens, small step counts where the count does not matter).
With a GPU and compiled Triton (TRITON_INTERPRET=0) the kernel cases run on the GPU, plus bf16.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nitro_ar.fast as fast
from conftest import DEVICE, GPU_KERNELS, KERNEL_BACKEND
from factories import TEXT_WIDTH, randomize_, tiny_ar
from nitro_ar.fast.counting import count_launches
from nitro_ar.fast.heads import (
    FAST_HEAD_CLASSES,
    FastHeadAttention,
    FastTransformerHead,
    FastTransformerHeadBlock,
    guided_flow_step,
)
from nitro_ar.heads import (
    EulerSampler,
    HeadAttention,
    MLPHead,
    TransformerHead,
    TransformerHeadBlock,
    head_steps_schedule,
    sample_head,
)
from nitro_ar.kernels.backend import select_backend
from nitro_ar.schedules import FlowSchedule, step_head_counts

BACKENDS = [KERNEL_BACKEND, "torch"]


def mlp_head(in_channels=32, width=96, depth=2, z_channels=48, seed=0, dtype=torch.float32):
    head = MLPHead(in_channels, width, depth, z_channels)
    return randomize_(head, seed, scale=0.1).eval().to(DEVICE, dtype)


def transformer_head(width=128, depth=1, grid=4, in_channels=32, z_channels=48, seed=0, dtype=torch.float32):
    head = TransformerHead(in_channels, width, depth, z_channels, grid=grid)
    return randomize_(head, seed, scale=0.1).eval().to(DEVICE, dtype)


def accelerated(module, backend):
    """A copy of ``module`` with the drop-ins swapped in (no graph capture: the kernels themselves run)."""
    return fast.accelerate(copy.deepcopy(module), backend=backend, graphs=False)


def schedule(steps, transformer):
    return head_steps_schedule(steps, transformer, 1000, 1.0)


def assert_matches(actual, expected, rel=2e-5, what=""):
    """Equal within fp32 rounding of reordered sums: relative to the largest magnitude."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def head_inputs(head, rows, cfg, tokens=None, dtype=torch.float32):
    """(z, noise) for ``sample``: rows tokens (MLP head) or rows images of ``tokens`` (transformer)."""
    shape = (rows,) if tokens is None else (rows, tokens)
    groups = 2 if cfg != 1.0 else 1
    z = torch.randn(groups * rows, *shape[1:], head.cond_embed.in_features, device=DEVICE, dtype=dtype)
    noise = torch.randn(*shape, head.in_channels, device=DEVICE, dtype=dtype)
    return z, noise


def assert_sample_parity(reference, fast_head, steps, cfg, rows, tokens=None):
    z, noise = head_inputs(reference, rows, cfg, tokens)
    plan = schedule(steps, tokens is not None)
    with torch.no_grad():
        got, want = sample_head(fast_head, z, noise, plan, cfg), sample_head(reference, z, noise, plan, cfg)
    assert_matches(got, want, what=f"{steps} steps, cfg {cfg}, {rows} rows")


def test_kernels_really_run():
    assert select_backend(DEVICE, KERNEL_BACKEND) == KERNEL_BACKEND


# --------------------------------------------------------------------------------------------
# Drop-ins: classes, keys, forward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [mlp_head, transformer_head], ids=["mlp", "transformer"])
def test_drop_ins_keep_parameters_and_keys(make):
    reference = make()
    head = accelerated(reference, KERNEL_BACKEND)
    assert type(head) is FAST_HEAD_CLASSES[type(reference)]
    for ref_module, fast_module in zip(reference.modules(), head.modules()):
        expected = fast.FAST_CLASSES.get(type(ref_module), type(ref_module))
        assert type(fast_module) is expected and issubclass(expected, type(ref_module))
    ref_state, fast_state = reference.state_dict(), head.state_dict()
    assert list(ref_state) == list(fast_state)
    for key, value in ref_state.items():
        assert torch.equal(fast_state[key], value), key
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("make", [mlp_head, transformer_head], ids=["mlp", "transformer"])
def test_restore_brings_back_the_reference(make):
    reference = make()
    head = accelerated(reference, KERNEL_BACKEND)
    fast.restore(head)
    assert [type(m) for m in head.modules()] == [type(m) for m in reference.modules()]
    assert not any(hasattr(m, "backend") or hasattr(m, "modulation") or hasattr(m, "mlp_in") for m in head.modules())
    assert type(head).sample is EulerSampler.sample  # the reference loop again
    for key, value in reference.state_dict().items():
        assert torch.equal(head.state_dict()[key], value), key


def test_a_head_accelerated_alone_gets_fast_blocks_and_sampler():
    """``accelerate`` on a bare head swaps its blocks and attention too (one swap helper), and
    its ``sample`` overrides the reference loop (no attribute is set on the instance)."""
    head = fast.accelerate(copy.deepcopy(transformer_head()), backend="torch", graphs=False)
    assert type(head) is FastTransformerHead and "sample" not in head.__dict__
    assert type(head).sample is not EulerSampler.sample
    assert all(type(block) is FastTransformerHeadBlock for block in head.res_blocks)
    assert all(type(block.attn) is FastHeadAttention for block in head.res_blocks)


MLP_CONFIGS = [dict(), dict(in_channels=7, width=40, depth=1, z_channels=24), dict(width=130, depth=3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", MLP_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "base")
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_mlp_head_forward(config, rows, backend):
    reference = mlp_head(**config)
    head = accelerated(reference, backend)
    x = torch.randn(rows, reference.in_channels, device=DEVICE)
    t = torch.rand(rows, device=DEVICE) * 1000
    c = torch.randn(rows, reference.cond_embed.in_features, device=DEVICE)
    with torch.no_grad():
        assert_matches(head(x, t, c), reference(x, t, c))


TRANSFORMER_CONFIGS = [dict(), dict(width=64, depth=2), dict(width=192, z_channels=40)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", TRANSFORMER_CONFIGS,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "base")
@pytest.mark.parametrize("tokens", [1, 16])
def test_transformer_head_forward(config, tokens, backend):
    reference = transformer_head(**config)
    head = accelerated(reference, backend)
    x = torch.randn(2, tokens, reference.in_channels, device=DEVICE)
    t = torch.tensor([999.0, 3.5], device=DEVICE)
    c = torch.randn(2, tokens, reference.cond_embed.in_features, device=DEVICE)
    with torch.no_grad():
        assert_matches(head(x, t, c), reference(x, t, c))


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_block_forward_and_gradients(backend):
    reference = randomize_(TransformerHeadBlock(128, 2), scale=0.1).to(DEVICE)
    block = accelerated(reference, backend)
    x = torch.randn(2, 17, 128, device=DEVICE)
    c = torch.randn(2, 17, 128, device=DEVICE)
    got, want = block(x, c), reference(x, c)
    assert_matches(got, want)
    upstream = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, list(block.parameters()), upstream)
    want_grads = torch.autograd.grad(want, list(reference.parameters()), upstream)
    for (name, _), got_grad, want_grad in zip(reference.named_parameters(), got_grads, want_grads):
        assert_matches(got_grad, want_grad, rel=1e-4, what=name)


@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 17, 256])
def test_head_attention_matches_sdpa(tokens, heads):
    """q/k/v read in place from the (B, L, 3, H, 64) projection: forward and every gradient."""
    reference = randomize_(HeadAttention(64 * heads, heads), scale=0.1).to(DEVICE)
    attention = accelerated(reference, KERNEL_BACKEND)
    batch = 1 if tokens == 256 else 2
    x = torch.randn(batch, tokens, 64 * heads, device=DEVICE, requires_grad=True)
    got, want = attention(x), reference(x)
    assert_matches(got, want, rel=1e-5)
    upstream = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [x, *attention.parameters()], upstream)
    want_grads = torch.autograd.grad(want, [x, *reference.parameters()], upstream)
    for name, got_grad, want_grad in zip(["x", "qkv.weight", "proj.weight", "proj.bias"], got_grads, want_grads):
        assert_matches(got_grad, want_grad, rel=1e-5, what=name)


# --------------------------------------------------------------------------------------------
# Multi-step sampling
# --------------------------------------------------------------------------------------------
STEPS = [1, 2, 3, 6, 20]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("steps", STEPS)
def test_mlp_sample_steps(steps, cfg):
    """Every step count (the n = 2 integer timesteps, n = 1's sigma 1 -> 0), odd widths, kernels."""
    reference = mlp_head(in_channels=7, width=40, depth=1, z_channels=24)
    assert_sample_parity(reference, accelerated(reference, KERNEL_BACKEND), steps, cfg, rows=7)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("rows", [1, 64])
def test_mlp_sample_rows(rows, cfg):
    reference = mlp_head()
    assert_sample_parity(reference, accelerated(reference, KERNEL_BACKEND), 3, cfg, rows)


def test_mlp_sample_torch_backend_every_case():
    """The torch backend (the CPU default) over the whole matrix of steps, cfg and rows."""
    reference = mlp_head(**MLP_CONFIGS[1])
    head = accelerated(reference, "torch")
    for steps in STEPS:
        for cfg in (1.0, 4.0):
            for rows in (1, 7, 64):
                assert_sample_parity(reference, head, steps, cfg, rows)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("steps", [1, 2, 6])
def test_transformer_sample_steps(steps, cfg):
    """Joint sampling of 2 images of 16 tokens (position table added), transformer truncation rule."""
    reference = transformer_head()
    assert_sample_parity(reference, accelerated(reference, KERNEL_BACKEND), steps, cfg, rows=2, tokens=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_sample_global_token_and_odd_width(backend):
    """L = 1 (the global head: no position table), 3 images, 3 heads."""
    reference = transformer_head(width=192, z_channels=40)
    assert_sample_parity(reference, accelerated(reference, backend), 3, 4.0, rows=3, tokens=1)


@pytest.mark.parametrize("make,tokens", [(mlp_head, None), (transformer_head, 16)], ids=["mlp", "transformer"])
def test_disa_step_counts_in_sequence(make, tokens):
    """One accelerated head, a different schedule at each AR step (DiSA annealing)."""
    reference = make()
    head = accelerated(reference, KERNEL_BACKEND)
    for steps in step_head_counts(4, 6, "linear", 1):  # 6, 4, 3, 1
        assert_sample_parity(reference, head, steps, 4.0, rows=5 if tokens is None else 1, tokens=tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,tokens", [(mlp_head, None), (transformer_head, 16)], ids=["mlp", "transformer"])
def test_gradients_through_sample(make, tokens, backend):
    """Adversarial fine-tuning back-propagates through the few-step sampler: gradients of the
    conditions, the noise and every parameter match the reference loop's."""
    reference = make()
    head = accelerated(reference, backend)
    z, noise = head_inputs(reference, 3 if tokens is None else 1, 4.0, tokens)
    z.requires_grad_(True)
    noise.requires_grad_(True)
    plan = schedule(2, tokens is not None)
    got, want = sample_head(head, z, noise, plan, 4.0), sample_head(reference, z, noise, plan, 4.0)
    assert_matches(got, want)
    upstream = torch.randn_like(want)
    names = ["z", "noise"] + [name for name, _ in reference.named_parameters()]
    got_grads = torch.autograd.grad(got, [z, noise, *head.parameters()], upstream)
    want_grads = torch.autograd.grad(want, [z, noise, *reference.parameters()], upstream)
    for name, got_grad, want_grad in zip(names, got_grads, want_grads):
        assert_matches(got_grad, want_grad, rel=1e-4, what=name)


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (``.item()``, ``float(t)``): syncs on a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,tokens", [(mlp_head, None), (transformer_head, 16)], ids=["mlp", "transformer"])
def test_sample_never_reads_device_values_on_the_host(make, tokens, backend):
    """With the schedule on the device (as nitro_ar.fast.graphs passes it) nothing synchronises,
    so the whole loop can be captured in a CUDA/HIP graph."""
    reference = make()
    head = accelerated(reference, backend)
    z, noise = head_inputs(reference, 3 if tokens is None else 1, 4.0, tokens)
    plan = schedule(3, tokens is not None)
    on_device = FlowSchedule(plan.timesteps.to(DEVICE), plan.sigmas.to(DEVICE))
    with torch.no_grad(), HostReads() as host:
        got = head.sample(z, noise, on_device, 4.0)
    assert host.reads == 0
    with torch.no_grad():
        assert_matches(got, sample_head(reference, z, noise, plan, 4.0))


def test_bad_sample_inputs_raise():
    head = accelerated(mlp_head(), KERNEL_BACKEND)
    z, noise = head_inputs(head, 4, 4.0)
    with pytest.raises(ValueError, match="an even count"):
        head.sample(z[:-1], noise, schedule(2, False), 4.0)
    with pytest.raises(ValueError, match="does not fit"):
        head.sample(z, noise[:-1], schedule(2, False), 4.0)


def test_unsupported_dtype_step_falls_back_to_torch():
    """A float64 step on a kernel backend runs the eager arithmetic, with one warning."""
    x = torch.randn(5, 7, device=DEVICE, dtype=torch.float64)
    v = torch.randn(10, 7, device=DEVICE, dtype=torch.float64)
    plan = schedule(3, False)
    with pytest.warns(RuntimeWarning, match="flow_step falls back to torch"):
        got = guided_flow_step(x, v, plan.sigmas[0], plan.sigmas[1], 4.0, KERNEL_BACKEND)
    v_combined = v[:5] + 4.0 * (v[5:] - v[:5])
    torch.testing.assert_close(got, x + (plan.sigmas[1] - plan.sigmas[0]).double() * v_combined)


# --------------------------------------------------------------------------------------------
# Launches per AR iteration
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,tokens,per_block,per_step", [(mlp_head, None, 2, 2), (transformer_head, 16, 5, 2),
                                                          (transformer_head, 1, 4, 2)],
                         ids=["mlp", "transformer", "transformer-one-token"])
def test_launches_grow_by_a_constant_per_step(make, tokens, per_block, per_step):
    """Launches of one sampling call = a constant + a fixed count per Euler step, well below the
    reference loop's. CPU: exactly ``per_block * depth + per_step`` per step: input_proj (the
    position table in its epilogue), per block the fused GEMMs (MLP: 2; transformer: qkv, the
    attention, proj, SwiGLU input, fc2; one token: no attention, its output is v), and the final
    layer with the guided Euler step; all of a schedule's modulations fit one GEMM here."""
    reference = make(depth=2)
    head = accelerated(reference, KERNEL_BACKEND)
    z, noise = head_inputs(reference, 7 if tokens is None else 2, 4.0, tokens)
    step_counts = [1, 2, 4]
    plans = [schedule(n, tokens is not None) for n in step_counts]
    with torch.no_grad():
        fast_launches = [count_launches(lambda: head.sample(z, noise, plan, 4.0), DEVICE) for plan in plans]
        reference_launches = [count_launches(lambda: sample_head(reference, z, noise, plan, 4.0), DEVICE)
                              for plan in plans]
    slopes = {(b - a) / (m - n) for a, b, n, m in zip(fast_launches, fast_launches[1:], step_counts, step_counts[1:])}
    assert len(slopes) == 1, fast_launches
    slope = slopes.pop()
    constant = fast_launches[0] - slope
    reference_slope = (reference_launches[-1] - reference_launches[0]) / (step_counts[-1] - step_counts[0])
    assert slope < reference_slope and all(f < r for f, r in zip(fast_launches, reference_launches))
    if not GPU_KERNELS:
        assert slope == per_block * 2 + per_step
        assert constant <= 30, fast_launches


# --------------------------------------------------------------------------------------------
# Whole-model sampling
# --------------------------------------------------------------------------------------------
# The interpreter runs the (also accelerated) backbone too: 3 backbone blocks, a 1-block head and
# few steps keep it quick; the torch backend runs the released step counts and DiSA.
GENERATE_CASES = [
    ("gan", KERNEL_BACKEND, dict(ar_steps=2, head_steps=2)),
    ("joint_gan", KERNEL_BACKEND, dict(head_steps=1)),
    ("gan", "torch", dict(ar_steps=4, head_steps=[3, 6, 2, 1], cfg_schedule="linear")),
    ("joint_gan", "torch", dict(ar_steps=2)),
]


@pytest.mark.parametrize("variant,backend,kwargs", GENERATE_CASES,
                         ids=[f"{v}-{b}-{'-'.join(map(str, k.values()))}" for v, b, k in GENERATE_CASES])
def test_generate_matches_reference(variant, backend, kwargs):
    reference = tiny_ar(variant, diffloss_d=1).to(DEVICE)
    model = accelerated(reference, backend)
    assert isinstance(model.diffloss.net, FAST_HEAD_CLASSES[type(reference.diffloss.net)])
    # Two images (rows ordered by image) where it is cheap; one under the interpreter.
    text = torch.randn(2 if backend == "torch" else 1, 8, TEXT_WIDTH, device=DEVICE)
    uncond = torch.randn(1, 8, TEXT_WIDTH, device=DEVICE)

    def generate(m):
        return m.generate(text, uncond, generator=torch.Generator().manual_seed(7), **kwargs)

    assert_matches(generate(model), generate(reference))


# --------------------------------------------------------------------------------------------
# Low precision (GPU only)
# --------------------------------------------------------------------------------------------
if GPU_KERNELS:
    @pytest.mark.parametrize("make,tokens", [(mlp_head, None), (transformer_head, 256)], ids=["mlp", "transformer"])
    def test_bf16_sample_parity(make, tokens):
        """bf16: the fast sampler's error against an fp32 reference is within ~2x the eager bf16 loop's."""
        reference32 = make(grid=16) if tokens else make()
        reference = copy.deepcopy(reference32).to(torch.bfloat16)
        head = accelerated(reference, KERNEL_BACKEND)
        z, noise = head_inputs(reference32, 32 if tokens is None else 2, 4.0, tokens)
        plan = schedule(3 if tokens is None else 6, tokens is not None)
        with torch.no_grad():
            exact = sample_head(reference32, z, noise, plan, 4.0)
            eager = sample_head(reference, z.bfloat16(), noise.bfloat16(), plan, 4.0).float()
            got = sample_head(head, z.bfloat16(), noise.bfloat16(), plan, 4.0).float()
        assert (got - exact).abs().max() <= 2 * (eager - exact).abs().max() + 1e-2
