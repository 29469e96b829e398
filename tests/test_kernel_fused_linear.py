"""Parity of the fused-GEMM kernel (:mod:`nitro_ar.kernels.fused_linear`) with its eager
reference (:func:`nitro_ar.kernels.reference.fused_linear`), its library path, its launch plans
and its named errors.

CPU: the Triton interpreter in fp32 (IEEE products). With a GPU and compiled Triton
(TRITON_INTERPRET=0) the same tests run on the GPU, plus bf16.
"""
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import DEVICE, GPU_KERNELS, KERNEL_BACKEND
from nitro_ar.fast.counting import count_launches
from nitro_ar.kernels import fused_linear as fl
from nitro_ar.kernels import reference, tuning, tuning_problems
from nitro_ar.kernels.backend import ENV_GEMM, select_backend
from nitro_ar.kernels.errors import KernelInputError
from nitro_ar.kernels.fused_linear import LinearProblem, fused_linear, grouped_linear
from nitro_ar.kernels.launch import INDEX_32_LIMIT
from nitro_ar.kernels.reference import AdaLNAffine, AddSiLUPrologue, FlowEpilogue, NormPrologue
from storage import LAYOUTS, in_storage

# Small tiles: several row, column and K tiles (and their masks) even at test sizes.
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def assert_close(got, want, what=""):
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")


def run(problem: LinearProblem, activation=None, flow=None, config=None):
    return grouped_linear([problem], activation=activation, flow=flow, backend=KERNEL_BACKEND, config=config)[0]


def want(problem: LinearProblem, activation=None, flow=None):
    return reference.fused_linear(problem.x, problem.weight, problem.bias, prologue=problem.prologue,
                                  activation_kind=activation, residual=problem.residual, gate=problem.gate, flow=flow)


def test_kernel_really_runs():
    assert select_backend(DEVICE, KERNEL_BACKEND) == KERNEL_BACKEND


# --------------------------------------------------------------------------------------------
# Every prologue x activation x epilogue, odd sizes
# --------------------------------------------------------------------------------------------
B, L, K, N = 2, 37, 48, 70


def prologue_of(kind, x):
    shape = x.shape
    if kind == "layer":
        return NormPrologue("layer", 1e-6, randn(K), randn(K), randn(*shape), randn(*shape))
    if kind == "layer-plain":
        return NormPrologue("layer", 1e-5, None, None)
    if kind == "rms":
        return NormPrologue("rms", 1e-6, randn(K), None, randn(shape[0], K), randn(shape[0], 1, K))
    if kind == "add_silu":
        return AddSiLUPrologue(randn(shape[0], 1, K))
    return None


PROLOGUES = [None, "layer", "layer-plain", "rms", "add_silu"]
ACTIVATIONS = [None, "gelu_tanh", "silu", "gelu_mul"]


