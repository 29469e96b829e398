"""What the tuner times: the problem shapes of each kernel op, random inputs of one shape, and
the benchmark of one config, registered with :mod:`nitro_ar.kernels.tuning` at import.

Kept out of the kernel files (which hold kernels, launchers, autograd, validation and the
public function). Importing this module imports the kernel modules, hence Triton; a kernel
module that does not import leaves the others tunable.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable, Dict, List

import torch

from .reference import AdaLNAffine
from .tuning import register_kernel_ops

__all__ = [
    "modulated_norm_shapes",
    "modulated_norm_problem",
    "joint_attention_shapes",
    "joint_attention_problem",
    "flow_step_shapes",
    "flow_step_problem",
    "fused_linear_shapes",
    "fused_linear_problem",
]

logger = logging.getLogger("nitro_ar")


def _check_shape_set(shape_set: str, accepted=("nitro-ar", "nitro-e", "all")) -> None:
    if shape_set not in accepted:
        raise ValueError(f"unknown shape set {shape_set!r}: expected one of {', '.join(accepted)}")


def _do_bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn)


# --------------------------------------------------------------------------------------------
# modulated_norm
# --------------------------------------------------------------------------------------------
def modulated_norm_shapes(shape_set: str) -> List[dict]:
    """Problem shapes of ``"nitro-ar"``, ``"nitro-e"`` or ``"all"`` (bf16, D = 768): the fused
    residual + norm sites of each model at inference (CFG batch 2) and training batch sizes."""
    _check_shape_set(shape_set)
    site = dict(dim=768, dtype="bfloat16")
    shapes = []
    if shape_set != "nitro-e":
        # Backbone x + attn -> norm2 (no affine) on image, text and middle-stage tokens.
        shapes += [dict(site, batch=batch, length=length, norm="layer", affine=False, modulation="none")
                   for batch in (2, 32) for length in (256, 128, 80)]
        # MLP head res block (per-token chunks of one projection) on inference and training rows;
        # transformer head RMSNorm with per-token modulation.
        shapes += [dict(site, batch=1, length=rows, norm="layer", affine=True, modulation="token")
                   for rows in (512, 8192)]
        shapes += [dict(site, batch=batch, length=256, norm="rms", affine=True, modulation="token")
                   for batch in (2, 32)]
    if shape_set != "nitro-ar":
        shapes += [dict(site, batch=batch, length=length, norm="layer", affine=False, modulation="adaln")
                   for batch in (2, 32) for length in (256, 128, 80)]
    return shapes


def modulated_norm_problem(shape: dict, device: torch.device):
    """Random inputs of one shape: (plan, canonical inputs), as ``modulated_norm`` builds them."""
    from . import modulated_norm as mn

    batch, length, dim = shape["batch"], shape["length"], shape["dim"]
    dtype = getattr(torch, shape["dtype"])

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    x, residual = randn(batch, length, dim), randn(batch, length, dim)
    weight = randn(dim) if shape["affine"] else None
    bias = randn(dim) if shape["affine"] and shape["norm"] == "layer" else None
    kwargs = dict(norm=shape["norm"], eps=1e-6, weight=weight, bias=bias, residual=residual)
    if shape["modulation"] == "token":
        # (shift, scale, gate) as chunks of one projection output, as the MLP head produces them
        kwargs["shift"], kwargs["scale"], kwargs["gate"] = randn(batch, length, 3 * dim).chunk(3, dim=-1)
    elif shape["modulation"] == "adaln":
        kwargs["adaln"] = AdaLNAffine(randn(batch, 6 * dim), randn(6, dim), randn(6, dim),
                                      shift_chunk=3, scale_chunk=4, gate_chunk=2)
    return mn._prepare(x, **kwargs)


def _bench_modulated_norm(shape: dict, config: dict, device: torch.device) -> float:
    from . import modulated_norm as mn

    plan, inputs = modulated_norm_problem(shape, device)
    return _do_bench(lambda: mn.modulated_norm_forward(plan, *inputs, store_stats=False, config=config))


def _bench_modulated_norm_backward(shape: dict, config: dict, device: torch.device) -> float:
    from . import modulated_norm as mn

    plan, inputs = modulated_norm_problem(shape, device)
    x_new, out, mean, rstd = mn.modulated_norm_forward(plan, *inputs, store_stats=True)
    grad_out = torch.randn_like(out)
    saved = mn._backward_inputs(inputs, x_new, mean, rstd)
    needs = tuple(tensor is not None for tensor in inputs)
    return _do_bench(lambda: mn.modulated_norm_backward(plan, grad_out, grad_out, *saved, needs=needs, config=config))


# --------------------------------------------------------------------------------------------
# joint_attention
# --------------------------------------------------------------------------------------------
def joint_attention_shapes(shape_set: str) -> List[dict]:
    """Problem shapes of ``"nitro-ar"`` (plain joint attention on 256 and 80 image tokens, and the
    transformer head's self-attention over 256 or 1 tokens) or ``"nitro-e"`` (every ASA pattern),
    at CFG batch 2 and training batch 64, bf16, 24 heads x 32 with fused q/k norm."""
    _check_shape_set(shape_set, ("nitro-ar", "nitro-e"))
    patterns = [(1, 1)] if shape_set == "nitro-ar" else [(1, 1), (4, 1), (4, 4)]
    shapes = [
        dict(batch=batch, heads=24, head_dim=32, len_img=len_img, len_txt=128, groups=groups, group_len=group_len,
             qk_norm=True, text_output=True, dtype="bfloat16")
        for batch in (2, 64) for len_img in (256, 80) for groups, group_len in patterns
    ]
    if shape_set == "nitro-ar":
        shapes += [
            dict(batch=batch, heads=12, head_dim=64, len_img=len_img, len_txt=0, groups=1, group_len=1,
                 qk_norm=False, text_output=False, dtype="bfloat16")
            for batch in (2, 64) for len_img in (256, 1)
        ]
    return shapes


def joint_attention_problem(shape: dict, device: torch.device):
    """(image q/k/v, text q/k/v or Nones, the four norm weights or None) of one shape."""
    dtype = getattr(torch, shape["dtype"])
    batch, heads, head_dim = shape["batch"], shape["heads"], shape["head_dim"]

    def stream(length):
        # One fused QKV projection per stream, as the model produces them.
        qkv = torch.randn(batch, length, 3, heads, head_dim, device=device, dtype=dtype)
        return qkv.unbind(2)

    img = stream(shape["len_img"])
    txt = stream(shape["len_txt"]) if shape["len_txt"] else (None, None, None)
    norms = [torch.rand(head_dim, device=device, dtype=dtype) + 0.5 for _ in range(4)] if shape["qk_norm"] else None
    return img, txt, norms


def _bench_joint_attention(shape: dict, config: dict, device: torch.device) -> float:
    from . import joint_attention as ja

    img, txt, norms = joint_attention_problem(shape, device)
    return _do_bench(lambda: ja.joint_attention_forward(
        *img, *txt, norms, shape["groups"], shape["group_len"], 1e-6, shape["text_output"], config=config))


def _bench_joint_attention_backward(shape: dict, config: dict, device: torch.device) -> float:
    from . import joint_attention as ja

    img, txt, norms = joint_attention_problem(shape, device)
    groups, group_len, text_output = shape["groups"], shape["group_len"], shape["text_output"]
    out_img, out_txt, lse_img, lse_txt = ja.joint_attention_forward(*img, *txt, norms, groups, group_len, 1e-6,
                                                                    text_output)
    grad_img = torch.randn_like(out_img)
    grad_txt = torch.randn_like(out_txt) if out_txt is not None else None
    return _do_bench(lambda: ja.joint_attention_backward(
        grad_img, grad_txt, *img, *txt, norms, out_img, out_txt, lse_img, lse_txt,
        groups, group_len, 1e-6, config=config))


# --------------------------------------------------------------------------------------------
# flow_step
# --------------------------------------------------------------------------------------------
def flow_step_shapes(shape_set: str) -> List[dict]:
    """Problem shapes of ``"nitro-ar"`` (MLP head rows per AR step, transformer head images;
    CFG on, bf16). Nitro-E samples without a head: ``"nitro-e"`` has none."""
    _check_shape_set(shape_set)
    if shape_set == "nitro-e":
        return []
    rows = [dict(rows=rows, tokens=1) for rows in (16, 64, 256)]
    images = [dict(rows=batch, tokens=256) for batch in (1, 4, 16)]
    return [dict(shape, channels=32, guided=True, dtype="bfloat16") for shape in rows + images]


def flow_step_problem(shape: dict, device: torch.device):
    """x, v and the (sigma, sigma_next) pair of one shape."""
    dtype = getattr(torch, shape["dtype"])
    x = torch.randn(shape["rows"], shape["tokens"], shape["channels"], device=device, dtype=dtype)
    v = torch.randn((2 if shape["guided"] else 1) * shape["rows"], shape["tokens"], shape["channels"],
                    device=device, dtype=dtype)
    sigmas = torch.tensor([0.667, 0.334], device=device)
    return x, v, sigmas[0], sigmas[1]


def _bench_flow_step(shape: dict, config: dict, device: torch.device) -> float:
    from . import flow_step as fs

    x, v, sigma, sigma_next = flow_step_problem(shape, device)
    return _do_bench(lambda: fs.flow_step_forward(x, v, sigma, sigma_next, 4.0, shape["guided"], config=config))


def _bench_flow_step_backward(shape: dict, config: dict, device: torch.device) -> float:
    from . import flow_step as fs

    x, v, sigma, sigma_next = flow_step_problem(shape, device)
    grad = torch.randn_like(x)
    return _do_bench(lambda: fs.flow_step_backward(
        grad, x.dtype, v.dtype, sigma, sigma_next, 4.0, shape["guided"], needs=(True, True), config=config))


# --------------------------------------------------------------------------------------------
# fused_linear
# --------------------------------------------------------------------------------------------
def fused_linear_shapes(shape_set: str) -> List[dict]:
    """The fused GEMM sites of each model when sampling (CFG: 2 x batch images), bf16, at batch 1
    and 32: backbone stages (grouped image + text rows), MLP-head steps (~13 tokens per image and
    AR step), transformer-head blocks (256 tokens per image), the heads' modulation GEMMs."""
    _check_shape_set(shape_set)
    shapes = []

    def add(rows, n, k, fusion):
        shapes.append(dict(rows=rows, n=n, k=k, fusion=fusion, dtype="bfloat16"))

    for batch in (1, 32):
        images = 2 * batch
        if shape_set != "nitro-e":
            for tokens in (256 + 128, 80 + 128):  # outer stages, middle stage (+ text)
                add(images * tokens, 2304, 768, "norm")
                add(images * tokens, 768, 768, "residual")
                add(images * tokens, 2304, 768, "norm-gelu_tanh")
                add(images * tokens, 768, 2304, "residual")
            head_rows = images * 13
            add(head_rows, 768, 768, "norm-silu")
            add(head_rows, 768, 768, "residual")
            add(head_rows // 2, 32, 768, "norm-flow")
            add(3 * head_rows, 19968, 768, "add_silu")
            add(images * 256, 2304, 768, "norm")
            add(images * 256, 768, 768, "residual")
            add(images * 256, 2048, 768, "norm-gelu_mul")
            add(images * 256, 768, 2048, "residual")
            add(batch * 256, 32, 768, "norm-flow")
            add(images * 256, 38400, 768, "add_silu")
        if shape_set != "nitro-ar":
            for tokens in (256 + 128, 80 + 128):
                add(images * tokens, 2304, 768, "norm")
                add(images * tokens, 768, 768, "residual")
                add(images * tokens, 2304, 768, "norm-gelu_tanh")
                add(images * tokens, 768, 2304, "residual")
    return shapes


def fused_linear_problem(shape: dict, device: torch.device):
    """(problem, activation, flow) of one shape: random bf16 inputs, per-token modulations."""
    from .fused_linear import AddSiLUPrologue, FlowEpilogue, LinearProblem, NormPrologue

    dtype = getattr(torch, shape["dtype"])
    rows, n, k = shape["rows"], shape["n"], shape["k"]
    parts = shape["fusion"].split("-")
    activation = next((part for part in parts if part in ("gelu_tanh", "silu", "gelu_mul")), None)
    groups = 2 if "flow" in parts else 1

    def randn(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    x = randn(groups, rows, k)
    prologue = residual = gate = flow = None
    if "norm" in parts:
        prologue = NormPrologue("layer", 1e-6, randn(k), randn(k), randn(groups, rows, k), randn(groups, rows, k))
    elif "add_silu" in parts:
        prologue = AddSiLUPrologue(randn(1, 1, k))
    if "residual" in parts:
        residual, gate = randn(groups, rows, n), randn(groups, rows, n)
    if "flow" in parts:
        sigmas = torch.tensor([0.667, 0.334], device=device)
        flow = FlowEpilogue(randn(rows, n), sigmas[0], sigmas[1], 4.0)
    weight = randn(2 * n if activation == "gelu_mul" else n, k)
    return LinearProblem(x, weight, randn(weight.shape[0]), prologue, residual, gate), activation, flow


def _bench_fused_linear(shape: dict, config: dict, device: torch.device) -> float:
    from . import fused_linear as fl

    problem, activation, flow = fused_linear_problem(shape, device)
    return _do_bench(lambda: fl.grouped_linear([problem], activation=activation, flow=flow, backend="triton",
                                               config=config))


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
# kernel module -> (shapes, {op name: bench})
PROBLEMS: Dict[str, tuple] = {
    "modulated_norm": (modulated_norm_shapes, {"modulated_norm": _bench_modulated_norm,
                                               "modulated_norm_backward": _bench_modulated_norm_backward}),
    "joint_attention": (joint_attention_shapes, {"joint_attention": _bench_joint_attention,
                                                 "joint_attention_backward": _bench_joint_attention_backward}),
    "flow_step": (flow_step_shapes, {"flow_step": _bench_flow_step, "flow_step_backward": _bench_flow_step_backward}),
    "fused_linear": (fused_linear_shapes, {"fused_linear": _bench_fused_linear}),
}


def _register_all() -> None:
    for module_name, (shapes, benches) in PROBLEMS.items():
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except Exception as err:  # a broken kernel module must not hide the others
            logger.warning("nitro_ar: kernel module %s did not import (%s); its ops are not tunable", module_name, err)
            continue
        register_kernel_ops(benches, module.candidate_configs, module.default_config, shapes, module.tuning_bucket)


_register_all()
