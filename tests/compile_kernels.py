"""Compile every Triton kernel for an NVIDIA H100 (sm_90) and an AMD MI300X (gfx942) without a
GPU, through the real host launchers, and read each compiled kernel's static budget.

The interpreter does not catch what only the compilers reject (non-power-of-two aranges, shared
memory / LDS limits, backend-only options), nor register pressure. Here the full-size models
(Nitro-AR ``gan`` and ``joint_gan``, Nitro-E; bf16; batch 1 and 64, CFG doubling the rows) run
their accelerated forward passes (sampling), a training step (bf16 weights, and float32 weights
under bf16 autocast) and the adversarial fine-tuning's differentiated head sampler, forward and
backward, on fake tensors that claim to be on a GPU:

- torch side: ``FakeTensorMode`` tensors on ``cuda`` (shapes, strides and 16-byte alignment as
  at run time, no storage) and a stubbed ``torch.cuda`` reporting the target's name, arch and
  multiprocessor count, so backend choice, tuning lookup (defaults only: no tuned file matches
  the stub's device name) and grid sizing take their GPU paths;
- Triton side: a stubbed driver reporting the target, so ``kernel[grid](...)`` specialises on
  the actual arguments and compiles with Triton's own compilers (ptxas bundled with Triton;
  AMD's LLVM + ld.lld built into libtriton); its launcher records the launch instead of running
  it, and loading checks shared memory and threads per block as the real driver does;
- autograd: the backward passes run in a small Python engine (:func:`backward`; the C++ one
  needs a CUDA device), which calls each graph node's backward as the engine would, so the
  custom Functions' backward launchers run too.

Each compiled specialisation's registers, spills, shared memory / LDS and occupancy are read
from the compiler's output: ``cuobjdump -res-usage`` and ``ptxas -v`` for sm_90, the AMDGCN
metadata (``.vgpr_count``, ``.agpr_count``, ``.sgpr_count``, spill counts, LDS size) for gfx942.

    python -m tests.compile_kernels --target sm_90 --out report.json   # one target
    python -m tests.compile_kernels --write    # both targets -> bench/results/static-<target>.json

Runs in a process where Triton is imported with TRITON_INTERPRET unset (the test-suite starts
one per target: tests/conftest.py ``static_reports``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import types
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BATCHES = (1, 64)


@dataclass(frozen=True)
class Target:
    """One GPU the kernels are checked for, with the limits its budgets are compared against."""

    name: str  # "sm_90" | "gfx942"
    vendor: str  # "cuda" | "hip"
    device: str  # the stub's device name (matches no tuned-config file: defaults only)
    multiprocessors: int  # SMs / CUs (sizes the launchers' persistent grids)
    warp_size: int
    shared_per_block: int  # bytes of shared memory / LDS one block may use
    shared_per_multiprocessor: int
    registers_per_multiprocessor: int  # 32-bit registers (sm_90); VGPRs per SIMD lane (gfx942)
    max_registers_per_thread: int
    max_warps_per_multiprocessor: int  # warps per SM (sm_90); waves per SIMD (gfx942)
    max_blocks_per_multiprocessor: int


TARGETS = {
    "sm_90": Target("sm_90", "cuda", "static-check H100 sm_90", 132, 32, 227 * 1024, 228 * 1024, 65536, 255, 64, 32),
    "gfx942": Target("gfx942", "hip", "static-check MI300X gfx942", 304, 64, 64 * 1024, 64 * 1024, 512, 512, 8, 32),
}
HIP_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")


# --------------------------------------------------------------------------------------------
# Resource usage of one compiled kernel
# --------------------------------------------------------------------------------------------
def _nvidia_tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def ptxas_version() -> str:
    """Version line of the ptxas Triton uses for sm_90 (Triton picks ``ptxas`` below sm_100)."""
    out = subprocess.run([_nvidia_tool("ptxas"), "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


PTXAS_LOG = "static-check.ptxas-v.log"  # kept next to the kernel in Triton's cache


def _ptxas_log(kernel, captured: str = "") -> str:
    """``ptxas -v`` output for ``kernel``: ``captured`` when it holds Triton's own ptxas run for it
    (a fresh compile; see run_target), else the copy kept in Triton's cache with the kernel, else
    ptxas on Triton's PTX with the options of Triton's own call (a cache hit compiled elsewhere).
    """
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(kernel.hash)  # the directory Triton keeps this kernel in
    if f"entry function '{kernel.name}'" in captured:
        cache.put(captured, PTXAS_LOG, binary=False)
        return captured
    kept = cache.get_file(PTXAS_LOG)
    if kept:
        return Path(kept).read_text()
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
        arch = sm_arch_from_capability(kernel.metadata.target.arch)
        log = subprocess.run([_nvidia_tool("ptxas"), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={arch}", str(ptx), "-o", str(Path(tmp) / "v.o")],
                             capture_output=True, text=True, check=True).stderr
    cache.put(log, PTXAS_LOG, binary=False)
    return log


def sm90_usage(kernel, target: Target, ptxas_log: str = "") -> dict:
    """Registers, spills, shared memory and occupancy of a compiled sm_90 kernel.

    Registers / local memory from ``cuobjdump -res-usage`` of Triton's cubin; spill stores and
    loads from ``ptxas -v`` (:func:`_ptxas_log`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        res = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    log = _ptxas_log(kernel, ptxas_log)
    usage = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    stores = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(n) for n in re.findall(r"(\d+) bytes spill loads", log))
    registers = usage["reg"]
    shared = kernel.metadata.shared + usage.get("shared", 0)  # dynamic (Triton) + static
    warps = kernel.metadata.num_warps
    # Occupancy as the CUDA occupancy calculator: registers are allocated per warp in units of
    # 256, shared memory per block with 1 KiB reserved by the system.
    regs_per_warp = math.ceil(registers * target.warp_size / 256) * 256
    limits = {
        "warps": target.max_warps_per_multiprocessor // warps,
        "registers": target.registers_per_multiprocessor // (regs_per_warp * warps) if registers else 99,
        "shared": target.shared_per_multiprocessor // (shared + 1024),
        "blocks": target.max_blocks_per_multiprocessor,
    }
    blocks = min(limits.values())
    return {
        "registers": registers,
        "spill_stores": stores,
        "spill_loads": loads,
        "local_bytes": usage.get("local", 0),
        "stack_bytes": usage.get("stack", 0),
        "shared_bytes": shared,
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": round(blocks * warps / target.max_warps_per_multiprocessor, 4),
        "limited_by": sorted(k for k, v in limits.items() if v == blocks),
    }