@pytest.mark.parametrize("epilogue", ["plain", "residual", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_matches_the_reference(prologue, activation, epilogue, tiles):
    x = randn(B, L, K) * 2 + 3  # a mean far from 0: LayerNorm's statistics must be exact
    rows = 2 * N if activation == "gelu_mul" else N
    problem = LinearProblem(x, randn(rows, K) * 0.2, randn(rows), prologue_of(prologue, x))
    if epilogue != "plain":
        problem.residual = randn(B, L, N)
        problem.gate = randn(B, L, N) if epilogue == "gated" else None
    config = SMALL_TILES if tiles == "small" else None
    assert_close(run(problem, activation, config=config), want(problem, activation), f"{prologue}/{activation}/{epilogue}")


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("guided", [True, False])
def test_flow_epilogue_is_the_guided_euler_step(norm, guided):
    groups, rows = (2 if guided else 1), 11
    x = randn(groups, rows, K)
    prologue = NormPrologue(norm, 1e-6, None if norm == "layer" else randn(K), None, randn(groups, rows, K),
                            randn(groups, rows, K))
    flow = FlowEpilogue(randn(rows, N), torch.tensor(0.7, device=DEVICE), torch.tensor(0.3, device=DEVICE),
                        4.0 if guided else 1.0)
    problem = LinearProblem(x, randn(N, K) * 0.2, randn(N), prologue)
    for config in (SMALL_TILES, None):
        assert_close(run(problem, flow=flow, config=config), want(problem, flow=flow), f"flow {norm} {guided}")


@pytest.mark.parametrize("kind", ["prologue", "gate"])
def test_adaln_chunks_are_computed_in_the_kernel(kind):
    temb, bias, scale = randn(B, 6 * K), randn(6, K), randn(6, K)
    x = randn(B, L, K)
    if kind == "prologue":
        problem = LinearProblem(x, randn(N, K) * 0.2, randn(N), NormPrologue(
            "layer", 1e-6, randn(K), randn(K), adaln=AdaLNAffine(temb, bias, scale, shift_chunk=3, scale_chunk=4)))
    else:
        problem = LinearProblem(x, randn(K, K) * 0.2, randn(K), residual=randn(B, L, K),
                                gate=AdaLNAffine(temb, bias, scale, gate_chunk=5))
    assert_close(run(problem, config=SMALL_TILES), want(problem), kind)


@pytest.mark.parametrize("x_layout", ["contiguous", "channel-major"])
def test_two_problems_in_one_launch(x_layout):
    """The image and text streams of a block: own weights, rows, K, tensors; one launch."""
    def x_of(batch, length, k):
        return randn(batch, length, k) if x_layout == "contiguous" else randn(batch, k, length).transpose(1, 2)

    img = LinearProblem(x_of(B, 37, K), randn(N, K), randn(N), NormPrologue("layer", 1e-5, randn(K), randn(K)),
                        residual=randn(B, 37, N), gate=randn(B, N))
    txt = LinearProblem(x_of(B, 9, 24), randn(N, 24), randn(N), NormPrologue("layer", 1e-6, randn(24), randn(24)),
                        residual=randn(1, 9, N), gate=randn(B, 9, N))
    problems = [img, txt]
    got = grouped_linear(problems, backend=KERNEL_BACKEND, config=SMALL_TILES)
    for index, (g, p) in enumerate(zip(got, problems)):
        assert_close(g, want(p), f"problem {index}")
    if not GPU_KERNELS:
        assert count_launches(lambda: grouped_linear(problems, backend=KERNEL_BACKEND), DEVICE) == 1


def test_problems_with_other_options_run_one_launch_each():
    """A stream without bias (or without modulation: the last block's text) beside one with."""
    problems = [LinearProblem(randn(B, 5, K), randn(N, K), randn(N)), LinearProblem(randn(B, 3, K), randn(N, K))]
    for g, p in zip(grouped_linear(problems, backend=KERNEL_BACKEND), problems):
        assert_close(g, want(p))
    if not GPU_KERNELS:
        assert count_launches(lambda: grouped_linear(problems, backend=KERNEL_BACKEND), DEVICE) == 2


@given(batch=st.integers(1, 3), length=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 70),
       activation=st.sampled_from(ACTIVATIONS), prologue=st.sampled_from(PROLOGUES[:4]))
def test_property_any_shape(batch, length, k, n, activation, prologue):
    """Any sizes (1 included, non-powers of two), any combination: the reference's numbers."""
    torch.manual_seed(batch * 1000 + length * 10 + k)
    x = randn(batch, length, k)
    rows = 2 * n if activation == "gelu_mul" else n
    norm = None
    if prologue is not None and prologue != "add_silu":
        norm = NormPrologue("rms" if prologue == "rms" else "layer", 1e-6, randn(k), None, randn(batch, length, k),
                            randn(batch, length, k))
    problem = LinearProblem(x, randn(rows, k), randn(rows), norm, residual=randn(batch, length, n))
    assert_close(run(problem, activation, config=SMALL_TILES), want(problem, activation))


# --------------------------------------------------------------------------------------------
# Layouts: strided, expanded and NaN-padded storage for every tensor argument
# --------------------------------------------------------------------------------------------
ARGUMENTS = ["x", "weight", "bias", "norm_weight", "norm_bias", "shift", "scale", "residual", "gate"]


def full_problem(**replace):
    values = dict(x=randn(B, L, K), weight=randn(N, K) * 0.2, bias=randn(N), norm_weight=randn(K), norm_bias=randn(K),
                  shift=randn(B, L, K), scale=randn(B, L, K), residual=randn(B, L, N), gate=randn(B, L, N))
    values.update(replace)
    prologue = NormPrologue("layer", 1e-6, values["norm_weight"], values["norm_bias"], values["shift"], values["scale"])
    return LinearProblem(values["x"], values["weight"], values["bias"], prologue, values["residual"], values["gate"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("argument", ARGUMENTS)
def test_every_argument_in_any_storage(argument, layout):
    base = full_problem()
    values = dict(x=base.x, weight=base.weight, bias=base.bias, norm_weight=base.prologue.weight,
                  norm_bias=base.prologue.bias, shift=base.prologue.shift, scale=base.prologue.scale,
                  residual=base.residual, gate=base.gate)
    moved = in_storage(values[argument], layout)
    problem = full_problem(**{**values, argument: moved})
    expected = want(full_problem(**{**values, argument: moved.clone()}))
    assert_close(run(problem, config=SMALL_TILES), expected, f"{argument} {layout}")


def test_channel_major_input_and_out_slice():
    """x read as (B, H*W, C) from a (B, C, H, W) image; the result written into a column slice
    of a NaN-filled concatenation buffer, nothing outside it touched."""
    image = randn(B, K, 5, 7)
    x = image.flatten(2).transpose(1, 2)
    buffer = torch.full((B, 35, 3 * N), float("nan"), device=DEVICE)
    out = buffer[:, :, N : 2 * N]
    problem = LinearProblem(x, randn(N, K), randn(N), out=out)
    assert run(problem, activation="gelu_tanh", config=SMALL_TILES) is out
    assert_close(out, want(problem, "gelu_tanh"))
    assert torch.isnan(buffer[:, :, :N]).all() and torch.isnan(buffer[:, :, 2 * N :]).all()


def test_broadcast_residual_and_shared_rows():
    """A residual with stride 0 over the batch (a position table) and x shared by two groups
    (CFG rows reading one input) are read in place."""
    shared = randn(1, L, K).expand(2, L, K)
    table = randn(1, L, N)
    problem = LinearProblem(shared, randn(N, K), randn(N), NormPrologue("layer", 1e-6, None, None, randn(2, L, K),
                                                                        randn(2, L, K)), residual=table)
    assert_close(run(problem, config=SMALL_TILES), want(problem))


def test_fresh_allocations_are_fully_written(nan_empty):
    problem = full_problem()
    assert_close(run(problem, "silu", config=SMALL_TILES), want(problem, "silu"))


def test_two_dimensional_inputs():
    problem = LinearProblem(randn(13, K), randn(N, K), randn(N), NormPrologue("rms", 1e-6, randn(K)),
                            residual=randn(13, N), gate=randn(13, N))
    got = run(problem, config=SMALL_TILES)
    assert got.shape == (13, N)
    assert_close(got, want(problem))


# --------------------------------------------------------------------------------------------
# The library path and autograd
# --------------------------------------------------------------------------------------------
def test_library_path_is_the_unfused_composition(monkeypatch):
    problem = full_problem()
    monkeypatch.setenv(ENV_GEMM, "library")
    assert_close(fused_linear(problem.x, problem.weight, problem.bias, prologue=problem.prologue, activation="silu",
                              residual=problem.residual, gate=problem.gate, backend=KERNEL_BACKEND),
                 want(problem, "silu"))
    assert_close(run(problem, "silu", config=dict(fl.LIBRARY)), want(problem, "silu"))
    if not GPU_KERNELS:
        launches = count_launches(lambda: run(problem, "silu", config=dict(fl.LIBRARY)), DEVICE)
        assert launches > 1  # norm kernel, GEMM, activation, residual: unfused
    monkeypatch.setenv(ENV_GEMM, "bogus")
    with pytest.raises(KernelInputError, match="NITRO_AR_GEMM"):
        run(problem)


def test_tuned_library_choice_is_honoured(tmp_path, monkeypatch):
    """A tuning file that says LIBRARY for a bucket makes that bucket's launches unfused."""
    monkeypatch.setenv(tuning.ENV_TUNING_DIR, str(tmp_path))
    monkeypatch.setattr(tuning, "PACKAGED_DIR", tmp_path / "packaged")
    problem = full_problem()
    plan, _ = fl._prepare([problem], None, None)
    info = tuning.DeviceInfo("cuda", "Fake GPU", "sm_90")
    bucket = fl.tuning_bucket(fl.problem_shape(plan))
    tuning.clear_cache()
    try:
        with pytest.warns(UserWarning, match="no tuned kernel configs"):
            assert fl.gemm_path(plan, info) == "fused"
        tuning.store_configs(info, {"fused_linear": {bucket: {"config": dict(fl.LIBRARY), "ms": 0.01}}})
        assert fl.gemm_path(plan, info) == "library"
        # Forced to fuse over a tuned library choice, the arch's default launch config runs.
        monkeypatch.setenv(ENV_GEMM, "fused")
        assert fl._fused_config(plan, info) == fl.default_config("fused_linear", "cuda", "sm_90")
    finally:
        tuning.clear_cache()


def test_gradients_flow_through_the_library_path():
    """Under autograd the launch is the library composition: every gradient of the reference."""
    base = full_problem()
    leaves = [base.x, base.weight, base.bias, base.prologue.weight, base.prologue.bias, base.prologue.shift,
              base.prologue.scale, base.residual, base.gate]
    grads = []
    for fn in (lambda p: run(p, "gelu_tanh"), lambda p: want(p, "gelu_tanh")):
        copies = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(full_problem(**dict(zip(ARGUMENTS, copies))))
        grads.append(torch.autograd.grad(out, copies, torch.ones_like(out)))
    for name, got, expected in zip(ARGUMENTS, *grads):
        assert_close(got, expected, name)


# --------------------------------------------------------------------------------------------
# Launch plans: 64-bit offsets from sizes and strides alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,wide", [(1 << 16, False), (3 << 20, True)])
def test_plan_selects_64_bit_from_sizes(rows, wide):
    """(rows, 768) activations and (rows, 2304) outputs on the meta device (nothing allocated):
    64-bit offsets once an output spans 2^31 elements."""
    x = torch.empty(rows, 768, device="meta")
    plan, _ = fl._prepare([LinearProblem(x, torch.empty(2304, 768, device="meta"))], "gelu_tanh", None)
    assert plan.index_64 is wide
    assert (rows * 2304 >= INDEX_32_LIMIT) is wide


def test_plan_counts_strided_views_by_their_span():
    """A modulation chunk of a huge projection spans the whole projection (its row stride)."""
    modulation = torch.empty(1 << 15, 3 * (1 << 15), device="meta")  # 3 * 2^30 elements
    shift, scale, _ = modulation.chunk(3, dim=-1)
    x = torch.empty(1 << 15, 1 << 15, device="meta")  # 2^30: below the limit
    problem = LinearProblem(x, torch.empty(8, 1 << 15, device="meta"), prologue=NormPrologue("layer", 1e-6,
                                                                                             shift=shift, scale=scale))
    plan, _ = fl._prepare([problem], None, None)
    assert plan.index_64


def test_grid_covers_every_tile_of_both_problems():
    problems = [LinearProblem(torch.empty(2, 300, 64, device="meta"), torch.empty(100, 64, device="meta")),
                LinearProblem(torch.empty(2, 7, 32, device="meta"), torch.empty(100, 32, device="meta"))]
    plan, _ = fl._prepare(problems, None, None)
    grid, tiles_n, tiles0 = fl.launch_plan(plan, 64, 32)
    assert tiles_n == 4 and tiles0 == 10 * 4 and grid == (10 * 4 + 1 * 4,)


# --------------------------------------------------------------------------------------------
# Named errors
# --------------------------------------------------------------------------------------------
def bad_calls():
    x, w = randn(B, L, K), randn(N, K)
    yield "weight has shape", lambda: fused_linear(x, randn(N, K + 1))
    yield "weight has dtype", lambda: fused_linear(x, w.double())
    yield "x has dtype", lambda: fused_linear(x.to(torch.int32), w)
    yield "bias has shape", lambda: fused_linear(x, w, randn(N + 1))
    yield "activation must be", lambda: fused_linear(x, w, activation="relu")
    yield "even count", lambda: fused_linear(x, randn(N + 1, K), activation="gelu_mul")
    yield "a gate needs a residual", lambda: fused_linear(x, w, gate=randn(B, L, N))
    yield "residual has shape", lambda: fused_linear(x, w, residual=randn(B, L + 1, N))
    yield "unit stride", lambda: fused_linear(x, w, residual=randn(B, N, L).transpose(1, 2))
    yield "shift and prologue.scale go together", lambda: fused_linear(
        x, w, prologue=NormPrologue("layer", 1e-6, shift=randn(B, L, K)))
    yield "RMSNorm has no bias", lambda: fused_linear(x, w, prologue=NormPrologue("rms", 1e-6, bias=randn(K)))
    yield "norm must be", lambda: fused_linear(x, w, prologue=NormPrologue("batch", 1e-6))
    yield "eps must be", lambda: fused_linear(x, w, prologue=NormPrologue("layer", float("nan")))
    yield "prologue must be", lambda: fused_linear(x, w, prologue="layer")
    yield "chunk index", lambda: fused_linear(x, w, prologue=NormPrologue(
        "layer", 1e-6, adaln=AdaLNAffine(randn(B, 6 * K), randn(6, K), randn(6, K), shift_chunk=6, scale_chunk=0)))
    yield "out has shape", lambda: fused_linear(x, w, out=randn(B, L, N + 1))
    state, sigma = randn(L, N), torch.tensor(0.5, device=DEVICE)
    yield "flow.state has shape", lambda: fused_linear(randn(2, L, K), w, flow=FlowEpilogue(randn(L + 1, N), sigma,
                                                                                           sigma, 4.0))
    yield "flow epilogue takes one problem and no activation", lambda: fused_linear(
        randn(2, L, K), w, activation="silu", flow=FlowEpilogue(state, sigma, sigma, 4.0))
    yield "1 unless x holds", lambda: fused_linear(randn(1, L, K), w, flow=FlowEpilogue(state, sigma, sigma, 4.0))
    yield "0-dim float32", lambda: fused_linear(randn(2, L, K), w, flow=FlowEpilogue(state, 0.5, sigma, 4.0))
    yield "residual cannot be combined", lambda: fused_linear(randn(2, L, K), w, residual=randn(2, L, N),
                                                              flow=FlowEpilogue(state, sigma, sigma, 4.0))
    yield "1 to 2 problems", lambda: grouped_linear([LinearProblem(x, w)] * 3)
    yield "must be a LinearProblem", lambda: grouped_linear([(x, w)])
    yield "problem 0 gives", lambda: grouped_linear([LinearProblem(x, w), LinearProblem(x, randn(N + 1, K))])
    yield "share the prologue kind", lambda: grouped_linear([
        LinearProblem(x, w, prologue=NormPrologue("layer", 1e-6)), LinearProblem(x, w)])


@pytest.mark.parametrize("message,call", list(bad_calls()), ids=[m for m, _ in bad_calls()])
def test_bad_input_raises_a_named_error(message, call):
    with pytest.raises(KernelInputError, match=message):
        call()


# --------------------------------------------------------------------------------------------
# Configs and the tuner's problems
# --------------------------------------------------------------------------------------------
def test_configs_fit_their_vendor_and_include_the_library_path():
    for vendor in ("cuda", "hip"):
        configs = fl.candidate_configs("fused_linear", vendor)
        assert dict(fl.LIBRARY) in configs
        for config in configs:
            if config.get("LIBRARY"):
                continue
            stages = config["num_stages"]
            smem = (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * 2 * stages
            assert smem <= (64 if vendor == "hip" else 227) * 1024, config
    assert not fl.default_config("fused_linear", "cuda", "sm_90").get("LIBRARY")


@pytest.mark.parametrize("shape_set", ["nitro-ar", "nitro-e"])
def test_every_tuning_problem_builds_and_runs(shape_set):
    """The tuner's problems (shrunk to test size) are valid launches of the kernel."""
    seen = set()
    for shape in tuning_problems.fused_linear_shapes(shape_set):
        if shape["fusion"] in seen:
            continue
        seen.add(shape["fusion"])
        small = dict(shape, rows=6, n=min(shape["n"], 40), k=min(shape["k"], 24), dtype="float32")
        problem, activation, flow = tuning_problems.fused_linear_problem(small, DEVICE)
        assert_close(run(problem, activation, flow), want(problem, activation, flow), shape["fusion"])
    assert {"norm", "residual", "norm-gelu_tanh"} <= seen
    assert len(list(itertools.chain(fl.CONFIGS.cuda, fl.CONFIGS.hip))) > 10


if GPU_KERNELS:
    # bf16 / fp16, only where Triton compiles for a GPU (the interpreter's bf16 is not exact): the
    # kernel's error against an fp32 reference stays within twice eager's own error.
    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("fusion", ["norm", "residual", "norm-gelu_tanh", "norm-silu", "norm-gelu_mul",
                                        "add_silu", "norm-flow"])
    def test_low_precision_parity(fusion, dtype):
        shape = dict(rows=384, n=768, k=768, fusion=fusion, dtype="float32")
        problem, activation, flow = tuning_problems.fused_linear_problem(shape, DEVICE)
        exact = want(problem, activation, flow)

        def cast(value):
            if isinstance(value, torch.Tensor):
                return value.to(dtype) if value.dtype == torch.float32 and value.dim() else value
            if isinstance(value, (NormPrologue, AddSiLUPrologue, FlowEpilogue)):
                return type(value)(**{k: cast(v) for k, v in vars(value).items()})
            return value

        low = LinearProblem(**{k: cast(v) for k, v in vars(problem).items()})
        low_flow = cast(flow)
        eager, kernel = want(low, activation, low_flow), run(low, activation, low_flow)
        eager_error = (eager.float() - exact).abs().max().item()
        kernel_error = (kernel.float() - exact).abs().max().item()
        assert kernel_error <= 2 * eager_error + 1e-2 * exact.abs().max().item(), (kernel_error, eager_error)
