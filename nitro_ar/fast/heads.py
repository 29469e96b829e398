"""Accelerated flow-matching heads: fused drop-ins and a multi-step sampler per AR iteration.

Drop-ins (same parameters and state-dict keys as the reference classes they subclass):

- :class:`FastMLPHead` (``gan``) and :class:`FastTransformerHead` (``joint_gan``): the forward
  computes every block's modulation (and the final layer's) in one GEMM, and chains each
  block's gated residual into the next block's norm + modulation with the fused modulated-norm
  kernel (kernel 1), so x never makes a separate trip for ``x + gate * h`` or the norm.
- :class:`FastTransformerHeadBlock`: fused norms, one GEMM for SwiGLU's two input projections.
- :class:`FastHeadAttention`: q, k and v read in place from the qkv projection
  (B, L, 3, H, 64) by the fused attention kernel (kernel 4), whose (B, L, H, 64) output feeds
  the output projection as (B, L, H * 64) without a copy.

Both fast heads override the reference heads' ``sample(z, noise, schedule, cfg)`` (what
:func:`nitro_ar.heads.sample_head` and ``NitroAR.generate`` call) with a fused sampler
(kernel 3 and its joint equivalent):

- step-invariant work runs once per call (once per AR iteration): ``cond_embed(z)`` (and
  ``c_norm`` for the transformer head), the time embedding of every step of the schedule in
  one small GEMM chain over its timesteps (not per row), the SiLU of every step's condition,
  and the modulations of as many steps as fit a memory budget in one GEMM;
- CFG does not duplicate the noisy tokens: ``input_proj`` runs on the N shared rows and the
  unconditional and conditional rows read the same values (a stride-0 view) until the first
  gated residual makes them differ;
- the guidance combine and the Euler update are one fused epilogue
  (:mod:`nitro_ar.kernels.flow_step`) on the kernel backends;
- the schedule's own timesteps and sigmas, and no random numbers drawn (the noise is given), so
  the result equals the reference loop within rounding, for any step count and for DiSA (the
  schedule comes with each call).

Launches per AR iteration (kernel backends, counted by the tests with :func:`count_launches`):

- MLP head of depth D, S Euler steps: 15 once (``cond_embed``; the time embedding of the S
  timesteps, 8 of them small ops of ``timestep_embedding``; condition add and SiLU; one
  modulation GEMM for all steps) + ``4 D + 4`` per step (input_proj, first fused norm; per
  block Linear, SiLU, Linear, fused gated-residual norm; final Linear; fused guidance + Euler
  step). Released head (D = 8, S = 3): 123, against 348 for the reference loop.
- Transformer head: 26 once + ``9 D + 6`` per step (input_proj, position add, first fused
  norm; per block qkv GEMM, attention, proj, fused norm, SwiGLU input GEMM, GELU, mul, fc2,
  fused norm; final Linear; fused step; the step's modulation GEMM, one per step at
  2 x 256 tokens). Released head (D = 8, S = 6): 494, against 1812 for the reference loop.

Gradients: everything is differentiable (the kernel paths with backward, torch ops elsewhere),
so adversarial fine-tuning can back-propagate through ``sample``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ..heads import HeadAttention, MLPHead, TransformerHead, TransformerHeadBlock, check_head_inputs, embed_step_size
from ..kernels import reference
from ..kernels.backend import interpreter_requested, triton_available
from ..schedules import FlowSchedule
from . import ops
from .backbone import FusedLinear

__all__ = [
    "FastMLPHead",
    "FastTransformerHead",
    "FastTransformerHeadBlock",
    "FastHeadAttention",
    "FAST_HEAD_CLASSES",
    "MODULATION_BUDGET",
    "guided_flow_step",
    "count_launches",
]

# Largest modulation tensor (elements) computed in one GEMM: the MLP head's few dozen rows fit
# every step of a schedule (the modulation weights are then read once per AR iteration, not
# once per step); the transformer head's 2 x 256 tokens take one step per GEMM.
MODULATION_BUDGET = 1 << 24


def guided_flow_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cfg: float,
                     backend: str) -> torch.Tensor:
    """One Euler step of the head sampler with the guidance combine fused in.

    Args:
        x: (N, ...) state. v: (2N, ...) = [uncond; cond] when ``cfg != 1``, else (N, ...).
        sigma, sigma_next: 0-dim float32 tensors of the schedule, on v's device (the kernel
            reads them in place; nothing synchronises with the host, so graphs can capture it).
    Returns:
        ``euler_step(x, v_u + cfg (v_c - v_u), sigma, sigma_next)``: (N, ...) in v's dtype.
    """
    if backend in ops.KERNEL_BACKENDS:
        if x.dtype in ops.KERNEL_DTYPES and v.dtype in ops.KERNEL_DTYPES:
            from ..kernels.flow_step import flow_step

            return flow_step(x, v, sigma, sigma_next, cfg, backend=backend)
        ops.fallback_warning("flow_step", f"dtype {v.dtype}")
    return reference.flow_step(x, v, sigma, sigma_next, cfg)


class _FastFlowHead:
    """The multi-step sampler shared by the fast heads, and their fast-path bookkeeping.

    A head supplies ``_modulated_linears()`` (every Linear applied to SiLU(condition), in the
    order its ``_velocity`` splits the fused output), ``_embed_input``, ``_step_conditions`` and
    ``_velocity``. Activations of one velocity evaluation are laid out as (G, R, W): G = 2
    groups ([uncond; cond]) with CFG or 1, R rows per group (tokens of all images).
    """

    backend: str = "torch"

    def prepare_fast(self, backend: str) -> None:
        self.backend = backend
        self.modulation = FusedLinear(self._modulated_linears())

    def release_fast(self) -> None:
        for name in ("backend", "modulation"):
            self.__dict__.pop(name, None)

    def sample(self, z: torch.Tensor, noise: torch.Tensor, schedule: FlowSchedule, cfg: float = 1.0) -> torch.Tensor:
        """The head's Euler sampling loop (as :func:`nitro_ar.heads.sample_head`), step-invariant
        work hoisted and the guidance + Euler update fused.

        Args:
            z: conditions, (N, Dz) (MLP head) or (B, L, Dz) (transformer head); [uncond; cond]
                (2N or 2B rows) when ``cfg != 1``.
            noise: starting latents, (N, C) or (B, L, C).
            schedule: timesteps and sigmas (e.g. :func:`nitro_ar.schedules.head_schedule`).
            cfg: guidance weight; ``v = v_u + cfg (v_c - v_u)``.
        Returns:
            Sampled tokens shaped like ``noise``, in z's dtype.
        """
        check_head_inputs(z, noise, cfg)
        groups = 2 if cfg != 1.0 else 1
        x = noise.to(device=z.device, dtype=z.dtype)
        # (S, G, R, W): SiLU of the condition of every step, for every row.
        conditions = self._step_conditions(z.unflatten(0, (groups, z.shape[0] // groups)),
                                           schedule.timesteps.to(z.device), getattr(schedule, "step_size", None))
        per_step = conditions[0].numel() // conditions.shape[-1] * self.modulation.weight.shape[0]
        steps_per_gemm = max(1, MODULATION_BUDGET // max(per_step, 1))
        tokens = noise.shape[1] if noise.dim() == 3 else 1
        sigmas = schedule.sigmas.to(z.device)  # read in place by the fused step: no host sync per step
        for start in range(0, len(schedule), steps_per_gemm):
            for step, modulation in enumerate(self.modulation(conditions[start : start + steps_per_gemm]), start):
                v = self._velocity(self._embed_input(x), modulation, tokens)  # (G, R, C)
                v = v.reshape(groups * x.shape[0], *x.shape[1:])
                x = guided_flow_step(x, v, sigmas[step], sigmas[step + 1], cfg, self.backend)
        return x

    def _modulated_norm(self, x, norm, **kwargs):
        return ops.modulated_norm(x, norm, backend=self.backend, **kwargs)


def _with_step_size(head: nn.Module, c_emb: torch.Tensor, dt: Optional[torch.Tensor]) -> torch.Tensor:
    """``c_emb`` plus a shortcut head's step-size embedding (step-invariant: once per call)."""
    step = embed_step_size(getattr(head, "step_embed", None), dt, c_emb)
    return c_emb if step is None else c_emb + step