def _amdgpu_metadata(amdgcn: str, key: str) -> int:
    found = re.findall(rf"^\s*(?:-\s*)?\.{re.escape(key)}:\s*(\d+)", amdgcn, flags=re.MULTILINE)
    if not found:
        raise ValueError(f"no .{key} in the AMDGCN metadata")
    return int(found[0])


def gfx942_usage(kernel, target: Target) -> dict:
    """VGPRs, AGPRs, SGPRs, spills, LDS and occupancy of a compiled gfx942 kernel, from the
    AMDGPU metadata of Triton's AMDGCN; occupancy (waves per SIMD) as the compiler computed it."""
    amdgcn = kernel.asm["amdgcn"]
    vgprs, agprs = _amdgpu_metadata(amdgcn, "vgpr_count"), _amdgpu_metadata(amdgcn, "agpr_count")
    occupancy = [int(n) for n in re.findall(r";\s*Occupancy:\s*(\d+)", amdgcn)]
    waves = occupancy[0] if occupancy else None
    return {
        "vgprs": vgprs,
        "agprs": agprs,
        "sgprs": _amdgpu_metadata(amdgcn, "sgpr_count"),
        "vgpr_spills": _amdgpu_metadata(amdgcn, "vgpr_spill_count"),
        "sgpr_spills": _amdgpu_metadata(amdgcn, "sgpr_spill_count"),
        "scratch_bytes": _amdgpu_metadata(amdgcn, "private_segment_fixed_size"),
        "lds_bytes": max(kernel.metadata.shared, _amdgpu_metadata(amdgcn, "group_segment_fixed_size")),
        "waves_per_simd": waves,
        "occupancy": round(waves / target.max_warps_per_multiprocessor, 4) if waves else None,
    }


