"""Parity of the fused modulated-norm kernels with their eager reference
(:func:`nitro_ar.kernels.reference.modulated_norm`).

CPU: the Triton interpreter in fp32 at small shapes. With a GPU and compiled Triton
(TRITON_INTERPRET=0) the same tests run on the GPU, plus bf16/fp16 parity.
"""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import DEVICE, GPU_KERNELS, KERNEL_BACKEND
from nitro_ar.kernels import modulated_norm as mn
from nitro_ar.kernels import reference, tuning_problems
from nitro_ar.kernels.backend import select_backend
from nitro_ar.kernels.errors import KernelInputError
from nitro_ar.kernels.modulated_norm import AdaLNAffine, modulated_norm
from storage import LAYOUTS, in_storage

# (norm, has weight, has bias)
NORMS = [("layer", True, True), ("layer", False, False), ("layer", True, False), ("rms", True, False),
         ("rms", False, False)]
MODULATIONS = ["none", "batch", "token", "adaln"]
# How x_new is formed: no residual, plain x + residual, or gated per batch / per token / AdaLN.
RESIDUALS = ["none", "plain", "batch", "token", "adaln"]


class Problem:
    """Leaf tensors of one call and the keyword arguments built from them (strided views).

    Per-token shift / scale / gate are chunks of one (..., 3D) projection; per-batch ones are
    chunks of one (B, 3D) projection seen as (B, 1, D) ((1, D) for an (N, D) x); AdaLN uses 6
    chunks with Nitro-E's indices (norm1: shift 0, scale 1; residual + norm2: gate 2, shift 3,
    scale 4).
    """

    def __init__(self, shape, norm=("layer", True, True), modulation="token", residual="token", eps=1e-6,
                 dtype=torch.float32, device=DEVICE):
        self.dtype, self.device = dtype, device
        dim = shape[-1]
        batch = shape[0] if len(shape) == 3 else 1
        kind, has_weight, has_bias = norm
        self.leaves = {}
        self.kwargs = dict(norm=kind, eps=eps)
        self.x = x = self.leaf("x", self.randn(*shape))
        if has_weight:
            self.kwargs["weight"] = self.leaf("weight", self.randn(dim) * 0.5 + 1)
        if has_bias:
            self.kwargs["bias"] = self.leaf("bias", self.randn(dim))
        if residual != "none":
            self.kwargs["residual"] = self.leaf("residual", self.randn(*shape))
        chunks = {}
        if "token" in (modulation, residual):
            chunks["token"] = self.leaf("token_proj", self.randn(*shape[:-1], 3 * dim)).chunk(3, dim=-1)
        if "batch" in (modulation, residual):
            rows = self.leaf("batch_proj", self.randn(batch, 3 * dim))
            chunks["batch"] = (rows.view(batch, 1, 3 * dim) if x.dim() == 3 else rows).chunk(3, dim=-1)
        if modulation in chunks:
            self.kwargs["shift"], self.kwargs["scale"] = chunks[modulation][:2]
        if residual in chunks:
            self.kwargs["gate"] = chunks[residual][2]
        if "adaln" in (modulation, residual):
            chunk_of = dict(gate_chunk=2 if residual == "adaln" else None)
            if modulation == "adaln":
                chunk_of.update(dict(shift_chunk=3, scale_chunk=4) if residual != "none" else dict(shift_chunk=0,
                                                                                                   scale_chunk=1))
            self.kwargs["adaln"] = AdaLNAffine(self.leaf("temb", self.randn(batch, 6 * dim)),
                                               self.leaf("ada_bias", self.randn(6, dim) * 0.3),
                                               self.leaf("ada_scale", self.randn(6, dim) * 0.3), **chunk_of)

    def leaf(self, name, tensor):
        self.leaves[name] = tensor.requires_grad_(True)
        return tensor

    def randn(self, *size):
        return torch.randn(*size, dtype=self.dtype, device=self.device)

    def inputs(self):
        return self.x, self.kwargs

    def reference(self, dtype=None):
        """The eager reference, optionally on inputs cast to ``dtype`` (same leaves)."""
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        kwargs = {name: cast(value) if isinstance(value, torch.Tensor) else value for name, value in self.kwargs.items()}
        if "adaln" in kwargs:
            ada = kwargs["adaln"]
            kwargs["adaln"] = dataclasses.replace(ada, temb=cast(ada.temb), bias=cast(ada.bias), scale=cast(ada.scale))
        return reference.modulated_norm(cast(self.x), **kwargs)

    def restore(self, name, layout):
        """Give argument ``name`` (a kwarg, an AdaLN field or x) the same values in another
        storage (:func:`storage.in_storage`), as a new leaf."""
        if name == "x":
            self.x = in_storage(self.leaf("x", self.x.detach().clone()), layout)
        elif name in ("temb", "ada_bias", "ada_scale"):
            field = {"temb": "temb", "ada_bias": "bias", "ada_scale": "scale"}[name]
            ada = self.kwargs["adaln"]
            tensor = in_storage(self.leaf(name, getattr(ada, field).detach().clone()), layout)
            self.kwargs["adaln"] = dataclasses.replace(ada, **{field: tensor})
        else:
            self.kwargs[name] = in_storage(self.leaf(name, self.kwargs[name].detach().clone()), layout)

    def run(self, backend=KERNEL_BACKEND):
        return modulated_norm(self.x, backend=backend, **self.kwargs)

    def grads(self, outputs, upstream):
        """Gradients of every leaf for the given upstream gradients (one per output)."""
        # The graph is kept: storage views of a leaf (see restore) are shared by two evaluations.
        return dict(zip(self.leaves, torch.autograd.grad(as_tuple(outputs), list(self.leaves.values()), upstream,
                                                         allow_unused=True, retain_graph=True)))


