"""Every Triton kernel compiles for NVIDIA sm_90 (H100) and AMD gfx942 (MI300X), without a GPU.

The CPU interpreter runs the kernels' arithmetic but not the compilers. tests/compile_kernels.py
runs the full-size models (Nitro-AR gan and joint_gan, Nitro-E; bf16; batch 1 and 64; sampling
and a training step) on fake GPU tensors through the real host launchers, so each kernel is
compiled by Triton's own code generation (PTX + the bundled ptxas, AMDGCN + ld.lld) with its
default config and the specialisations (alignment, divisibility) it gets at run time.
The budgets of what it compiled are checked in tests/test_static_budgets.py.
"""
import pytest

from compile_kernels import TARGETS

pytestmark = pytest.mark.slow
# Known and open (strict: these fail loudly once fixed, so the marks come off):
# - bf16-autocast training (Accelerate's bf16, float32 weights) reaches the fused norm with an
#   float32 residual stream and bf16 branch outputs: the kernels' dtype checks raise ValueError
#   (nitro_ar.fast / kernels, issue 10 item 3);
# - the backward pass on fake GPU tensors stops in the autograd engine (hasPrimaryContext on a
#   machine without a CUDA device), so the backward kernels are not reached by this harness yet.
OPEN_TRAINING_SITES = pytest.mark.xfail(strict=True, reason="training sites: autocast dtypes; backward on fake GPU")


@OPEN_TRAINING_SITES
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_model_site_compiles_and_launches(static_reports, target):
    report = static_reports[target]
    assert report["errors"] == [], "\n".join(f"{e['site']}: {e['error']}" for e in report["errors"])
    assert all(entry["sites"] and entry["grids"] for entry in report["kernels"])


@OPEN_TRAINING_SITES
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_kernel_is_compiled(static_reports, target):
    """The workloads reach every kernel the kernel modules define (a new kernel needs a site)."""
    report = static_reports[target]
    compiled = {f"{entry['module']}.{entry['kernel']}" for entry in report["kernels"]}
    assert compiled == set(report["defined_kernels"])
    # modulated norm (forward, backward, 2 reductions), attention (forward, dq, dk/dv), flow step (2)
    assert len(compiled) >= 9