def usage(kernel, target: Target, ptxas_log: str = "") -> dict:
    return sm90_usage(kernel, target, ptxas_log) if target.vendor == "cuda" else gfx942_usage(kernel, target)


def spills(entry: dict) -> int:
    """Bytes (sm_90) or registers (gfx942) spilled by one compiled kernel; 0 is the budget."""
    keys = ("spill_stores", "spill_loads", "local_bytes", "vgpr_spills", "sgpr_spills", "scratch_bytes")
    return sum(entry.get(key, 0) for key in keys)


def shared_bytes(entry: dict) -> int:
    return entry["shared_bytes"] if "shared_bytes" in entry else entry["lds_bytes"]


# --------------------------------------------------------------------------------------------
# Stubbed torch.cuda and Triton driver
# --------------------------------------------------------------------------------------------
class Recorder:
    """Compiled kernels (one entry per specialisation) and the launches of each, per model site."""

    def __init__(self, target: Target):
        self.target = target
        self.site = "setup"
        self.entries: Dict[str, dict] = {}  # kernel hash -> entry
        self.errors: List[dict] = []

    def compiled(self, kernel, ptxas_log: str = "") -> None:
        if kernel.hash in self.entries:
            return
        meta = kernel.metadata
        fn = kernel.src.fn
        names = fn.arg_names
        constexprs = {names[path[0]]: _jsonable(value) for path, value in kernel.src.constants.items()
                      if len(path) == 1 and names[path[0]] in _constexpr_params(fn)}
        # The run-time specialisation of the other arguments (16-byte alignment / divisibility
        # of pointers and integers, 32-bit pointer ranges on AMD).
        specialised = {names[path[0]]: sorted(f"{attr}={value}" for attr, value in attrs)
                       for path, attrs in kernel.src.attrs.items() if len(path) == 1 and attrs}
        entry = {
            "kernel": fn.__name__,
            "module": fn.module,
            "constexprs": constexprs,
            "specialised": specialised,
            "num_warps": meta.num_warps,
            "num_stages": meta.num_stages,
            **{key: getattr(meta, key) for key in HIP_OPTIONS if hasattr(meta, key)},
            "sites": [],
            "grids": [],
            **usage(kernel, self.target, ptxas_log),
        }
        self.entries[kernel.hash] = entry

    def launched(self, kernel_hash: str, grid) -> None:
        entry = self.entries[kernel_hash]
        if self.site not in entry["sites"]:
            entry["sites"].append(self.site)
        if list(grid) not in entry["grids"]:
            entry["grids"].append(list(grid))


def _constexpr_params(fn) -> set:
    return {p.name for p in fn.params if p.is_constexpr}


