"""Counting what a call costs without timing it: kernel launches and host synchronisations.

At batch 1 a Nitro-AR image is bound by how many kernels it launches, so the count is a figure
of its own (tests assert the targets, the benchmarks record them):

- :func:`count_launches`: the launches of one call on a real device: on a GPU the device
  kernels, copies and memsets the profiler records; on CPU the aten ops that compute plus
  every Triton interpreter launch.
- :func:`count_work`: (kernels, host syncs) of one call on the ``meta`` device, where nothing
  computes: full-size models count in seconds on CPU. Triton launches are counted and not run;
  the kernel modules see meta tensors as the device the backend asked for.

A kernel is an aten op that computes (views, allocations and host scalar reads excluded; each
would be one GPU kernel) or a Triton launch.
"""
from __future__ import annotations

import importlib
import os
from contextlib import ExitStack
from typing import Callable, Optional, Tuple
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from ..kernels.backend import interpreter_requested, triton_available

__all__ = ["count_launches", "count_work", "work_per_image", "IMPLEMENTATIONS", "KERNEL_MODULES"]

# Kernel modules whose backend choice is redirected for meta tensors (count_work).
KERNEL_MODULES = ("flow_step", "joint_attention", "modulated_norm", "fused_linear")
_ALLOCATIONS = {
    torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
    torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default, torch.ops.aten._unsafe_view.default,
}


class _AtenKernels(TorchDispatchMode):
    """Counts aten ops that compute; with ``device_type``, only those with an output there (a
    CPU generator's draws for a meta model are host work, not kernels)."""

    def __init__(self, device_type: Optional[str] = None):
        super().__init__()
        self.device_type, self.launches = device_type, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func not in _ALLOCATIONS and (self.device_type is None or any(
                isinstance(t, torch.Tensor) and t.device.type == self.device_type for t in tree_flatten(out)[0])):
            self.launches += 1
        return out


def _count_device_kernels(fn: Callable[[], object], device: torch.device) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Kernel launches of one call of ``fn`` whose work runs on ``device``.

    On a GPU (CUDA or ROCm): the device kernels, copies and memsets the profiler records. On
    CPU: the aten ops that compute plus every Triton interpreter launch (the aten ops the
    interpreter runs to stage a launch's arguments are not counted).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _count_device_kernels(fn, device)
    counter = _AtenKernels()
    if not (triton_available() and interpreter_requested()):
        with counter:
            fn()
        return counter.launches
    from triton.runtime.interpreter import InterpretedFunction

    launch = InterpretedFunction.run

    def counted_launch(kernel, *args, **kwargs):
        if not kwargs.get("warmup"):
            counter.launches += 1
        with _disable_current_modes():
            return launch(kernel, *args, **kwargs)

    with mock.patch.object(InterpretedFunction, "run", counted_launch), counter:
        fn()
    return counter.launches


def count_work(fn: Callable[[], object], device_type: str = "meta") -> Tuple[int, int]:
    """(kernels, host syncs) of one call of ``fn`` on ``device_type`` (normally ``"meta"``: the
    model and its inputs on the meta device, nothing computed).

    Kernels: aten ops that compute with an output on ``device_type``, plus Triton launches
    (counted, not run, on meta). Host syncs: ops the host must wait on
    (:class:`nitro_ar.fast.graphs.HostSyncs`) reading a tensor on ``device_type``.
    """
    from .graphs import HostSyncs

    counter = _AtenKernels(device_type)

    def launch(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            counter.launches += 1

    syncs = HostSyncs(device=device_type)
    with ExitStack() as stack:
        if device_type == "meta" and triton_available():
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction

            stack.enter_context(mock.patch.object(JITFunction, "run", launch))
            stack.enter_context(mock.patch.object(InterpretedFunction, "run", launch))
            for name in KERNEL_MODULES:
                module = importlib.import_module(f"nitro_ar.kernels.{name}")
                select = module.select_backend
                stack.enter_context(mock.patch.object(module, "select_backend", lambda device, requested=None, _s=select: (
                    requested if torch.device(device).type == "meta" and requested else _s(device, requested))))
        stack.enter_context(syncs)
        stack.enter_context(counter)
        fn()
    return counter.launches, syncs.syncs


# Paths counted by work_per_image: the eager reference, and the fast path with each GEMM path.
IMPLEMENTATIONS = ("eager", "fast-library", "fast-fused")


def work_per_image(family: str, impl: str, batch: int = 1) -> dict:
    """What one image costs with the released sampling settings at full size, counted on the
    meta device (nothing computed): ``{"kernels_per_image", "host_syncs_per_image",
    "kernels_per_step", "steps", "backend", "sampling"}``.

    Args:
        family: ``"gan"`` (20 AR x 3 head steps, CFG 4), ``"joint_gan"`` (global token + 1 x 6)
            or ``"nitro_e"`` (20 Euler steps, CFG 4.5).
        impl: ``"eager"`` (the reference), ``"fast-library"`` (:mod:`nitro_ar.fast` on the
            Triton backend with library GEMMs) or ``"fast-fused"`` (fused GEMMs).
        batch: images per call (kernels are divided by it).
    Steps are AR steps (Nitro-AR) or Euler steps (Nitro-E); ``kernels_per_step`` is per call.
    """
    from .. import NitroAR, NitroARConfig, NitroE, NitroEConfig
    from ..kernels.backend import ENV_GEMM
    from . import swap_classes

    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is not accepted: expected one of {', '.join(IMPLEMENTATIONS)}")
    with torch.device("meta"):
        if family == "nitro_e":
            config = NitroEConfig()
            model = NitroE(config).eval()
            sampling = dict(steps=config.steps, cfg=config.cfg)
        else:
            config = NitroARConfig.for_variant(family)
            model = NitroAR(config).eval()
            sampling = dict(ar_steps=config.ar_steps, head_steps=config.head_steps, cfg=config.cfg)
    backend = "reference"
    if impl != "eager":
        backend = "triton" if triton_available() else "torch"
        swap_classes(model, backend)  # accelerate() would pick torch for meta tensors
    text = torch.randn(batch, config.text_max_length, config.caption_channels, device="meta")

    def run():
        return model.generate(text, text, generator=torch.Generator().manual_seed(0))

    env = {ENV_GEMM: impl.split("-")[1]} if impl != "eager" else {}
    with mock.patch.dict(os.environ, env):
        kernels, syncs = count_work(run, "meta")
    steps = sampling["steps"] if family == "nitro_e" else sampling["ar_steps"]
    return dict(kernels_per_image=kernels / batch, host_syncs_per_image=syncs / batch, kernels_per_step=kernels / steps,
                steps=steps, backend=backend, sampling=sampling)
