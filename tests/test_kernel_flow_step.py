"""Parity of the fused guidance + Euler-step kernel with its eager reference
(:func:`nitro_ar.kernels.reference.flow_step`, the sampler's arithmetic).

CPU: the Triton interpreter in fp32. With a GPU and compiled Triton (TRITON_INTERPRET=0) the
same tests run on the GPU, plus bf16/fp16 parity.
"""
import math

import pytest
import torch

from conftest import DEVICE, GPU_KERNELS, KERNEL_BACKEND
from nitro_ar.kernels import flow_step as fs
from nitro_ar.kernels import reference, tuning_problems
from nitro_ar.kernels.backend import HIP_ONLY_KEYS, select_backend, validate_config
from nitro_ar.kernels.errors import KernelInputError
from nitro_ar.kernels.flow_step import flow_step
from nitro_ar.schedules import head_schedule
from storage import LAYOUTS, in_storage

SIGMA, SIGMA_NEXT = torch.tensor(0.6667, dtype=torch.float32), torch.tensor(0.3334, dtype=torch.float32)


eager_step = reference.flow_step


def make(shape, guided, dtype=torch.float32, requires_grad=False):
    x = torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn((2 if guided else 1) * shape[0], *shape[1:], device=DEVICE, dtype=dtype,
                    requires_grad=requires_grad)
    return x, v


def assert_step_parity(x, v, cfg, backend=KERNEL_BACKEND, sigma=SIGMA, sigma_next=SIGMA_NEXT, rtol=1e-6, atol=1e-6):
    """Forward and (when the inputs need them) gradients of x and v match the eager formula."""
    got = flow_step(x, v, sigma, sigma_next, cfg, backend=backend)
    want = eager_step(x, v, sigma, sigma_next, cfg)
    assert got.shape == x.shape and got.dtype == v.dtype and got.device == x.device
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    inputs = [t for t in (x, v) if t.requires_grad]
    if inputs:
        upstream = torch.randn_like(want)
        for got_grad, want_grad in zip(torch.autograd.grad(got, inputs, upstream),
                                       torch.autograd.grad(want, inputs, upstream)):
            assert got_grad.dtype == want_grad.dtype
            torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=atol)


def test_kernel_really_runs():
    assert select_backend(DEVICE, KERNEL_BACKEND) == KERNEL_BACKEND


# MLP-head rows (N, C), odd widths, transformer-head images (B, L, C), and a flat vector.
SHAPES = [(1, 32), (7, 32), (64, 32), (5, 123), (3, 17, 32), (2, 256, 32), (4097,)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cfg", [1.0, 4.0, -0.5])
def test_forward_and_gradients(shape, cfg):
    x, v = make(shape, guided=cfg != 1.0, requires_grad=True)
    assert_step_parity(x, v, cfg)


def test_guidance_weight_one_with_both_halves():
    """v with [uncond; cond] rows and cfg = 1 still combines (to v_cond), as the formula says."""
    x, v = make((6, 32), guided=True, requires_grad=True)
    assert_step_parity(x, v, 1.0)


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["only-x", "only-v"])
@pytest.mark.parametrize("guided", [False, True])
def test_only_some_inputs_need_grad(needs, guided):
    x, v = make((9, 32), guided)
    x.requires_grad_(needs[0])
    v.requires_grad_(needs[1])
    assert_step_parity(x, v, 3.0 if guided else 1.0)


def test_every_step_of_a_schedule():
    """Each (sigma, sigma_next) of the official 6-step head schedule, including the last to 0.001."""
    schedule = head_schedule(6, truncate="transformer")
    x, v = make((2, 16, 32), guided=True)
    for i in range(len(schedule)):
        assert_step_parity(x, v, 4.0, sigma=schedule.sigmas[i], sigma_next=schedule.sigmas[i + 1])


@pytest.mark.parametrize("as_float", [False, True])
def test_sigmas_as_floats_or_tensors(as_float):
    """0-dim tensors (read in place) or Python floats (copied): the same fp32 step size."""
    schedule = head_schedule(20, truncate="mlp")
    x, v = make((3, 32), guided=True)
    for i in (0, 9, 19):
        sigma, sigma_next = schedule.sigmas[i].to(DEVICE), schedule.sigmas[i + 1].to(DEVICE)
        if as_float:
            sigma, sigma_next = float(sigma), float(sigma_next)
        got = flow_step(x, v, sigma, sigma_next, 4.0, backend=KERNEL_BACKEND)
        torch.testing.assert_close(got, eager_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1], 4.0),
                                   rtol=1e-6, atol=1e-6)