def _jsonable(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


class _StubUtils:
    def __init__(self, target: Target):
        self.target = target

    def get_device_properties(self, device):
        return {"max_shared_mem": self.target.shared_per_block, "multiprocessor_count": self.target.multiprocessors,
                "warpSize": self.target.warp_size}

    def load_binary(self, name, binary, shared, device):
        # (module, function, registers, spills, max threads per block); budgets are read from the
        # compiler's output instead (Recorder.compiled).
        return None, None, 0, 0, 1024

    def unload_module(self, module):
        pass


class StubDriver:
    """The parts of a Triton GPU driver a JIT launch touches: it reports ``target`` and records
    launches instead of running them."""

    def __init__(self, target: Target, recorder: Recorder):
        from triton.backends.compiler import GPUTarget

        self.target = (GPUTarget("cuda", 90, 32) if target.vendor == "cuda"
                       else GPUTarget("hip", target.name, target.warp_size))
        self.recorder = recorder
        self.utils = _StubUtils(target)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cuda", 0)

    def launcher_cls(self, src, metadata):
        recorder = self.recorder

        def launch(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, *rest):
            recorder.launched(launch.kernel_hash, (grid_0, grid_1, grid_2))

        launch.kernel_hash = metadata.hash
        return launch


@contextlib.contextmanager
def fake_gpu(target: Target):
    """torch.cuda (and torch.version.hip) report ``target``: backend choice, device info and the
    launchers' multiprocessor counts take their GPU paths, on fake tensors.

    ``torch.cuda.is_available`` stays False: fake tensors then never ask a CUDA runtime for
    streams (autograd does, when it believes a GPU is there)."""
    import torch

    props = types.SimpleNamespace(
        name=target.device, major=9 if target.vendor == "cuda" else 9, minor=0 if target.vendor == "cuda" else 4,
        gcnArchName=f"{target.name}:sramecc+:xnack-", multi_processor_count=target.multiprocessors,
        total_memory=192 << 30, warp_size=target.warp_size,
    )
    patches = {
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "get_device_properties"): lambda device=None: props,
        (torch.cuda, "synchronize"): lambda device=None: None,
        (torch.version, "hip"): "6.4.0" if target.vendor == "hip" else None,
    }
    saved = {key: getattr(*key) for key in patches}
    for (owner, name), value in patches.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


# --------------------------------------------------------------------------------------------
# Backward pass without the autograd engine
# --------------------------------------------------------------------------------------------
# ``loss.backward()`` cannot run here: the C++ engine asks the CUDA runtime about the tensors'
# device (``hasPrimaryContext``, for its per-device streams and threads) before it runs any node,
# and there is no CUDA device. It is a scheduler, though: each node's backward formula runs in
# the node itself. :func:`backward` walks the graph from the loss in Python and calls every node
# as the engine would (same inputs, dtypes and shapes), so the custom Functions' ``backward``
# launches the backward kernels through their real launchers. (Patching the engine is not
# possible from Python; ``torch.func.vjp`` and AOTAutograd trace through the same engine, and the
# latter would not run the launchers at all.)
@contextlib.contextmanager
def python_autograd():
    """Record what :func:`backward` needs of the custom Functions and their nodes do not expose
    to Python: which forward arguments were tensors (the backward returns one gradient per
    argument; ``next_functions`` has one edge per tensor), which outputs were tensors, and
    ``set_materialize_grads``."""
    import torch
    from torch.autograd.function import Function, FunctionCtx

    apply, set_materialize = Function.__dict__["apply"], FunctionCtx.set_materialize_grads

    def recording_apply(cls, *args, **kwargs):
        out = apply.__get__(None, cls)(*args, **kwargs)
        outputs = out if isinstance(out, tuple) else (out,)
        for tensor in outputs:
            node = getattr(tensor, "grad_fn", None)
            if node is not None and getattr(type(node), "_forward_cls", None) is cls:
                node._static_check_tensor_args = [isinstance(arg, torch.Tensor) for arg in args]
                node._static_check_tensor_outputs = [isinstance(output, torch.Tensor) for output in outputs]
                break
        return out

    def recording_set_materialize(self, value):
        set_materialize(self, value)
        self._static_check_materialize = bool(value)

    Function.apply = classmethod(recording_apply)
    FunctionCtx.set_materialize_grads = recording_set_materialize
    try:
        yield
    finally:
        Function.apply = apply
        FunctionCtx.set_materialize_grads = set_materialize


