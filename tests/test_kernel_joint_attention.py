"""Parity of the fused joint-attention (ASA) kernels with their eager reference
(:func:`nitro_ar.kernels.reference.fused_joint_attention`).

CPU: the Triton interpreter in fp32 at small shapes (B = 1, 1..3 heads). With a GPU and compiled
Triton (TRITON_INTERPRET=0) the same tests run on the GPU, plus bf16/fp16 parity.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import DEVICE, GPU_KERNELS, KERNEL_BACKEND
from nitro_ar.kernels import joint_attention as ja
from nitro_ar.kernels import reference
from nitro_ar.kernels.backend import select_backend, validate_config
from nitro_ar.kernels.errors import KernelInputError
from nitro_ar.kernels.joint_attention import joint_attention, self_attention
from storage import LAYOUTS, in_storage

PATTERNS = [(1, 1), (4, 1), (4, 4)]  # (groups, group_len): Nitro-E's blocks i % 3 == 0, 1, 2
NORM_NAMES = ("q_norm_img", "k_norm_img", "q_norm_txt", "k_norm_txt")


def randn(*size, **kwargs):
    """torch.randn on the device under test (unless ``device`` is given)."""
    return torch.randn(*size, **{"device": DEVICE, **kwargs})


class Problem:
    """Leaf tensors of one joint-attention call and the q/k/v views built from them.

    Layouts: ``fused`` (one (B, L, 3, H, d) projection per stream, unbound: the model's layout),
    ``separate`` (six contiguous tensors), ``mixed`` (q from a (B, H, L, d) tensor transposed,
    k and v from one (B, L, 2, H, d) projection: every tensor has different strides).
    """

    def __init__(self, len_img, len_txt, heads=1, head_dim=32, groups=1, group_len=1, qk_norm=False,
                 text_output=True, layout="fused", batch=1, dtype=torch.float32, device=DEVICE):
        self.groups, self.group_len, self.text_output = groups, group_len, text_output
        self.dtype, self.device = dtype, device
        self.leaves = {}
        streams = {}
        for stream, length in (("img", len_img), ("txt", len_txt)):
            shape = (batch, length, heads, head_dim)
            if layout == "fused":
                streams[stream] = self.leaf(f"qkv_{stream}", batch, length, 3, heads, head_dim).unbind(2)
            elif layout == "separate":
                streams[stream] = tuple(self.leaf(f"{kind}_{stream}", *shape) for kind in "qkv")
            else:
                q = self.leaf(f"q_{stream}", batch, heads, length, head_dim).transpose(1, 2)
                streams[stream] = (q, *self.leaf(f"kv_{stream}", batch, length, 2, heads, head_dim).unbind(2))
        self.img, self.txt = streams["img"], streams["txt"]
        self.norms = {}
        if qk_norm:
            for name in NORM_NAMES:
                weight = torch.rand(head_dim, dtype=dtype, device=device) + 0.5
                self.norms[name] = self.leaves[name] = weight.requires_grad_(True)

    def leaf(self, name, *size):
        self.leaves[name] = torch.randn(*size, dtype=self.dtype, device=self.device, requires_grad=True)
        return self.leaves[name]

    def run(self, backend=KERNEL_BACKEND):
        return joint_attention(*self.img, *self.txt, groups=self.groups, group_len=self.group_len,
                               text_output=self.text_output, backend=backend, **self.norms)

    def reference(self, dtype=None):
        """The eager reference (q/k RMSNorm + cat + rearrange + SDPA + inverse), optionally on
        inputs cast to ``dtype``."""
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        streams = [cast(t) for t in (*self.img, *self.txt)]
        out_img, out_txt = reference.fused_joint_attention(
            *streams, groups=self.groups, group_len=self.group_len, text_output=self.text_output,
            **{name: cast(weight) for name, weight in self.norms.items()})
        return (out_img, out_txt) if self.text_output else (out_img,)

    def restore(self, name, layout):
        """Give one input (``q_img`` ... ``v_txt`` or a norm weight) the same values in another
        storage (:func:`storage.in_storage`), as a new leaf."""
        if name in self.norms:
            self.leaves[name] = self.norms[name].detach().clone().requires_grad_(True)
            self.norms[name] = in_storage(self.leaves[name], layout)
            return
        kind, stream = name.split("_")
        tensors = list(getattr(self, stream))
        index = "qkv".index(kind)
        self.leaves[name] = tensors[index].detach().clone().requires_grad_(True)
        tensors[index] = in_storage(self.leaves[name], layout)
        setattr(self, stream, tuple(tensors))

    def grads(self, outputs, upstream):
        """Gradients of every leaf for the given upstream gradients (one per output); the graph
        is kept, as storage views of a leaf (see restore) are shared by two evaluations."""
        return dict(zip(self.leaves, torch.autograd.grad(outputs, list(self.leaves.values()), upstream,
                                                         allow_unused=True, retain_graph=True)))


def kernel_outputs(result):
    """The tensors a joint_attention call returns, checking out_txt is None exactly without text output."""
    out_img, out_txt = result
    return (out_img,) if out_txt is None else (out_img, out_txt)


def assert_parity(problem, backend=KERNEL_BACKEND, rtol=1e-4, atol=1e-5):
    """Forward outputs and every leaf gradient (both streams' q/k/v, norm weights) match the reference."""
    expected = problem.reference()
    actual = kernel_outputs(problem.run(backend))
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    upstream = [torch.randn_like(out) for out in expected]
    got_grads, want_grads = problem.grads(actual, upstream), problem.grads(expected, upstream)
    for name, want in want_grads.items():
        assert want is not None, name
        assert got_grads[name] is not None, f"no gradient for {name}"
        # Norm-weight gradients sum over every row: compare relative to their size.
        tol = dict(rtol=1e-4, atol=1e-4 * want.abs().max().item()) if name in NORM_NAMES else dict(rtol=rtol, atol=atol)
        torch.testing.assert_close(got_grads[name], want, **tol, msg=lambda m: f"grad {name}: {m}")


def test_kernels_really_run():
    """The parity tests exercise the Triton kernels, not a silent fallback to torch."""
    assert select_backend(DEVICE, KERNEL_BACKEND) == KERNEL_BACKEND


# (len_img, len_txt, heads, head_dim, qk_norm, text_output): the real stream lengths (256 and 80
# image tokens, 16..128 text tokens) for every ASA pattern, 1..2 heads to stay fast.
REAL_CASES = [
    (256, 128, 1, 32, True, True),
    (80, 128, 2, 32, True, True),
    (80, 16, 1, 64, False, True),
    (256, 64, 1, 32, True, False),
    (80, 128, 1, 64, True, False),
]


@pytest.mark.parametrize("groups,group_len", PATTERNS)
@pytest.mark.parametrize("case", REAL_CASES, ids=lambda c: "img{}-txt{}-h{}-d{}-norm{:d}-txt_out{:d}".format(*c))
def test_real_lengths(case, groups, group_len):
    len_img, len_txt, heads, head_dim, qk_norm, text_output = case
    assert_parity(Problem(len_img, len_txt, heads, head_dim, groups, group_len, qk_norm, text_output))


# Odd lengths (not multiples of the tile), other group patterns, 1..3 heads, head_dim 16..128,
# every input layout.
ODD_CASES = [
    dict(len_img=17, len_txt=5, heads=3, head_dim=32, qk_norm=True, layout="separate"),
    dict(len_img=1, len_txt=1, heads=2, head_dim=16, qk_norm=True, layout="mixed"),
    dict(len_img=42, len_txt=18, heads=3, head_dim=64, groups=2, group_len=3, qk_norm=True, text_output=False),
    dict(len_img=99, len_txt=21, heads=2, head_dim=16, groups=3, qk_norm=False, layout="mixed"),
    dict(len_img=48, len_txt=80, heads=3, head_dim=32, groups=4, group_len=4, qk_norm=True, layout="mixed"),
    dict(len_img=130, len_txt=70, heads=1, head_dim=128, groups=2, group_len=5, qk_norm=True),
    dict(len_img=80, len_txt=32, heads=2, head_dim=32, groups=4, group_len=1, qk_norm=True, batch=3,
         layout="separate", text_output=False),
]


@pytest.mark.parametrize("case", ODD_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_odd_shapes_and_layouts(case):
    assert_parity(Problem(**case))


@pytest.mark.parametrize("text_output", [True, False])
@pytest.mark.parametrize("groups,group_len", PATTERNS)
def test_torch_backends_match_reference(groups, group_len, text_output):
    for backend in ("torch", "reference"):
        assert_parity(Problem(80, 32, 2, 32, groups, group_len, True, text_output), backend)


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=32, BLOCK_N=16)],
                         ids=lambda c: f"m{c['BLOCK_M']}-n{c['BLOCK_N']}")