def as_tuple(outputs):
    """``out`` or ``(x_new, out)`` as a tuple."""
    return outputs if isinstance(outputs, tuple) else (outputs,)


def upstream_like(outputs):
    return [torch.randn_like(out) for out in as_tuple(outputs)]


def assert_parity(problem, backend=KERNEL_BACKEND, rtol=1e-4, atol=1e-4):
    """Forward outputs and every leaf gradient of ``backend`` match the eager reference."""
    expected = problem.reference()
    actual = problem.run(backend)
    upstream = upstream_like(expected)
    for got, want in zip(as_tuple(actual), as_tuple(expected)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    got_grads, want_grads = problem.grads(actual, upstream), problem.grads(expected, upstream)
    for name, want in want_grads.items():
        assert want is not None, name
        assert got_grads[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(got_grads[name], want, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")


def test_kernels_really_run():
    """The parity tests exercise the Triton kernels, not a silent fallback to torch."""
    assert select_backend(DEVICE, KERNEL_BACKEND) == KERNEL_BACKEND


@pytest.mark.parametrize("backend", [KERNEL_BACKEND, "torch"])
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("norm", NORMS, ids=lambda n: f"{n[0]}-w{int(n[1])}b{int(n[2])}")
def test_every_flag_combination(norm, modulation, residual, backend):
    assert_parity(Problem((2, 5, 48), norm, modulation, residual, eps=1e-5), backend)


# The sites of the models, at the real width with odd and non-power-of-two row counts.
SITES = {
    "nitro-e-norm1": dict(norm=("layer", True, True), modulation="adaln", residual="none", eps=1e-5),
    "nitro-e-residual-norm2": dict(norm=("layer", False, False), modulation="adaln", residual="adaln"),
    "backbone-residual-norm2": dict(norm=("layer", False, False), modulation="none", residual="plain"),
    "mlp-head-resblock": dict(norm=("layer", True, True), modulation="token", residual="token"),
    "transformer-head": dict(norm=("rms", True, False), modulation="token", residual="token"),
}


@pytest.mark.parametrize("dim", [48, 96, 768])
@pytest.mark.parametrize("length", [1, 5, 123, 384])
def test_widths_and_row_counts(dim, length):
    site = "nitro-e-residual-norm2" if length % 2 else "mlp-head-resblock"
    assert_parity(Problem((2, length, dim), **SITES[site]), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("site", sorted(SITES))
def test_model_sites(site):
    shape = (2, 80, 768) if "nitro-e" in site or "backbone" in site else (160, 768)  # head rows are (N, W)
    assert_parity(Problem(shape, **SITES[site]), rtol=2e-4, atol=2e-4)


def test_strided_views_of_one_projection():
    """x and residual as column slices, shift/scale/gate as unbind of a (B, N, 6, W) view."""
    batch, tokens, dim = 2, 7, 96
    base = torch.randn(batch, tokens, 2 * dim + 8, device=DEVICE, requires_grad=True)
    mod = torch.randn(batch, tokens, 6 * dim, device=DEVICE, requires_grad=True)
    weight = torch.randn(dim, device=DEVICE, requires_grad=True)
    x, residual = base[..., :dim], base[..., dim + 8:]
    gate1, gate2, scale1, scale2, shift1, shift2 = mod.view(batch, tokens, 6, dim).unbind(2)
    assert x.stride(1) == 2 * dim + 8 and gate1.stride(1) == 6 * dim
    kwargs = dict(norm="rms", eps=1e-6, weight=weight, shift=shift1, scale=scale1, residual=residual, gate=gate1)
    x_new, out = modulated_norm(x, backend=KERNEL_BACKEND, **kwargs)
    ref_new, ref_out = reference.modulated_norm(x, **kwargs)
    torch.testing.assert_close(x_new, ref_new)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    upstream = upstream_like((x_new, out))
    got = torch.autograd.grad((x_new, out), (base, mod, weight), upstream)
    want = torch.autograd.grad((ref_new, ref_out), (base, mod, weight), upstream)
    for name, g, w in zip(("base", "mod", "weight"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_per_batch_shapes_b_d_and_b_1_d():
    """Per-batch modulation given as (B, D) and as (B, 1, D) gives the same result."""
    problem = Problem((3, 9, 48), modulation="batch", residual="batch")
    x, kwargs = problem.inputs()
    squeezed = {name: kwargs[name][:, 0] for name in ("shift", "scale", "gate")}
    torch.testing.assert_close(modulated_norm(x, backend=KERNEL_BACKEND, **{**kwargs, **squeezed}),
                               problem.run())


@pytest.mark.parametrize("modulation,residual", [("batch", "token"), ("token", "batch"), ("adaln", "adaln"),
                                                 ("none", "plain"), ("adaln", "none")])
def test_no_unwritten_memory(nan_empty, modulation, residual):
    """Outputs, statistics, partial sums and gradients are fully written (odd rows and width)."""
    problem = Problem((3, 37, 96), ("layer", True, True), modulation, residual)
    outputs = problem.run()
    grads = problem.grads(outputs, upstream_like(outputs))
    for tensor in [*as_tuple(outputs), *grads.values()]:
        assert torch.isfinite(tensor).all()


def test_forward_without_autograd():
    problem = Problem((2, 17, 48), ("rms", True, False), "adaln", "adaln")
    with torch.no_grad():
        actual, expected = problem.run(), problem.reference()
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,modulation,residual", [((2, 0, 48), "adaln", "adaln"), ((0, 5, 48), "batch", "token"),
                                                       ((0, 48), "adaln", "adaln")])
def test_no_rows(shape, modulation, residual):
    """Empty inputs give empty outputs and zero parameter gradients."""
    assert_parity(Problem(shape, ("layer", True, True), modulation, residual))


def test_only_some_inputs_need_grad():
    """Frozen parameters and activations get no gradient; the others still match."""
    problem = Problem((2, 11, 48), ("layer", True, True), "token", "adaln")
    for name in ("weight", "bias", "temb", "residual"):
        problem.leaves[name].requires_grad_(False)
    problem.leaves = {name: leaf for name, leaf in problem.leaves.items() if leaf.requires_grad}
    assert_parity(problem)


@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 40),
    dim=st.integers(1, 160),
    eps=st.floats(1e-8, 1e-1),
    norm=st.sampled_from(NORMS),
    modulation=st.sampled_from(MODULATIONS),
    residual=st.sampled_from(RESIDUALS),
    flat=st.booleans(),
)
def test_property_shapes_and_eps(batch, length, dim, eps, norm, modulation, residual, flat):
    shape = (batch * length, dim) if flat else (batch, length, dim)
    # dim = 1 normalises to ~0 with huge gradients through rstd: compare relative to their size.
    tolerance = 1e-4 if dim > 1 else 1e-3
    assert_parity(Problem(shape, norm, modulation, residual, eps=eps), rtol=tolerance, atol=tolerance)


def _run_with_config(shape, config):
    """Forward and backward of a reduced tuning problem with one config: [out, *gradients]."""
    torch.manual_seed(0)
    small = {**shape, "batch": 2, "length": 21, "dim": 96, "dtype": "float32"}
    plan, inputs = tuning_problems.modulated_norm_problem(small, DEVICE)
    x_new, out, mean, rstd = mn.modulated_norm_forward(plan, *inputs, store_stats=True, config=config)
    grad_out, grad_x_new = torch.randn_like(out), torch.randn_like(out)
    needs = tuple(tensor is not None for tensor in inputs)
    grads = mn.modulated_norm_backward(plan, grad_out, grad_x_new, *mn._backward_inputs(inputs, x_new, mean, rstd),
                                       needs=needs, config=config)
    return [x_new, out, *(grad for grad in grads if grad is not None)]


@pytest.mark.parametrize("modulation", ["adaln", "token"])
@pytest.mark.parametrize("op_name", ["modulated_norm", "modulated_norm_backward"])
def test_host_side_config_parameters(op_name, modulation):
    """Every tile size and program count of the candidate configs gives the default's result."""
    shape = next(shape for shape in tuning_problems.modulated_norm_shapes("all") if shape["modulation"] == modulation)
    expected = _run_with_config(shape, None)
    host_params = {tuple((key, config[key]) for key in mn._HOST_KEYS if key in config)
                   for vendor in ("cuda", "hip") for config in mn.candidate_configs(op_name, vendor)}
    for params in sorted(host_params):
        for got, want in zip(_run_with_config(shape, {**mn.INTERPRETER_CONFIG, **dict(params)}), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{params}: {m}")


def test_tuning_shapes_and_buckets():
    shapes = tuning_problems.modulated_norm_shapes("all")
    assert shapes == tuning_problems.modulated_norm_shapes("nitro-ar") + tuning_problems.modulated_norm_shapes("nitro-e")
    buckets = {mn.tuning_bucket(shape) for shape in shapes}
    assert "d1024_r512" in buckets and all(bucket.startswith("d1024_r") for bucket in buckets)
    with pytest.raises(ValueError, match="shape set"):
        tuning_problems.modulated_norm_shapes("sd3")


# Each tensor argument, in the problem that reads it (per-token chunks, or AdaLN).
STORAGE_ARGUMENTS = {name: dict(modulation="token", residual="token")
                     for name in ("x", "residual", "shift", "scale", "gate", "weight", "bias")}
STORAGE_ARGUMENTS.update({name: dict(modulation="adaln", residual="adaln") for name in ("temb", "ada_bias", "ada_scale")})
STORAGE_ARGUMENTS["batch-shift"] = dict(modulation="batch", residual="batch")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(STORAGE_ARGUMENTS))
def test_every_argument_in_any_storage(name, layout):
    """Every tensor argument, strided, expanded or NaN-padded: the kernels read it through its
    strides (activations) or copy it once (parameters); forward and gradients match."""
    problem = Problem((2, 3, 16), **STORAGE_ARGUMENTS[name])
    problem.restore(name.replace("batch-", ""), layout)
    assert_parity(problem)


@pytest.mark.parametrize("name", ["x", "residual", "shift", "temb"])
def test_activation_strided_over_d_is_a_named_error(name):
    """Activations are read row by row with unit stride over D; any other layout is refused by name."""
    adaln = name == "temb"
    problem = Problem((2, 5, 48), modulation="adaln" if adaln else "token", residual="adaln" if adaln else "token")

    def strided_over_d(tensor):
        return torch.stack([tensor, tensor], dim=-1)[..., 0]

    if adaln:
        ada = problem.kwargs["adaln"]
        problem.kwargs["adaln"] = dataclasses.replace(ada, temb=strided_over_d(ada.temb))
    elif name == "x":
        problem.x = strided_over_d(problem.x)
    else:
        problem.kwargs[name] = strided_over_d(problem.kwargs[name])
    with pytest.raises(KernelInputError, match=f"{'adaln.temb' if adaln else name} must have unit stride"):
        problem.run()


def _bad_inputs():
    x = torch.randn(2, 5, 48)
    good = torch.randn(2, 5, 48)
    temb, ada = torch.randn(2, 6 * 48), torch.randn(6, 48)
    meta = torch.empty(48, device="meta")
    return [
        ("norm", dict(norm="batch"), "norm must be"),
        ("x-dtype", dict(x=x.long()), "x has dtype"),
        ("x-dims", dict(x=torch.randn(2, 3, 4, 48)), "x must be"),
        ("x-stride", dict(x=torch.randn(2, 48, 5).transpose(1, 2)), "x must have unit stride"),
        ("weight-shape", dict(weight=torch.randn(47)), "weight has shape"),
        ("weight-device", dict(weight=meta), "weight is on meta"),
        ("bias-dtype", dict(bias=torch.randn(48, dtype=torch.float64)), "bias has dtype"),
        ("rms-bias", dict(norm="rms", bias=torch.randn(48)), "RMSNorm has no bias"),
        ("residual-shape", dict(residual=torch.randn(2, 6, 48)), "residual has shape"),
        ("residual-dtype", dict(residual=good.double()), "residual has dtype"),
        ("shift-alone", dict(shift=good), "shift and scale go together"),
        ("shift-shape", dict(shift=torch.randn(3, 48), scale=torch.randn(3, 48)), "shift has shape"),
        ("scale-stride", dict(shift=good, scale=torch.randn(2, 48, 5).transpose(1, 2)), "scale must have unit stride"),
        ("mixed-sources", dict(shift=good, scale=torch.randn(2, 48)), "both must be per batch or both per token"),
        ("gate-alone", dict(gate=good), "a gate needs a residual"),
        ("temb-shape", dict(adaln=AdaLNAffine(torch.randn(3, 6 * 48), ada, ada, 0, 1)), "adaln.temb has shape"),
        ("adaln-bias-shape", dict(adaln=AdaLNAffine(temb, torch.randn(6, 47), ada, 0, 1)), "adaln.bias has shape"),
        ("adaln-scale-dtype", dict(adaln=AdaLNAffine(temb, ada, ada.half(), 0, 1)), "adaln.scale has dtype"),
        ("adaln-chunk-range", dict(residual=good, adaln=AdaLNAffine(temb, ada, ada, gate_chunk=6)),
         "adaln.gate_chunk=6"),
        ("adaln-chunk-pair", dict(adaln=AdaLNAffine(temb, ada, ada, shift_chunk=0)), "adaln.shift_chunk and"),
        ("adaln-chunk-repeat", dict(adaln=AdaLNAffine(temb, ada, ada, 1, 1)), "distinct"),
        ("adaln-and-shift", dict(shift=good, scale=good, adaln=AdaLNAffine(temb, ada, ada, 0, 1)), "both as tensors"),
    ]


@pytest.mark.parametrize("backend", [KERNEL_BACKEND, "torch"])
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_input_names_the_tensor(case, backend):
    _, changes, message = case
    kwargs = {"x": torch.randn(2, 5, 48), "norm": "layer", "eps": 1e-6, **changes}
    with pytest.raises(ValueError, match=message):
        modulated_norm(kwargs.pop("x"), backend=backend, **kwargs)


if GPU_KERNELS:
    # bf16 / fp16 parity, only where Triton compiles for a GPU (the interpreter's bf16 is not exact):
    # the kernel's error against an fp32 reference stays within twice eager's own error.
    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("site", sorted(SITES))
    def test_low_precision_parity(site, dtype):
        problem = Problem((2, 384, 768), **SITES[site], dtype=dtype)
        exact = problem.reference(torch.float32)
        eager, kernel = problem.reference(), problem.run()
        upstream = upstream_like(exact)
        exact_grads = problem.grads(exact, upstream)
        eager_grads, kernel_grads = (problem.grads(out, [u.to(dtype) for u in upstream]) for out in (eager, kernel))
        pairs = list(zip(as_tuple(kernel), as_tuple(eager), as_tuple(exact)))
        pairs += [(kernel_grads[n], eager_grads[n], exact_grads[n]) for n in exact_grads]
        for got, eager_value, want in pairs:
            want = want.float()
            eager_error = (eager_value.float() - want).abs().max().item()
            kernel_error = (got.float() - want).abs().max().item()
            assert kernel_error <= 2 * eager_error + 1e-2 * want.abs().max().item(), (kernel_error, eager_error)