def _run_node(node, grads: list) -> tuple:
    """One node's backward on the gradients of its outputs (None: no gradient), as the engine
    calls it; returns one gradient per ``node.next_functions`` edge."""
    import torch
    from torch.autograd.function import BackwardCFunction

    if not isinstance(node, BackwardCFunction):  # a C++ node: undefined gradients are None
        out = node(*grads)
        return out if isinstance(out, tuple) else (out,)
    # A custom Function (the C++ PyNode's part done here): missing gradients of tensor outputs
    # become zeros unless the Function asked otherwise, and its per-argument result keeps the
    # tensor arguments' gradients.
    if not hasattr(node, "_static_check_tensor_args"):
        raise RuntimeError(f"{type(node).__name__}: its forward ran outside python_autograd()")
    if getattr(node, "_static_check_materialize", True):
        grads = [torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device) if grad is None and is_tensor else grad
                 for grad, meta, is_tensor in zip(grads, node._input_metadata, node._static_check_tensor_outputs)]
    out = node.apply(*grads)
    out = out if isinstance(out, tuple) else (out,)
    return tuple(grad for grad, is_tensor in zip(out, node._static_check_tensor_args) if is_tensor)


def backward(loss, leaf_grads: bool = False) -> Optional[dict]:
    """``loss.backward()`` for the kernels' sake: every node between the loss and the leaves runs
    once, in topological order, on the summed gradients of its outputs, each cast and reduced to
    the dtype and shape its node recorded (the engine's ``validate_outputs``). Leaves' ``.grad``
    is left alone; with ``leaf_grads``, returns {id(leaf): gradient} (for the tests)."""
    import torch

    def edges(node):
        return [(child, nr) for child, nr in node.next_functions
                if child is not None and type(child).__name__ != "AccumulateGrad"]

    root = loss.grad_fn
    pending, stack = {root: 0}, [root]
    while stack:  # consumers of each node, one per edge
        for child, _ in edges(stack.pop()):
            if child not in pending:
                pending[child] = 0
                stack.append(child)
            pending[child] += 1
    buffers = {root: [torch.ones_like(loss, memory_format=torch.preserve_format)]}
    leaves, ready = {}, [root]
    with torch.no_grad():
        while ready:
            node = ready.pop()
            grads = _run_node(node, buffers.pop(node))
            for (child, nr), grad in zip(node.next_functions, grads):
                if child is None:
                    continue
                leaf = type(child).__name__ == "AccumulateGrad"
                if leaf and not leaf_grads:
                    continue
                if grad is not None:
                    meta = child._input_metadata[nr]
                    grad = grad if grad.dtype == meta.dtype else grad.to(meta.dtype)
                    grad = grad if list(grad.shape) == list(meta.shape) else grad.sum_to_size(meta.shape)
                if leaf:
                    if grad is not None:
                        key = id(child.variable)
                        leaves[key] = grad if key not in leaves else leaves[key] + grad
                    continue
                slots = buffers.setdefault(child, [None] * len(child._input_metadata))
                if grad is not None:
                    slots[nr] = grad if slots[nr] is None else slots[nr] + grad
                pending[child] -= 1
                if not pending[child]:
                    ready.append(child)
    return leaves if leaf_grads else None


# --------------------------------------------------------------------------------------------
# Full-size workloads
# --------------------------------------------------------------------------------------------
def model_configs() -> Dict[str, Callable]:
    from nitro_ar import NitroAR, NitroARConfig, NitroE, NitroEConfig

    return {
        "gan": lambda: NitroAR(NitroARConfig.for_variant("gan")),
        "joint_gan": lambda: NitroAR(NitroARConfig.for_variant("joint_gan")),
        "nitro_e": lambda: NitroE(NitroEConfig()),
    }