def test_strided_inputs():
    """Non-contiguous x and v (a transposed view, every other column of a wider tensor)."""
    x = torch.randn(32, 7, device=DEVICE).t()
    v = torch.randn(14, 64, device=DEVICE)[:, ::2]
    assert not x.is_contiguous() and not v.is_contiguous()
    assert_step_parity(x, v, 2.5)


def test_mixed_dtypes_cast_like_euler_step():
    """x and v in different half dtypes: fp32 arithmetic, one rounding to v's dtype."""
    x = torch.randn(5, 32, device=DEVICE, dtype=torch.float16)
    v = torch.randn(10, 32, device=DEVICE, dtype=torch.bfloat16)
    got = flow_step(x, v, SIGMA, SIGMA_NEXT, 4.0, backend=KERNEL_BACKEND)
    x32, v32 = x.float(), v.float()
    exact = x32 + (SIGMA_NEXT - SIGMA).to(DEVICE) * (v32[:5] + 4.0 * (v32[5:] - v32[:5]))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, exact.to(torch.bfloat16))


def test_no_rows():
    for guided in (False, True):
        x, v = make((0, 32), guided)
        out = flow_step(x, v, SIGMA, SIGMA_NEXT, 4.0 if guided else 1.0, backend=KERNEL_BACKEND)
        assert out.shape == (0, 32)


@pytest.mark.parametrize("shape", [(5, 123), (3, 17, 32)], ids=lambda s: "x".join(map(str, s)))
def test_no_unwritten_memory(nan_empty, shape):
    """Outputs and both halves of the velocity gradient are fully written (odd element counts)."""
    x, v = make(shape, guided=True, requires_grad=True)
    assert_step_parity(x, v, 4.0)


