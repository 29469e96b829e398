"""GEMMs with fused prologue / epilogue: eager vs torch.compile vs library GEMMs vs the fused kernel.

Sites (``nitro_ar.kernels.tuning_problems.fused_linear_shapes``, the shapes the tuner times): the
backbone stages (norm -> q/k/v, out-projection + gated residual, norm -> FF up + GELU, FF down
+ gated residual) at the CFG batch of 1 and 32 images, the MLP head's res-block pair and final
layer with the Euler step, the heads' modulation GEMM with SiLU(t + c) as prologue.

Implementations: "eager" (:func:`nitro_ar.kernels.reference.fused_linear`, plain torch),
"compile" (torch.compile of it), "library" (the kernel module's library path: modulated-norm
kernel, cuBLAS / hipBLASLt, torch epilogues) and "fused" (the Triton kernel, default config).
On CPU (no compiled Triton) a reduced size times eager only, so the harness stays exercised.
``extra_info`` records FLOPs and bytes (weights + activations), TFLOP/s and the fraction of peak.
"""
import functools

import pytest
import torch

from benchutil import ON_GPU, measure, record_rate, synchronized
from nitro_ar.kernels import reference
from nitro_ar.kernels.tuning_problems import fused_linear_problem, fused_linear_shapes

FUSIONS = ["norm", "residual", "norm-gelu_tanh", "norm-silu", "norm-flow", "add_silu", "norm-gelu_mul"]
IMPLEMENTATIONS = ["eager", "compile", "library", "fused"] if ON_GPU else ["eager"]


def _cases():
    if not ON_GPU:
        return [dict(rows=64, n=96, k=64, fusion=fusion, dtype="float32") for fusion in FUSIONS]
    seen, cases = set(), []
    for shape in fused_linear_shapes("all"):
        key = (shape["rows"], shape["n"], shape["k"], shape["fusion"])
        if key not in seen:
            seen.add(key)
            cases.append(shape)
    return cases


CASES = _cases()


def _eager(problem, activation, flow):
    return reference.fused_linear(problem.x, problem.weight, problem.bias, prologue=problem.prologue,
                                  activation_kind=activation, residual=problem.residual, gate=problem.gate, flow=flow)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_eager)


def _implementation(name):
    if name == "eager":
        return _eager
    if name == "compile":
        return _compiled()
    from nitro_ar.kernels import fused_linear as fl

    config = dict(fl.LIBRARY) if name == "library" else None
    return lambda problem, activation, flow: fl.grouped_linear([problem], activation=activation, flow=flow,
                                                               backend="triton", config=config)[0]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", CASES, ids=[f"{s['fusion']}-m{s['rows']}-n{s['n']}-k{s['k']}" for s in CASES])
def test_fused_linear(benchmark, device, shape, impl):
    benchmark.group = f"fused_linear {shape['fusion']} m{shape['rows']} n{shape['n']} k{shape['k']}"
    problem, activation, flow = fused_linear_problem(shape, device)
    fn = _implementation(impl)

    def run():
        with torch.no_grad():
            return fn(problem, activation, flow)

    expected = _eager(problem, activation, flow)
    out = run()  # compile / warm up outside the timed rounds
    measure(benchmark, synchronized(run, device))
    rows, n, k = problem.x.shape[0] * problem.x.shape[1], problem.weight.shape[0], problem.x.shape[2]
    element = problem.x.element_size()
    benchmark.extra_info.update(impl=impl, shape=shape)
    record_rate(benchmark, device, flops=2 * rows * n * k, bytes_moved=(n * k + rows * (k + n)) * element)
    error = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
    assert error < (2e-2 if ON_GPU else 1e-5), f"{impl} differs from eager by {error:.2e}"
