"""Fused gated residual + norm + modulation: eager vs torch.compile vs the Triton kernel.

Sites at the real width D = 768 (``pytest bench --benchmark-only``):

- ``nitro-e-norm2``: x + gate_msa * attn, LayerNorm (no affine), AdaLN-affine shift/scale.
- ``backbone-norm2``: x + attn, LayerNorm (no affine) (Nitro-AR ``gan`` backbone).
- ``mlp-head-resblock``: x + gate * h, LayerNorm (affine), per-token shift/scale/gate chunks.

Rows on a GPU: the CFG batch 2 x (256 image + 128 text) tokens, the middle stage 2 x 80, and
head rows 2 x 256. On the CPU (no Triton kernel there) a reduced size compares eager, the
package's torch backend and torch.compile. ``extra_info`` records the ideal bytes moved, the
achieved GB/s, the device and, where its peak is known, the fraction of peak bandwidth.
"""
import functools

import pytest
import torch
from torch import nn

from benchutil import ON_GPU, measure, record_rate, synchronized
from nitro_ar import layers
from nitro_ar.kernels.modulated_norm import AdaLNAffine, modulated_norm

DIM = 768
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# (batch, tokens); the MLP head works on (N, W) rows.
SIZES = {"cfg-2x384": (2, 384), "middle-2x80": (2, 80), "head-2x256": (1, 512)} if ON_GPU else {"cpu-2x64": (2, 64)}
SITE_SIZES = {
    "nitro-e-norm2": ["cfg-2x384", "middle-2x80"] if ON_GPU else ["cpu-2x64"],
    "backbone-norm2": ["cfg-2x384", "middle-2x80"] if ON_GPU else ["cpu-2x64"],
    "mlp-head-resblock": ["head-2x256"] if ON_GPU else ["cpu-2x64"],
}
IMPLEMENTATIONS = ["eager", "compile", "triton"] if ON_GPU else ["eager", "torch-backend", "compile"]
# Ideal traffic in (rows, D) tensors: forward reads + writes, backward reads + writes on top.
TENSORS_MOVED = {
    "nitro-e-norm2": {"forward": 4, "backward": 6},  # x, attn -> x_new, out | dout, dx_new, x_new, attn -> dx, dattn
    "backbone-norm2": {"forward": 4, "backward": 4},  # x, attn -> x_new, out | dout, dx_new, x_new -> dx (= dattn)
    "mlp-head-resblock": {"forward": 7, "backward": 11},  # + shift, scale, gate in; their grads out
}


# --- eager sites, written as the reference models write them -------------------------------
def nitro_e_norm2(x, attn, temb, ada_bias, ada_scale, norm2):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = layers.adaln_affine(
        temb, ada_bias, ada_scale).unbind(1)
    return layers.gated_residual_norm_modulate(x, attn, gate_msa[:, None], norm2, shift_mlp[:, None],
                                               scale_mlp[:, None])


def backbone_norm2(x, attn, norm2):
    return layers.gated_residual_norm_modulate(x, attn, None, norm2, None, None)


def mlp_head_resblock(x, h, ada, norm):
    shift, scale, gate = ada.chunk(3, dim=-1)
    return layers.gated_residual_norm_modulate(x, h, gate, norm, shift, scale)


EAGER = {"nitro-e-norm2": nitro_e_norm2, "backbone-norm2": backbone_norm2, "mlp-head-resblock": mlp_head_resblock}


@functools.lru_cache(maxsize=None)
def compiled(site):
    """One torch.compile wrapper per site (forward and forward+backward compile separate graphs)."""
    return torch.compile(EAGER[site])