def test_launchers_with_other_tiles(config):
    """The host launchers take any tile config (tuner candidates): several tiles per group."""
    problem = Problem(80, 48, 2, 32, groups=4, group_len=1, qk_norm=True)
    norms = [problem.norms[name] for name in NORM_NAMES]
    config = dict(config, num_warps=4, num_stages=1)
    with torch.no_grad():
        out_img, out_txt, lse_img, lse_txt = ja.joint_attention_forward(*problem.img, *problem.txt, norms, 4, 1,
                                                                         1e-6, True, config=config)
    expected = problem.reference()
    torch.testing.assert_close(out_img, expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_txt, expected[1], rtol=1e-4, atol=1e-5)
    upstream = [torch.randn_like(out) for out in expected]
    dq_img, dk_img, dv_img, dq_txt, dk_txt, dv_txt, norm_grads = ja.joint_attention_backward(
        *upstream, *problem.img, *problem.txt, norms, out_img, out_txt, lse_img, lse_txt, 4, 1, 1e-6, config=config)
    inputs = [*problem.img, *problem.txt, *norms]
    want = torch.autograd.grad(expected, inputs, upstream)
    for got, wanted in zip((dq_img, dk_img, dv_img, dq_txt, dk_txt, dv_txt, *norm_grads), want):
        torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-4 * wanted.abs().max().item())


