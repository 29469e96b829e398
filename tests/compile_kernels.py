"""Compile every Triton kernel for an NVIDIA H100 (sm_90) and an AMD MI300X (gfx942) without a
GPU, with its default launch configs: the interpreter does not catch what only the compilers
reject (non-power-of-two aranges, shared-memory limits, backend-only options).

Run in a process where Triton was imported with TRITON_INTERPRET unset (tests/test_kernel_compile.py).
Prints one line per compiled kernel and exits non-zero on the first failure.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile checks need TRITON_INTERPRET unset"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nitro_ar.kernels import flow_step, joint_attention, modulated_norm  # noqa: E402

TARGETS = {"cuda": GPUTarget("cuda", 90, 32), "hip": GPUTarget("hip", "gfx942", 64)}
ARCH = {"cuda": "sm_90", "hip": "gfx942"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "waves_per_eu", "matrix_instr_nonkdim", "kpack")
# Buffers the launchers allocate in float32 (statistics, partial sums, fp32 parameters).
FP32_POINTERS = ("mean", "rstd", "lse", "delta", "partial", "sigma", "weight_ptr", "bias_ptr", "ada_", "grad_weight",
                 "grad_bias", "grad_gate", "grad_shift", "grad_scale")
FLOAT_SCALARS = ("eps", "qk_scale", "sm_scale", "cfg")


def compile_kernel(kernel, vendor, config, constexprs, dtype="bf16", absent=()):
    """Compile ``kernel`` for ``vendor`` with meta-parameters ``constexprs`` and the launch
    options of ``config``; ``absent`` pointer arguments are passed as None (constexpr)."""
    signature, values = {}, dict(constexprs)
    if "INDEX_64" in kernel.arg_names:  # the launch plan's index width; int32 offsets at these shapes
        values.setdefault("INDEX_64", False)
    for name in kernel.arg_names:
        if name in values or name in absent:
            signature[name] = "constexpr"
            values.setdefault(name, None)
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if any(tag in name for tag in FP32_POINTERS) else f"*{dtype}"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in values.items()})
    options = {k: v for k, v in config.items() if k in LAUNCH_OPTIONS}
    compiled = triton.compile(source, target=TARGETS[vendor], options=options)
    print(f"ok {vendor} {kernel.fn.__name__} {dtype} {options} shared={compiled.metadata.shared}")
    return compiled


def modulated_norm_kernels(vendor):
    block_d = 1024  # D = 768 padded to a power of two
    for rms, gate, modulation in ((False, 3, 3), (True, 2, 2), (False, 0, 0)):
        flags = dict(IS_RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms, HAS_RESIDUAL=True, GATE=gate, MODULATION=modulation)
        config = modulated_norm.default_config("modulated_norm", vendor, ARCH[vendor])
        rows = max(1, config["TILE_ELEMENTS"] // block_d)
        compile_kernel(modulated_norm._modulated_norm_fwd_kernel, vendor, config,
                       dict(flags, STORE_STATS=True, BLOCK_ROWS=rows, BLOCK_D=block_d))
        config = modulated_norm.default_config("modulated_norm_backward", vendor, ARCH[vendor])
        rows = max(1, config["TILE_ELEMENTS"] // block_d)
        needs = dict(HAS_GRAD_X_NEW=True, STORE_GRAD_X=True, STORE_GRAD_RES=True, NEED_GRAD_GATE=True,
                     NEED_GRAD_SHIFT=True, NEED_GRAD_SCALE=True, NEED_GRAD_WEIGHT=True, NEED_GRAD_BIAS=not rms)
        compile_kernel(modulated_norm._modulated_norm_bwd_kernel, vendor, config,
                       dict(flags, **needs, BLOCK_ROWS=rows, BLOCK_D=block_d))
    reduce = dict(num_warps=4)
    compile_kernel(modulated_norm._sum_partials_kernel, vendor, reduce, dict(BLOCK_P=32, BLOCK_D=256))
    compile_kernel(modulated_norm._adaln_backward_kernel, vendor, reduce, dict(BLOCK_P=32, BLOCK_D=256))


def joint_attention_kernels(vendor):
    kernels = (("joint_attention", joint_attention._joint_attention_fwd_kernel),
               ("joint_attention_backward", joint_attention._joint_attention_bwd_dq_kernel),
               ("joint_attention_backward", joint_attention._joint_attention_bwd_dkdv_kernel))
    norm_ptrs = ("q_norm_img_ptr", "k_norm_img_ptr", "q_norm_txt_ptr", "k_norm_txt_ptr")
    for op, kernel in kernels:
        config = joint_attention.default_config(op, vendor, ARCH[vendor])
        blocks = {k: v for k, v in config.items() if k.startswith("BLOCK")}
        for head_dim, has_norm, dtype in ((32, True, "bf16"), (64, False, "fp16"), (64, True, "fp32")):
            meta = dict(GROUPS=4, GROUP_LEN=4, HEAD_DIM=head_dim, HAS_QK_NORM=has_norm, **blocks)
            compile_kernel(kernel, vendor, config, meta, dtype=dtype, absent=() if has_norm else norm_ptrs)


def flow_step_kernels(vendor):
    config = flow_step.default_config("flow_step", vendor, ARCH[vendor])
    compile_kernel(flow_step._flow_step_fwd_kernel, vendor, config, dict(GUIDED=True, BLOCK=config["BLOCK"]))
    compile_kernel(flow_step._flow_step_bwd_kernel, vendor, config,
                   dict(GUIDED=True, NEED_GRAD_X=True, NEED_GRAD_V=True, BLOCK=config["BLOCK"]))


if __name__ == "__main__":
    for target_vendor in TARGETS:
        modulated_norm_kernels(target_vendor)
        joint_attention_kernels(target_vendor)
        flow_step_kernels(target_vendor)
    sys.exit(0)