def fused(backend, site, *args):
    """The same site through :func:`modulated_norm` with ``backend``."""
    if site == "nitro-e-norm2":
        x, attn, temb, ada_bias, ada_scale, norm2 = args
        return modulated_norm(x, norm="layer", eps=norm2.eps, residual=attn, backend=backend,
                              adaln=AdaLNAffine(temb, ada_bias, ada_scale, shift_chunk=3, scale_chunk=4, gate_chunk=2))
    if site == "backbone-norm2":
        x, attn, norm2 = args
        return modulated_norm(x, norm="layer", eps=norm2.eps, residual=attn, backend=backend)
    x, h, ada, norm = args
    shift, scale, gate = ada.chunk(3, dim=-1)
    return modulated_norm(x, norm="layer", eps=norm.eps, weight=norm.weight, bias=norm.bias, shift=shift,
                          scale=scale, residual=h, gate=gate, backend=backend)


def implementation(name, site):
    if name == "eager":
        return EAGER[site]
    if name == "compile":
        return compiled(site)
    return functools.partial(fused, "torch" if name == "torch-backend" else "triton", site)


def site_inputs(site, size, device, requires_grad):
    """Arguments of the eager site function; the last is the norm module."""
    batch, tokens = size

    def activation(*shape):
        return torch.randn(*shape, device=device, dtype=DTYPE, requires_grad=requires_grad)

    rows = (batch, tokens, DIM) if site != "mlp-head-resblock" else (batch * tokens, DIM)
    if site == "nitro-e-norm2":
        params = [(torch.randn(6, DIM, device=device, dtype=DTYPE) * 0.1).requires_grad_(requires_grad)
                  for _ in range(2)]
        norm = nn.LayerNorm(DIM, eps=1e-6, elementwise_affine=False)
        return [activation(*rows), activation(*rows), activation(batch, 6 * DIM), *params, norm]
    if site == "backbone-norm2":
        return [activation(*rows), activation(*rows), nn.LayerNorm(DIM, eps=1e-6, elementwise_affine=False)]
    norm = nn.LayerNorm(DIM, eps=1e-6).to(device=device, dtype=DTYPE)
    norm.requires_grad_(requires_grad)
    return [activation(*rows), activation(*rows), activation(batch * tokens, 3 * DIM), norm]


def record_bandwidth(benchmark, site, size, passes, device):
    batch, tokens = size
    moved = sum(TENSORS_MOVED[site][p] for p in passes) * batch * tokens * DIM * DTYPE.itemsize
    record_rate(benchmark, device, bytes_moved=moved)



CASES = [(site, size) for site, sizes in SITE_SIZES.items() for size in sizes]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("site,size", CASES, ids=[f"{site}-{size}" for site, size in CASES])
def test_forward(benchmark, device, site, size, impl):
    benchmark.group = f"modulated_norm forward {site} {size}"
    fn = implementation(impl, site)
    args = site_inputs(site, SIZES[size], device, requires_grad=False)

    def run():
        with torch.no_grad():
            return fn(*args)

    run()  # compile / warm up outside the timed rounds
    measure(benchmark, synchronized(run, device), cpu_rounds=10)
    record_bandwidth(benchmark, site, SIZES[size], ["forward"], device)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("site,size", CASES, ids=[f"{site}-{size}" for site, size in CASES])
def test_forward_backward(benchmark, device, site, size, impl):
    benchmark.group = f"modulated_norm forward+backward {site} {size}"
    fn = implementation(impl, site)
    args = site_inputs(site, SIZES[size], device, requires_grad=True)
    leaves = [arg for arg in args if isinstance(arg, torch.Tensor)]
    leaves += [param for arg in args if isinstance(arg, nn.Module) for param in arg.parameters() if param.requires_grad]
    upstream = None

    def run():
        nonlocal upstream
        outputs = fn(*args)
        if upstream is None:
            upstream = [torch.randn_like(out) for out in outputs]
        return torch.autograd.grad(outputs, leaves, upstream)

    run()
    measure(benchmark, synchronized(run, device), cpu_rounds=10)
    record_bandwidth(benchmark, site, SIZES[size], ["forward", "backward"], device)