# --------------------------------------------------------------------------------------------
# MLP head (gan)
# --------------------------------------------------------------------------------------------
class FastMLPHead(_FastFlowHead, MLPHead):
    """:class:`MLPHead` with one modulation GEMM for all blocks, each gated residual fused into
    the next LayerNorm + modulation, and the multi-step :meth:`sample`."""

    def _modulated_linears(self) -> List[nn.Linear]:
        # Per block (shift, scale, gate), then the final layer's (shift, scale).
        return [block.adaLN_modulation[1] for block in self.res_blocks] + [self.final_layer.adaLN_modulation[1]]

    def _embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (1, N, W)."""
        return self.input_proj(x).unsqueeze(0)

    def _step_conditions(self, z: torch.Tensor, timesteps: torch.Tensor, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (G, N, Dz), timesteps (S,), a shortcut head's step size ``dt`` (0-dim, or None: d = 0)
        -> SiLU(time_embed(t) + (cond_embed(z) [+ step_embed(dt)])): (S, G, N, W)."""
        c_emb = _with_step_size(self, self.cond_embed(z), dt)
        t_emb = self.time_embed(timesteps, dtype=c_emb.dtype)
        return F.silu(t_emb[:, None, None, :] + c_emb)

    def _velocity(self, h: torch.Tensor, modulation: torch.Tensor, tokens: int) -> torch.Tensor:
        """h (1 or G, N, W) (shared rows broadcast), modulation (G, N, T) -> v (G, N, C).

        ``tokens`` is unused: the MLP head treats every row on its own.
        """
        chunks = modulation.split(self.input_proj.out_features, dim=-1)
        depth = len(self.res_blocks)
        norms = [block.in_ln for block in self.res_blocks] + [self.final_layer.norm_final]
        shifts, scales, gates = chunks[0 : 3 * depth + 1 : 3], chunks[1 : 3 * depth + 2 : 3], chunks[2 : 3 * depth : 3]
        x = h.expand(modulation.shape[0], -1, -1)
        normed = self._modulated_norm(x, norms[0], shift=shifts[0], scale=scales[0])
        for index, block in enumerate(self.res_blocks):
            x, normed = self._modulated_norm(x, norms[index + 1], residual=block.mlp(normed), gate=gates[index],
                                             shift=shifts[index + 1], scale=scales[index + 1])
        return self.final_layer.linear(normed)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, C), t (N,), c (N, Dz) -> v (N, C), as :meth:`MLPHead.forward`."""
        h = self.input_proj(x)
        modulation = self.modulation(F.silu(self.condition(t, c, h.dtype, dt)))
        return self._velocity(h.unsqueeze(0), modulation.unsqueeze(0), 1).squeeze(0)


# --------------------------------------------------------------------------------------------
# Transformer head (joint_gan)
# --------------------------------------------------------------------------------------------
class FastHeadAttention(HeadAttention):
    """:class:`HeadAttention` reading q/k/v in place from the qkv projection; the fused
    attention's (B, L, H, d) output is the output projection's (B, L, H * d) input."""

    backend: str = "torch"

    def prepare_fast(self, backend: str) -> None:
        self.backend = backend

    def release_fast(self) -> None:
        self.__dict__.pop("backend", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, W) -> (B, L, W)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        return self.proj(ops.self_attention(q, k, v, backend=self.backend).flatten(2))


class FastTransformerHeadBlock(TransformerHeadBlock):
    """:class:`TransformerHeadBlock` with fused modulated RMSNorms (the attention's gated
    residual fused into norm2) and one GEMM for SwiGLU's ``fc1_g`` and ``fc1_x``."""

    backend: str = "torch"

    def prepare_fast(self, backend: str) -> None:
        self.backend = backend
        self.mlp_in = FusedLinear([self.mlp.fc1_g, self.mlp.fc1_x])

    def release_fast(self) -> None:
        for name in ("backend", "mlp_in"):
            self.__dict__.pop(name, None)

    def modulation_chunks(self, modulation: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(..., 6W) -> (g1, g2, s1, s2, b1, b2), views of (..., W)."""
        return modulation.unflatten(-1, (6, self.width)).unbind(-2)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """``fc2(GELU(fc1_g(x)) * fc1_x(x))`` (exact GELU) with one input GEMM."""
        gate, value = self.mlp_in(x).chunk(2, dim=-1)
        return self.mlp.fc2(F.gelu(gate) * value)

    def attention_residual(self, x: torch.Tensor, normed: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                           scale: torch.Tensor, tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x + gate * attn(normed)``, then norm2 and modulation, fused.

        Args:
            x, normed, gate, shift, scale: (..., R, W) with R rows = whole images of ``tokens``
                tokens each (x may be a broadcast view).
        Returns:
            (x_new, SwiGLU input), both shaped like ``normed``.
        """
        attn = self.attn(normed.reshape(-1, tokens, self.width)).view(normed.shape)
        return ops.modulated_norm(x, self.norm2, backend=self.backend, residual=attn, gate=gate, shift=shift,
                                  scale=scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, W), c (B, L, W) -> (B, L, W), as :meth:`TransformerHeadBlock.forward`."""
        g1, g2, s1, s2, b1, b2 = self.modulation_chunks(self.ada_lin(c))
        normed = ops.modulated_norm(x, self.norm1, backend=self.backend, shift=b1, scale=s1)
        x, h = self.attention_residual(x, normed, g1, b2, s2, x.shape[1])
        return torch.addcmul(x, self.swiglu(h), g2)


class FastTransformerHead(_FastFlowHead, TransformerHead):
    """:class:`TransformerHead` with one modulation GEMM for all blocks, each block's SwiGLU
    gated residual fused into the next block's norm1 (or the final norm), fast blocks and
    attention, and the multi-step :meth:`sample`."""

    def _modulated_linears(self) -> List[nn.Linear]:
        # Per block (g1, g2, s1, s2, b1, b2), then the final layer's (shift, scale).
        return [block.ada_lin[1] for block in self.res_blocks] + [self.final_layer.adaLN_modulation[1]]

    def _embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> input_proj (+ the position table when L > 1): (1, B * L, W)."""
        h = self.input_proj(x)
        if h.shape[1] > 1:
            if h.shape[1] != self.pos_embed_lv0.shape[1]:
                raise ValueError(f"transformer head takes {self.pos_embed_lv0.shape[1]} tokens or 1, got {h.shape[1]}")
            h = h + self.pos_embed_lv0
        return h.reshape(1, -1, h.shape[-1])

    def _step_conditions(self, z: torch.Tensor, timesteps: torch.Tensor, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (G, B, L, Dz), timesteps (S,), step size ``dt`` as for the MLP head -> SiLU(t_norm(t_emb)
        + (c_norm(cond_embed(z)) [+ step_embed(dt)])): (S, G, B * L, W)."""
        c_emb = _with_step_size(self, self.c_norm(self.cond_embed(z)).flatten(1, 2), dt)
        t_emb = self.t_norm(self.time_embed(timesteps, c_emb.dtype))
        return F.silu(t_emb[:, None, None, :] + c_emb)

    def _velocity(self, h: torch.Tensor, modulation: torch.Tensor, tokens: int) -> torch.Tensor:
        """h (1 or G, R, W) (shared rows broadcast), modulation (G, R, T), R = images x ``tokens``
        -> v (G, R, C)."""
        width, depth = self.input_proj.out_features, len(self.res_blocks)
        blocks = [block.modulation_chunks(modulation[..., 6 * width * i : 6 * width * (i + 1)])
                  for i, block in enumerate(self.res_blocks)]
        final_shift, final_scale = modulation[..., 6 * width * depth :].split(width, dim=-1)
        norms = [block.norm1 for block in self.res_blocks] + [self.final_layer.norm_final]
        shifts = [chunks[4] for chunks in blocks] + [final_shift]
        scales = [chunks[2] for chunks in blocks] + [final_scale]
        x = h.expand(modulation.shape[0], -1, -1)
        normed = self._modulated_norm(x, norms[0], shift=shifts[0], scale=scales[0])
        for index, (block, (g1, g2, _, s2, _, b2)) in enumerate(zip(self.res_blocks, blocks)):
            x, mlp_input = block.attention_residual(x, normed, g1, b2, s2, tokens)
            x, normed = self._modulated_norm(x, norms[index + 1], residual=block.swiglu(mlp_input), gate=g2,
                                             shift=shifts[index + 1], scale=scales[index + 1])
        return self.final_layer.linear(normed)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, L, C), t (B,), c (B, L, Dz) -> v (B, L, C), as :meth:`TransformerHead.forward`."""
        h = self._embed_input(x)
        modulation = self.modulation(F.silu(self.condition(t, c, h.dtype, dt))).flatten(0, 1)
        return self._velocity(h, modulation.unsqueeze(0), x.shape[1]).view(x.shape)


FAST_HEAD_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {
    MLPHead: FastMLPHead,
    TransformerHead: FastTransformerHead,
    TransformerHeadBlock: FastTransformerHeadBlock,
    HeadAttention: FastHeadAttention,
}


# --------------------------------------------------------------------------------------------
# Launch counting
# --------------------------------------------------------------------------------------------
_ALLOCATIONS = {
    torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
    torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default, torch.ops.aten._unsafe_view.default,
}


class _AtenLaunches(TorchDispatchMode):
    """Counts aten ops that compute (not views, allocations or host scalar reads)."""

    def __init__(self):
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in _ALLOCATIONS:
            self.launches += 1
        return func(*args, **(kwargs or {}))


def _count_device_kernels(fn: Callable[[], object], device: torch.device) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Kernel launches of one call of ``fn`` whose work runs on ``device``.

    On a GPU (CUDA or ROCm): the device kernels, copies and memsets the profiler records. On
    CPU: the aten ops that compute (views, allocations and host scalar reads excluded; each
    would be a kernel on a GPU) plus every Triton interpreter launch (the aten ops the
    interpreter runs to stage a launch's arguments are not counted).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _count_device_kernels(fn, device)
    counter = _AtenLaunches()
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

    InterpretedFunction.run = counted_launch
    try:
        with counter:
            fn()
    finally:
        InterpretedFunction.run = launch
    return counter.launches
