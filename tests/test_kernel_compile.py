"""Every Triton kernel compiles for NVIDIA sm_90 (H100) and AMD gfx942 (MI300X), without a GPU.

The CPU interpreter runs the kernels' arithmetic but not the compilers. tests/compile_kernels.py
runs the full-size models (Nitro-AR gan and joint_gan, Nitro-E; bf16; batch 1 and 64; sampling,
a training step and the adversarial fine-tuning's head sampler, forward and backward) on fake GPU
tensors through the real host launchers, so each kernel is compiled by Triton's own code
generation (PTX + the bundled ptxas, AMDGCN + ld.lld) with its default config and the
specialisations (alignment, divisibility) it gets at run time.
The budgets of what it compiled are checked in tests/test_static_budgets.py.
"""
import pytest
import torch

from compile_kernels import TARGETS, backward, python_autograd


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_model_site_compiles_and_launches(static_reports, target):
    report = static_reports[target]
    assert report["errors"] == [], "\n".join(f"{e['site']}: {e['error']}" for e in report["errors"])
    assert all(entry["sites"] and entry["grids"] for entry in report["kernels"])


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_kernel_is_compiled(static_reports, target):
    """The workloads reach every kernel the kernel modules define (a new kernel needs a site)."""
    report = static_reports[target]
    compiled = {f"{entry['module']}.{entry['kernel']}" for entry in report["kernels"]}
    assert compiled == set(report["defined_kernels"])
    # modulated norm (forward, backward, 2 reductions), attention (forward, dq, dk/dv), flow step
    # (2), fused linear
    assert {f"nitro_ar.kernels.{name}" for name in KNOWN_KERNELS} <= compiled


KNOWN_KERNELS = (
    "modulated_norm._modulated_norm_fwd_kernel", "modulated_norm._modulated_norm_bwd_kernel",
    "modulated_norm._sum_partials_kernel", "modulated_norm._adaln_backward_kernel",
    "joint_attention._joint_attention_fwd_kernel", "joint_attention._joint_attention_bwd_dq_kernel",
    "joint_attention._joint_attention_bwd_dkdv_kernel", "flow_step._flow_step_fwd_kernel", "flow_step._flow_step_bwd_kernel",
    "fused_linear._fused_linear_kernel",
)


# The harness's backward pass (compile_kernels.backward: the autograd engine cannot run on fake
# GPU tensors) against the engine, on CPU: custom Functions with non-tensor arguments, None and
# unused outputs (materialized or not), gradients of another dtype or a broadcast shape.
class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, label, x, nothing, w, factor):
        ctx.save_for_backward(x, w)
        ctx.factor = factor
        return x * w * factor, None

    @staticmethod
    def backward(ctx, grad, grad_none):
        assert grad_none is None
        x, w = ctx.saved_tensors
        return None, (grad * w * ctx.factor).double(), None, grad * x * ctx.factor, None


class _Pair(torch.autograd.Function):
    materialize = True

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(_Pair.materialize)
        return x * 2, x * 3

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        assert (grad_b is not None) == _Pair.materialize
        return grad_a * 2 + (0 if grad_b is None else grad_b * 3)


@pytest.mark.parametrize("materialize", [True, False])
def test_python_backward_matches_the_autograd_engine(monkeypatch, materialize):
    monkeypatch.setattr(_Pair, "materialize", materialize)
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    with python_autograd():
        h = torch.tanh(x @ w.t()) @ w + bias  # broadcast: bias's gradient is summed over rows
        scaled, _ = _Scale.apply("label", h, None, w, 0.5)
        a, _unused = _Pair.apply(scaled.to(torch.bfloat16))
        loss = (a.float() * h).sum() + scaled.square().mean()  # h used twice
        expected = torch.autograd.grad(loss, (x, w, bias), retain_graph=True)
        got = backward(loss, leaf_grads=True)
    for leaf, grad in zip((x, w, bias), expected):
        assert got[id(leaf)].dtype == leaf.dtype and got[id(leaf)].shape == leaf.shape
        torch.testing.assert_close(got[id(leaf)], grad)