def on_fake_gpu(build: Callable, dtype):
    """``build()`` on the meta device (nothing initialised), its parameters and buffers then
    replaced by fake GPU tensors of ``dtype`` (random init or ``.to("cuda")`` would start the
    CUDA runtime; ``Module.to`` cannot swap fake parameters)."""
    import torch
    from torch import nn

    with torch.device("meta"):
        model = build()
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(torch.empty(param.shape, device="cuda", dtype=dtype),
                                                        requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                kind = dtype if buffer.is_floating_point() else buffer.dtype
                module._buffers[name] = torch.empty(buffer.shape, device="cuda", dtype=kind)
    return model


def _head_rows_per_step(config) -> List[int]:
    """Tokens per image that the gan head samples at each AR step of the default schedule."""
    from nitro_ar.schedules import mar_mask_len

    seq, masked, rows = config.num_tokens, config.num_tokens, []
    for step in range(config.ar_steps):
        left = mar_mask_len(step, config.ar_steps, seq, masked)
        rows.append(masked if step == config.ar_steps - 1 else masked - left)
        masked = left
    return rows


def sample_sites(name: str, model, batch: int):
    """(site, thunk) pairs of one guided sampling pass at ``batch`` images (2 x batch rows)."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from nitro_ar.heads import sample_head

    cfg, device, dtype = model.config, torch.device("cuda"), torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    text = randn(2 * batch, cfg.text_max_length, cfg.caption_channels)
    if name != "nitro_e":
        with unset_fake_temporarily():  # the schedule is host data (read with .item())
            schedule = model.head_schedule(cfg.head_steps)
    if name == "nitro_e":
        latents = randn(2 * batch, cfg.in_channels, cfg.grid_size, cfg.grid_size)
        yield "denoise", lambda: model(latents, text, torch.full((2 * batch,), 500.0, device=device))
        return
    tokens = randn(2 * batch, cfg.num_tokens, cfg.in_channels)
    chans, width = cfg.in_channels, cfg.inner_dim
    if name == "joint_gan":
        yield "global backbone", lambda: model.global_backbone(text)
        yield "global head", lambda: sample_head(model.global_net, randn(2 * batch, 1, width), randn(batch, 1, chans),
                                                 schedule, cfg.cfg)
        yield "backbone", lambda: model.backbone(tokens, text)
        yield "head", lambda: sample_head(model.diffloss.net, randn(2 * batch, cfg.num_tokens, width),
                                          randn(batch, cfg.num_tokens, chans), schedule, cfg.cfg)
        return
    yield "backbone", lambda: model.backbone(tokens, text)
    for rows in sorted(set(_head_rows_per_step(cfg))):
        yield f"head {rows} tokens/image", lambda rows=rows: sample_head(
            model.diffloss.net, randn(2 * batch * rows, width), randn(batch * rows, chans), schedule, cfg.cfg)


def gpu_autocast():
    """``torch.autocast("cuda", bfloat16)``, as Accelerate's bf16 training runs; autocast checks
    ``torch.cuda.is_available()`` once, when constructed (see :func:`fake_gpu`)."""
    import torch

    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    finally:
        torch.cuda.is_available = available


def train_sites(name: str, model, batch: int):
    """(site, thunk) pairs of one training step (forward + backward) at ``batch`` images, in the
    weights' dtype; with float32 weights under bf16 autocast, as Accelerate's bf16 training."""
    import torch

    cfg, device = model.config, torch.device("cuda")
    dtype = next(model.parameters()).dtype
    autocast = gpu_autocast if dtype == torch.float32 else contextlib.nullcontext

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    def step():
        text = randn(batch, cfg.text_max_length, cfg.caption_channels)
        with autocast():
            if name == "nitro_e":
                loss = model(randn(batch, cfg.in_channels, cfg.grid_size, cfg.grid_size), text,
                             torch.full((batch,), 500.0, device=device)).float().sum()
            else:
                z = model.backbone(randn(batch, cfg.num_tokens, cfg.in_channels), text)
                if name == "gan":  # every token, twice (diffusion_batch_mul 2)
                    rows = z.reshape(-1, z.shape[-1]).repeat(2, 1)
                    v = model.head(randn(rows.shape[0], cfg.in_channels), torch.full((rows.shape[0],), 500.0,
                                                                                         device=device), rows)
                    loss = v.float().sum()
                else:
                    v = model.head(randn(batch, cfg.num_tokens, cfg.in_channels),
                                   torch.full((batch,), 500.0, device=device), z)
                    zg = model.global_backbone(text)
                    vg = model.global_head(randn(batch, 1, cfg.in_channels), torch.full((batch,), 500.0,
                                                                                          device=device), zg)
                    loss = v.float().sum() + vg.float().sum()
        backward(loss)

    yield "train step", step
    if name == "nitro_e":
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # host data, as in sample_sites
        schedule = model.head_schedule(cfg.head_steps)

    def adversarial():
        # Adversarial head fine-tuning (objectives.HeadGenerator): frozen backbone, then the head's
        # few-step sampler (unguided) differentiated end to end: the fused Euler step's backward.
        text = randn(batch, cfg.text_max_length, cfg.caption_channels)
        with autocast():
            with torch.no_grad():
                z = model.backbone(randn(batch, cfg.num_tokens, cfg.in_channels), text)
            if name == "gan":  # every token masked (the most rows a step samples)
                z = z.reshape(-1, z.shape[-1])
            sampled = model.diffloss.net.sample(z, randn(*z.shape[:-1], cfg.in_channels), schedule, 1.0)
        backward(sampled.float().sum())

    yield "head sample (adversarial)", adversarial


def defined_kernels() -> List[str]:
    """Every ``@triton.jit`` function of the modules of ``nitro_ar.kernels`` that no other one
    calls: the kernels the launchers launch (the others are device functions inlined into them)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import nitro_ar.kernels as package

    functions = {}
    for module_name in sorted(info.name for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}.")):
        module = importlib.import_module(module_name)
        functions.update({f"{module_name}.{name}": obj for name, obj in vars(module).items()
                          if isinstance(obj, JITFunction) and obj.module == module_name})
    called = {name for name, fn in functions.items() for other in functions.values()
              if other is not fn and re.search(rf"\b{re.escape(fn.__name__)}\(", other.src)}
    return sorted(name for name in functions if name not in called)


def summarize(entries: List[dict]) -> Dict[str, dict]:
    """Per kernel, over its specialisations: the largest registers / spills / shared memory and
    the lowest occupancy (the figures of its worst case)."""
    summary: Dict[str, dict] = {}
    for entry in entries:
        row = summary.setdefault(entry["kernel"], {"specialisations": 0, "spills": 0, "shared_bytes": 0,
                                                   "occupancy": 1.0})
        row["specialisations"] += 1
        for key in ("registers", "vgprs", "agprs", "sgprs"):
            if key in entry:
                row[key] = max(row.get(key, 0), entry[key])
        row["spills"] = max(row["spills"], spills(entry))
        row["shared_bytes"] = max(row["shared_bytes"], shared_bytes(entry))
        row["occupancy"] = min(row["occupancy"], entry["occupancy"] or 0.0)
    return summary


# (mode, weight dtype, sites): guided sampling, a bf16 training step, and a training step of
# float32 weights under bf16 autocast.
MODES = (("sample", "bfloat16", sample_sites), ("train", "bfloat16", train_sites),
         ("train-autocast", "float32", train_sites))


def run_target(target: Target) -> dict:
    """Compile every kernel the full-size workloads launch, for ``target``; the report."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton import knobs
    from triton.runtime.driver import driver

    import nitro_ar.fast as fast

    recorder = Recorder(target)
    # Triton runs ptxas with -v; with dump_ptxas_log it prints that log (stdout, captured from
    # each compile's start to its end) and the kernel's entry reads its spills from it, with no
    # second ptxas run (see _ptxas_log).
    ptxas_log = io.StringIO()

    def pre_compile(**_):
        ptxas_log.seek(0)
        ptxas_log.truncate()
        return False  # compile

    def post_compile(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        caches = fn.jit_function.device_caches[compile["device"]]
        recorder.compiled(caches[0][key], ptxas_log.getvalue())

    knobs.runtime.jit_cache_hook = pre_compile
    knobs.runtime.jit_post_compile_hook = post_compile
    knobs.nvidia.dump_ptxas_log = target.vendor == "cuda"
    driver.set_active(StubDriver(target, recorder))
    started = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(ptxas_log), fake_gpu(target), python_autograd(), \
            FakeTensorMode(allow_non_fake_inputs=True):
        # FakeTensor.data_ptr is what Triton's specialisation reads: 16-byte alignment as at run time.
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        warnings.filterwarnings("ignore", message="nitro_ar: no tuned kernel configs")  # defaults are the subject
        for name, build in model_configs().items():
            for mode, dtype, sites in MODES:
                model = on_fake_gpu(build, getattr(torch, dtype))
                fast.accelerate(model, backend="triton", graphs=False)
                for batch in BATCHES:
                    for site, thunk in sites(name, model, batch):
                        recorder.site = f"{name} {mode} b{batch}: {site}"
                        try:
                            with torch.no_grad() if mode == "sample" else contextlib.nullcontext():
                                thunk()
                        except Exception as err:  # reported (and failed) by the tests, per site
                            recorder.errors.append({"site": recorder.site, "error": f"{type(err).__name__}: {err}"})
                del model
    import triton

    entries = sorted(recorder.entries.values(), key=lambda e: (e["module"], e["kernel"], json.dumps(e["constexprs"],
                                                                                                    sort_keys=True)))
    return {
        "target": target.name,
        "limits": asdict(target),
        "toolchain": {"triton": triton.__version__, "torch": torch.__version__,
                      **({"ptxas": ptxas_version()} if target.vendor == "cuda" else {})},
        "workloads": {"models": list(model_configs()), "batches": list(BATCHES), "dtype": "bfloat16",
                      "sampling": "guided (CFG: 2 x batch rows)",
                      "training": "bf16 weights, and float32 weights under bf16 autocast; batch rows; a training "
                                  "step and (Nitro-AR) the adversarial fine-tuning's head sampler, forward and backward"},
        "compile_seconds": round(time.perf_counter() - started, 1),
        "errors": recorder.errors,
        "defined_kernels": defined_kernels(),
        "summary": summarize(entries),
        "kernels": entries,
    }


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def run_targets(out_dir: Path, targets=tuple(TARGETS), timeout: float = 1800) -> Dict[str, dict]:
    """Run one process per target (in parallel; the compilers are single-threaded) and return
    {target: report}. Usable from a process whose Triton runs in interpreter mode."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "tests.compile_kernels", "--target", name, "--out",
                                     str(out_dir / f"static-{name}.json")], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in targets}
    reports = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"static check for {name} failed (exit {proc.returncode}):\n{output[-6000:]}")
        reports[name] = json.loads((out_dir / f"static-{name}.json").read_text())
    return reports


def _write_json(path: Path, document: dict) -> None:
    """Atomic write (temp file + fsync + rename + fsync dir), keeping the user's umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.compile_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), help="compile for one target (this process)")
    parser.add_argument("--out", type=Path, help="with --target: where the JSON report goes (default: stdout)")
    parser.add_argument("--write", action="store_true",
                        help=f"both targets, in parallel: regenerate {RESULTS.relative_to(ROOT)}/static-<target>.json")
    args = parser.parse_args(argv)
    if args.write == bool(args.target):
        parser.error("give exactly one of --target or --write")
    if args.write:
        with tempfile.TemporaryDirectory() as tmp:
            reports = run_targets(Path(tmp))
        for name, report in reports.items():
            _write_json(RESULTS / f"static-{name}.json", report)
            print(f"{name}: {len(report['kernels'])} kernels, {len(report['errors'])} errors, "
                  f"{report['compile_seconds']} s -> {RESULTS / f'static-{name}.json'}")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("compiling needs TRITON_INTERPRET unset (it was set before Triton was imported)")
    report = run_target(TARGETS[args.target])
    if args.out:
        _write_json(args.out, report)
    else:
        json.dump(report, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