@pytest.mark.parametrize("text_output", [True, False])
@pytest.mark.parametrize("groups,group_len", [(1, 1), (4, 4)])
def test_no_unwritten_memory(nan_empty, groups, group_len, text_output):
    """Outputs, log-sum-exps, deltas, partial sums and gradients are fully written (odd group sizes)."""
    assert_parity(Problem(80, 48, 2, 32, groups, group_len, qk_norm=True, text_output=text_output))


reference_self_attention = reference.self_attention


@pytest.mark.parametrize("backend", [KERNEL_BACKEND, "torch"])
@pytest.mark.parametrize("length,batch", [(1, 2), (17, 2), (256, 1)])
def test_self_attention(nan_empty, length, batch, backend):
    """The transformer head's attention: qkv viewed (B, L, 3, H, 64), L = 256 or 1 (and odd 17)."""
    qkv = randn(batch, length, 3, 2, 64, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = self_attention(q, k, v, backend=backend)
    expected = reference_self_attention(q, k, v)
    assert out.shape == (batch, length, 2, 64) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(out)
    (got,), (want,) = (torch.autograd.grad(o, qkv, upstream) for o in (out, expected))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@given(groups=st.integers(1, 4), group_len=st.sampled_from([1, 2, 4]), img_rows=st.integers(1, 4),
       txt_rows=st.integers(1, 3), text_output=st.booleans())
def test_property_groups_are_independent_joint_attentions(groups, group_len, img_rows, txt_rows, text_output):
    """With s groups the result equals plain joint attention on each group's members separately."""
    len_img, len_txt = img_rows * groups * group_len, txt_rows * groups * group_len
    problem = Problem(len_img, len_txt, heads=2, head_dim=16, groups=groups, group_len=group_len, qk_norm=True,
                      text_output=text_output)
    with torch.no_grad():
        out_img, out_txt = problem.run()
        for group in range(groups):
            members = [torch.tensor([p for p in range(length) if (p // group_len) % groups == group])
                       for length in (len_img, len_txt)]
            img, txt = ([x[:, idx] for x in stream] for stream, idx in zip((problem.img, problem.txt), members))
            group_img, group_txt = joint_attention(*img, *txt, text_output=text_output, backend=KERNEL_BACKEND,
                                                   **problem.norms)
            torch.testing.assert_close(out_img[:, members[0]], group_img, rtol=1e-5, atol=1e-6)
            if text_output:
                torch.testing.assert_close(out_txt[:, members[1]], group_txt, rtol=1e-5, atol=1e-6)
            else:
                assert out_txt is None and group_txt is None


def test_tuning_registration_and_configs():
    """Both ops are registered; every config is valid for its vendor; defaults are candidates' kin."""
    from nitro_ar.kernels.tuning import registered_ops

    ops = registered_ops()
    for name in ("joint_attention", "joint_attention_backward"):
        op = ops[name]
        for vendor in ("cuda", "hip"):
            configs = op.configs(vendor)
            assert configs
            for config in [*configs, op.default(vendor, "any")]:
                validate_config(config, vendor)
                assert {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} <= set(config)
                if vendor == "hip":
                    assert config["num_stages"] == 1
        for shape_set in ("nitro-ar", "nitro-e"):
            shapes = op.shapes(shape_set)
            assert shapes and all(isinstance(op.bucket(shape), str) for shape in shapes)
        assert op.default("cpu", "cpu") == ja.INTERPRETER_CONFIG


def _bad(**changes):
    """Keyword arguments of a valid call (fp32, B=1, image 16, text 8, 2 heads x 32) with changes."""
    kwargs = dict(q_img=randn(1, 16, 2, 32), k_img=randn(1, 16, 2, 32), v_img=randn(1, 16, 2, 32),
                  q_txt=randn(1, 8, 2, 32), k_txt=randn(1, 8, 2, 32), v_txt=randn(1, 8, 2, 32))
    kwargs.update(changes)
    return kwargs


# (id, () -> keyword arguments, expected message)
BAD_INPUTS = [
    ("img-length-not-divisible", lambda: _bad(groups=4, group_len=4, q_img=randn(1, 12, 2, 32),
                                              k_img=randn(1, 12, 2, 32), v_img=randn(1, 12, 2, 32)),
     r"length 12 of q_img/k_img/v_img is not divisible by groups \* group_len = 4 \* 4"),
    ("groups-3", lambda: _bad(groups=3), r"length 16 of q_img.*not divisible"),
    ("txt-length-not-divisible", lambda: _bad(groups=2, group_len=2, q_txt=randn(1, 6, 2, 32),
                                              k_txt=randn(1, 6, 2, 32), v_txt=randn(1, 6, 2, 32)),
     r"length 6 of q_txt/k_txt/v_txt"),
    ("head-dim-mismatch", lambda: _bad(k_txt=randn(1, 8, 2, 64)), r"head_dim mismatch: q_img .* k_txt has 64"),
    ("dtype-mismatch", lambda: _bad(v_txt=randn(1, 8, 2, 32, dtype=torch.float16)),
     r"dtype mismatch: q_img is torch.float32 but v_txt is torch.float16"),
    ("unsupported-dtype", lambda: _bad(k_img=randn(1, 16, 2, 32, dtype=torch.float64)), r"k_img has dtype"),
    ("device-mismatch", lambda: _bad(q_txt=randn(1, 8, 2, 32, device="meta")), r"device mismatch: .* q_txt"),
    ("last-dim-stride", lambda: _bad(v_img=randn(1, 16, 2, 64)[..., ::2]), r"v_img must have unit stride"),
    ("not-4d", lambda: _bad(q_img=randn(16, 2, 32)), r"q_img must be a 4-D"),
    ("kv-length", lambda: _bad(k_txt=randn(1, 4, 2, 32)), r"k_txt has 4 positions but q_txt has 8"),
    ("heads-mismatch", lambda: _bad(q_txt=randn(1, 8, 3, 32)), r"q_txt has shape .* batch and heads"),
    ("partial-norms", lambda: _bad(q_norm_img=randn(32), k_norm_img=randn(32)), r"missing q_norm_txt, k_norm_txt"),
    ("norm-shape", lambda: _bad(**{name: randn(32) for name in NORM_NAMES[:3]}, k_norm_txt=randn(16)),
     r"k_norm_txt must have shape \(32,\)"),
    ("bad-groups", lambda: _bad(groups=0), r"groups and group_len must be positive"),
]


@pytest.mark.parametrize("backend", [KERNEL_BACKEND, "torch"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[0])
def test_bad_input_names_the_tensor(case, backend):
    _, make_kwargs, message = case
    kwargs = make_kwargs()
    streams = [kwargs.pop(name) for name in ("q_img", "k_img", "v_img", "q_txt", "k_txt", "v_txt")]
    with pytest.raises(ValueError, match=message):
        joint_attention(*streams, backend=backend, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", [*NORM_NAMES, "q_img", "k_img", "v_txt"])
def test_every_argument_in_any_storage(name, layout):
    """q/k/v (read through their strides) and the q/k norm weights (copied once to the d
    consecutive values the kernels read) in strided, expanded and NaN-padded storage."""
    problem = Problem(20, 12, heads=2, head_dim=16, groups=2, group_len=2, qk_norm=True, batch=2, layout="separate")
    problem.restore(name, layout)
    assert_parity(problem)


def test_expanded_upstream_gradient():
    """A stride-0 upstream gradient (from ``out.sum()``) is read in the layout the kernels need."""
    problem = Problem(16, 8, heads=2, head_dim=16, qk_norm=True)
    out_img, out_txt = problem.run()
    want_img, want_txt = problem.reference()
    got = problem.grads((out_img.sum(), out_txt.sum()), None)
    want = problem.grads((want_img.sum(), want_txt.sum()), None)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_norm_weights_of_different_dtypes_are_refused():
    norms = {name: randn(32) for name in NORM_NAMES}
    norms["k_norm_txt"] = norms["k_norm_txt"].half()
    with pytest.raises(KernelInputError, match="q/k norm weights must share one dtype"):
        joint_attention(*[randn(1, 8, 2, 32) for _ in range(6)], backend=KERNEL_BACKEND, **norms)


def test_kernel_head_dim_limits():
    """The kernels need a power-of-two head_dim in 16..128; the torch backend takes any."""
    q, k, v = randn(1, 8, 3, 2, 48).unbind(2)
    with pytest.raises(ValueError, match="head_dim a power of two in 16..128, got 48"):
        self_attention(q, k, v, backend=KERNEL_BACKEND)
    torch.testing.assert_close(self_attention(q, k, v, backend="torch"), reference_self_attention(q, k, v))
    with pytest.raises(ValueError, match="v must have unit stride"):
        self_attention(q, k, randn(1, 8, 2, 96)[..., ::2], backend=KERNEL_BACKEND)


if GPU_KERNELS:
    # bf16 / fp16 parity, only where Triton compiles for a GPU (the interpreter's bf16 is not exact):
    # the kernel's error against an fp32 reference stays within twice eager's own error.
    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("len_img", [256, 80])
    @pytest.mark.parametrize("groups,group_len", PATTERNS)
    def test_low_precision_parity(groups, group_len, len_img, dtype):
        problem = Problem(len_img, 128, 24, 32, groups, group_len, qk_norm=True, batch=2, dtype=dtype)
        exact = problem.reference(torch.float32)
        eager, kernel = problem.reference(), kernel_outputs(problem.run())
        upstream = [torch.randn_like(out) for out in exact]
        exact_grads, eager_grads, kernel_grads = (problem.grads(outs, [u.to(out_dtype) for u in upstream])
                                                  for outs, out_dtype in ((exact, torch.float32), (eager, dtype),
                                                                          (kernel, dtype)))
        pairs = list(zip(kernel, eager, exact)) + [(kernel_grads[n], eager_grads[n], exact_grads[n])
                                                   for n in exact_grads]
        for got, eager_value, want in pairs:
            want = want.float()
            eager_error = (eager_value.float() - want).abs().max().item()
            kernel_error = (got.float() - want).abs().max().item()
            assert kernel_error <= 2 * eager_error + 1e-2 * want.abs().max().item(), (kernel_error, eager_error)