@pytest.mark.parametrize("block", [256, 1024])
def test_launchers_with_other_blocks(block):
    """The host launchers take any tuner candidate block: several programs per step."""
    x, v = make((37, 32), guided=True)
    config = dict(BLOCK=block, num_warps=4, num_stages=1)
    sigma, sigma_next = SIGMA.to(DEVICE), SIGMA_NEXT.to(DEVICE)
    torch.testing.assert_close(fs.flow_step_forward(x, v, sigma, sigma_next, 4.0, True, config=config),
                               eager_step(x, v, SIGMA, SIGMA_NEXT, 4.0), rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(x)
    grad_x, grad_v = fs.flow_step_backward(grad, x.dtype, v.dtype, sigma, sigma_next, 4.0, True, needs=(True, True),
                                           config=config)
    dt = sigma_next - sigma
    torch.testing.assert_close(grad_x, grad)
    torch.testing.assert_close(grad_v, torch.cat([dt * grad - 4.0 * dt * grad, 4.0 * dt * grad]), rtol=1e-6, atol=1e-6)


def test_torch_backends_match_reference():
    x, v = make((7, 3, 32), guided=True, requires_grad=True)
    for backend in ("torch", "reference"):
        assert_step_parity(x, v, 4.0, backend=backend)


BAD_INPUTS = [
    ("v (8, 16) and x (4, 32) differ", lambda: (torch.randn(4, 32), torch.randn(8, 16), 4.0)),
    ("v has 5 rows", lambda: (torch.randn(4, 32), torch.randn(5, 32), 4.0)),
    ("cfg=4.0 needs v", lambda: (torch.randn(4, 32), torch.randn(4, 32), 4.0)),
    ("x has dtype torch.float64", lambda: (torch.randn(4, 32, dtype=torch.float64), torch.randn(8, 32), 4.0)),
    ("v has dtype torch.int64", lambda: (torch.randn(4, 32), torch.ones(8, 32, dtype=torch.long), 4.0)),
    ("0-dim", lambda: (torch.tensor(1.0), torch.tensor(1.0), 1.0)),
    ("x is on cpu but v is on meta", lambda: (torch.randn(4, 32), torch.empty(8, 32, device="meta"), 4.0)),
    ("cfg must be finite", lambda: (torch.randn(4, 32), torch.randn(8, 32), math.nan)),
    ("v must be a tensor", lambda: (torch.randn(4, 32), [1.0], 4.0)),
]


def test_sigma_must_be_a_scalar():
    x, v = make((4, 32), guided=True)
    with pytest.raises(ValueError, match="sigma must be a scalar"):
        flow_step(x, v, torch.ones(2), SIGMA_NEXT, 4.0, backend=KERNEL_BACKEND)


@pytest.mark.parametrize("backend", [KERNEL_BACKEND, "torch"])
@pytest.mark.parametrize("message,inputs", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_value_errors(message, inputs, backend):
    x, v, cfg = inputs()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flow_step(x, v, SIGMA, SIGMA_NEXT, cfg, backend=backend)


@pytest.mark.parametrize("op_name", fs.OP_NAMES)
def test_configs_fit_each_vendor(op_name):
    """CUDA lists carry no HIP-only key; HIP lists stay within 16 wavefronts; defaults are candidates' kind."""
    for vendor in ("cuda", "hip"):
        configs = fs.candidate_configs(op_name, vendor)
        assert configs
        for config in configs + [fs.default_config(op_name, vendor, "sm_90" if vendor == "cuda" else "gfx942")]:
            validate_config(config, vendor)
            assert config["BLOCK"] & (config["BLOCK"] - 1) == 0
            if vendor == "cuda":
                assert not set(HIP_ONLY_KEYS) & set(config)
    assert fs.default_config(op_name, "cpu", "cpu") == fs.INTERPRETER_CONFIG == fs.CONFIGS.interpreter
    with pytest.raises(ValueError):
        fs.candidate_configs(op_name, "tpu")


def test_tuning_shapes_and_buckets():
    shapes = tuning_problems.flow_step_shapes("nitro-ar")
    assert shapes and tuning_problems.flow_step_shapes("nitro-e") == []
    assert tuning_problems.flow_step_shapes("all") == shapes
    buckets = {fs.tuning_bucket(shape) for shape in shapes}
    assert all(bucket.startswith("n") for bucket in buckets) and len(buckets) > 1
    with pytest.raises(ValueError):
        tuning_problems.flow_step_shapes("sdxl")


@pytest.mark.parametrize("guided", [False, True])
def test_launch_plan_selects_64_bit_offsets_from_sizes(guided):
    """No allocation: the plan of a step whose v spans 2^31 elements or more widens offsets."""
    # The transformer head's (B, 256, 32) images: v has 2B rows with CFG.
    for batch, wide in ((1, False), (2**17, guided), (2**18, True)):
        grid, index_64 = fs.launch_plan(batch * 256 * 32, guided, 1024)
        assert index_64 == wide, batch
        assert grid == (batch * 256 * 32 // 1024,)


def test_named_error_type():
    x, v = make((4, 32), guided=True)
    with pytest.raises(KernelInputError, match="v has 5 rows"):
        flow_step(x, v[:5], SIGMA, SIGMA_NEXT, 4.0, backend=KERNEL_BACKEND)


@pytest.mark.parametrize("argument", ["x", "v"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_argument_in_any_storage(argument, layout):
    """x and v of any layout are copied once to the contiguous layout the kernels read;
    forward and gradients match."""
    x, v = make((5, 3, 32), guided=True, requires_grad=True)
    if argument == "x":
        x = in_storage(x, layout)
    else:
        v = in_storage(v, layout)
    assert_step_parity(x, v, 4.0)


def test_sigmas_as_views_of_a_schedule():
    """A sigma read in place from its schedule (a 0-dim view at an offset), or a 1-element tensor."""
    sigmas = torch.tensor([0.9, 0.6667, 0.3334, 0.0], device=DEVICE)
    x, v = make((4, 32), guided=True)
    got = flow_step(x, v, sigmas[1], sigmas[2:3], 4.0, backend=KERNEL_BACKEND)
    torch.testing.assert_close(got, eager_step(x, v, sigmas[1], sigmas[2], 4.0), rtol=1e-6, atol=1e-6)


if GPU_KERNELS:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("shape", [(40, 32), (2, 256, 32)], ids=lambda s: "x".join(map(str, s)))
    def test_low_precision_parity(shape, dtype):
        """Half precision: the kernel (fp32 arithmetic, one rounding) is at least as close to an
        fp32 evaluation as the eager composition (which rounds after every op)."""
        x, v = make(shape, guided=True, dtype=dtype, requires_grad=True)
        got = flow_step(x, v, SIGMA, SIGMA_NEXT, 4.0, backend=KERNEL_BACKEND)
        eager = eager_step(x, v, SIGMA, SIGMA_NEXT, 4.0)
        exact = eager_step(x.float(), v.float(), SIGMA, SIGMA_NEXT, 4.0)
        assert got.dtype == dtype
        assert (got.float() - exact).abs().max() <= (eager.float() - exact).abs().max() + 1e-3
        upstream = torch.randn_like(got)
        for got_grad, want_grad in zip(torch.autograd.grad(got, (x, v), upstream),
                                       torch.autograd.grad(eager, (x, v), upstream)):
            torch.testing.assert_close(got_grad, want_grad, rtol=2e-2, atol=2e-2)
