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
  ``c_norm`` for the transformer head), and the modulations of as many steps as fit a memory
  budget in one GEMM; the time embedding of the schedule's timesteps is the same for every
  row and AR step, so ``NitroAR.generate`` computes it once per call
  (``schedule_time_embedding``, passed in ``schedule.time_embedding``);
- CFG does not duplicate the noisy tokens: ``input_proj`` runs on the N shared rows and the
  unconditional and conditional rows read the same values (a stride-0 view) until the first
  gated residual makes them differ;
- sampling on a kernel backend runs every GEMM through :mod:`nitro_ar.kernels.fused_linear`
  with its neighbours fused in (``_fused_step``): the modulation GEMM takes ``SiLU(t_emb +
  condition)`` as its prologue; each MLP block is two launches (LayerNorm + modulation + GEMM
  + SiLU; GEMM + gated residual); each transformer block five (qkv with RMSNorm + modulation,
  attention, proj + gated residual, SwiGLU input with RMSNorm + modulation and GELU(g) * v,
  fc2 + gated residual); the final layer carries the guidance combine and the Euler step;
- elsewhere (autograd, the torch backend, ``NITRO_AR_GEMM=library``) library GEMMs with the
  fused norms and the fused guidance + Euler step (:mod:`nitro_ar.kernels.flow_step`);
- the schedule's own timesteps and sigmas, and no random numbers drawn (the noise is given), so
  the result equals the reference loop within rounding, for any step count and for DiSA (the
  schedule comes with each call).

Launches per AR iteration with fused GEMMs (counted by the tests with
:func:`nitro_ar.fast.counting.count_launches`), for depth D and S Euler steps:

- MLP head: 2 once (``cond_embed``; one modulation GEMM for all steps) + ``2 D + 2`` per step
  (input_proj; two per block; the final layer with the Euler step). Released head (D = 8,
  S = 3): 56, against 348 for the reference loop (123 with library GEMMs).
- Transformer head: ``c_norm(cond_embed)`` once + per step the step's modulation GEMM (one per
  step at 2 x 256 tokens), ``5 D + 2`` (``4 D + 2`` for the one global token, whose attention is
  its value). Released head (D = 8, S = 6): 265.

Gradients: everything is differentiable (autograd takes the library-GEMM structure, whose
kernels all have backward passes), so adversarial fine-tuning can back-propagate through
``sample``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import HeadAttention, MLPHead, TransformerHead, TransformerHeadBlock, check_head_inputs, embed_step_size
from ..kernels import reference
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


class _FastFlowHead(ops.DropIn):
    """The multi-step sampler shared by the fast heads, and their fast-path bookkeeping.

    A head supplies ``_modulated_linears()`` (every Linear applied to SiLU(condition), in the
    order its ``_velocity`` splits the fused output), ``schedule_time_embedding`` and
    ``_condition_embedding`` (the two parts of every step's condition), and one Euler step's
    velocity twice: ``_fused_step`` (sampling on a kernel backend: fused-GEMM launches, the
    Euler step in the last one) and ``_embed_input`` + ``_velocity`` (autograd and the torch
    backend). Activations of one velocity evaluation are laid out as (G, R, W): G = 2 groups
    ([uncond; cond]) with CFG or 1, R rows per group (tokens of all images).
    """

    def prepare_fast(self, backend: str) -> None:
        super().prepare_fast(backend)
        self.modulation = FusedLinear(self._modulated_linears())

    def _fast_state(self) -> Tuple[str, ...]:
        return ("modulation",)

    def sample(self, z: torch.Tensor, noise: torch.Tensor, schedule: FlowSchedule, cfg: float = 1.0) -> torch.Tensor:
        """The head's Euler sampling loop (as :func:`nitro_ar.heads.sample_head`), step-invariant
        work hoisted and the guidance + Euler update fused.

        Args:
            z: conditions, (N, Dz) (MLP head) or (B, L, Dz) (transformer head); [uncond; cond]
                (2N or 2B rows) when ``cfg != 1``.
            noise: starting latents, (N, C) or (B, L, C).
            schedule: timesteps and sigmas (e.g. :func:`nitro_ar.schedules.head_schedule`), and
                optionally this head's ``schedule_time_embedding`` of its timesteps.
            cfg: guidance weight; ``v = v_u + cfg (v_c - v_u)``.
        Returns:
            Sampled tokens shaped like ``noise``, in z's dtype.
        """
        check_head_inputs(z, noise, cfg)
        groups = 2 if cfg != 1.0 else 1
        x = noise.to(device=z.device, dtype=z.dtype)
        # (G, R, W): the step-invariant part of every row's condition.
        conditions = self._condition_embedding(z.unflatten(0, (groups, z.shape[0] // groups)),
                                               getattr(schedule, "step_size", None))
        t_emb = schedule.time_embedding
        if t_emb is None:
            t_emb = self.schedule_time_embedding(schedule.timesteps.to(z.device), conditions.dtype)
        fused = ops.fused_path(self.backend, self, z, noise)
        width, total = conditions.shape[-1], self.modulation.weight.shape[0]
        steps_per_gemm = max(1, MODULATION_BUDGET // max(conditions.numel() // width * total, 1))
        tokens = noise.shape[1] if noise.dim() == 3 else 1
        sigmas = schedule.sigmas.to(z.device)  # read in place by the fused step: no host sync per step
        for start in range(0, len(schedule), steps_per_gemm):
            steps = t_emb[start : start + steps_per_gemm]
            if fused:  # SiLU(t_emb + condition) is the modulation GEMM's prologue
                rows = conditions.reshape(1, -1, width).expand(len(steps), -1, -1)
                modulations = ops.linear(rows, *self.modulation.fused(), backend=self.backend,
                                         prologue=ops.AddSiLUPrologue(steps[:, None, :]))
                modulations = modulations.view(len(steps), *conditions.shape[:-1], total)
            else:
                modulations = self.modulation(F.silu(steps[:, None, None, :] + conditions))
            for step, modulation in enumerate(modulations, start):  # (G, R, T) each
                if fused:
                    x = self._fused_step(x, modulation, sigmas[step], sigmas[step + 1], cfg, tokens)
                    continue
                v = self._velocity(self._embed_input(x), modulation, tokens)  # (G, R, C)
                v = v.reshape(groups * x.shape[0], *x.shape[1:])
                x = guided_flow_step(x, v, sigmas[step], sigmas[step + 1], cfg, self.backend)
        return x

    def _flow_epilogue(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cfg: float):
        return ops.FlowEpilogue(x.reshape(-1, x.shape[-1]), sigma, sigma_next, cfg)

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

    def schedule_time_embedding(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """time_embed of a schedule's timesteps (S,) -> (S, W) in ``dtype``: the same for every
        row and AR step, so :meth:`NitroAR.generate` computes it once per call."""
        return self.time_embed(timesteps, dtype=dtype)

    def _condition_embedding(self, z: torch.Tensor, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (G, N, Dz), a shortcut head's step size ``dt`` (0-dim, or None: d = 0) ->
        cond_embed(z) [+ step_embed(dt)]: (G, N, W)."""
        return _with_step_size(self, self.cond_embed(z), dt)

    def _fused_step(self, x: torch.Tensor, modulation: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                    cfg: float, tokens: int) -> torch.Tensor:
        """One Euler step in ``2 D + 2`` launches: input_proj; per block the first GEMM with
        LayerNorm + modulation as prologue and SiLU as epilogue, the second with the gated
        residual as epilogue; the final layer (norm + modulation, GEMM) with the guided Euler
        step as epilogue. x (N, C), modulation (G, N, T) -> x_new (N, C)."""
        backend, width, depth = self.backend, self.input_proj.out_features, len(self.res_blocks)
        chunks = modulation.split(width, dim=-1)
        h = self.input_proj(x).unsqueeze(0).expand(modulation.shape[0], -1, -1)  # CFG rows share it
        for index, block in enumerate(self.res_blocks):
            shift, scale, gate = chunks[3 * index : 3 * index + 3]
            up, down = block.mlp[0], block.mlp[2]
            hidden = ops.linear(h, up.weight, up.bias, backend=backend, activation="silu",
                                prologue=ops.norm_prologue(block.in_ln, shift=shift, scale=scale))
            h = ops.linear(hidden, down.weight, down.bias, backend=backend, residual=h, gate=gate)
        final = self.final_layer
        prologue = ops.norm_prologue(final.norm_final, shift=chunks[3 * depth], scale=chunks[3 * depth + 1])
        return ops.linear(h, final.linear.weight, final.linear.bias, backend=backend, prologue=prologue,
                          flow=self._flow_epilogue(x, sigma, sigma_next, cfg))

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
class FastHeadAttention(ops.DropIn, HeadAttention):
    """:class:`HeadAttention` reading q/k/v in place from the qkv projection; the fused
    attention's (B, L, H, d) output is the output projection's (B, L, H * d) input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, W) -> (B, L, W)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        return self.proj(ops.self_attention(q, k, v, backend=self.backend).flatten(2))


class FastTransformerHeadBlock(ops.DropIn, TransformerHeadBlock):
    """:class:`TransformerHeadBlock` with fused modulated RMSNorms (the attention's gated
    residual fused into norm2) and one GEMM for SwiGLU's ``fc1_g`` and ``fc1_x``."""

    def prepare_fast(self, backend: str) -> None:
        super().prepare_fast(backend)
        self.mlp_in = FusedLinear([self.mlp.fc1_g, self.mlp.fc1_x])

    def _fast_state(self) -> Tuple[str, ...]:
        return ("mlp_in",)

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

    def schedule_time_embedding(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t_norm(time_embed(t)) of a schedule's timesteps (S,) -> (S, W) in ``dtype`` (computed
        once per :meth:`NitroAR.generate` call)."""
        return self.t_norm(self.time_embed(timesteps, dtype))

    def _condition_embedding(self, z: torch.Tensor, dt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (G, B, L, Dz), step size ``dt`` as for the MLP head -> c_norm(cond_embed(z))
        [+ step_embed(dt)]: (G, B * L, W)."""
        return _with_step_size(self, self.c_norm(self.cond_embed(z)).flatten(1, 2), dt)

    def _fused_step(self, x: torch.Tensor, modulation: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                    cfg: float, tokens: int) -> torch.Tensor:
        """One Euler step in ``5 D + 2`` launches (``4 D + 2`` for one token, whose attention is
        its value): input_proj with the position table as epilogue; per block the qkv GEMM with
        RMSNorm + modulation as prologue, attention reading q/k/v in place, the output
        projection with the gated residual as epilogue, SwiGLU's input GEMM with RMSNorm +
        modulation as prologue and GELU(g) * v as epilogue, fc2 with the gated residual; the
        final layer with the guided Euler step. x (B, L, C), modulation (G, R, T) -> (B, L, C)."""
        backend, width, depth = self.backend, self.input_proj.out_features, len(self.res_blocks)
        groups = modulation.shape[0]
        if tokens > 1:
            if tokens != self.pos_embed_lv0.shape[1]:
                raise ValueError(f"transformer head takes {self.pos_embed_lv0.shape[1]} tokens or 1, got {tokens}")
            h = ops.linear(x, self.input_proj.weight, self.input_proj.bias, backend=backend, residual=self.pos_embed_lv0)
        else:
            h = self.input_proj(x)
        h = h.reshape(1, -1, width).expand(groups, -1, -1)  # CFG rows share it
        for index, block in enumerate(self.res_blocks):
            g1, g2, s1, s2, b1, b2 = block.modulation_chunks(modulation[..., 6 * width * index : 6 * width * (index + 1)])
            norm1 = ops.norm_prologue(block.norm1, shift=b1, scale=s1)
            attn = block.attn
            if tokens == 1:  # softmax over one key is exactly 1: the attention is v
                out = ops.linear(h, attn.qkv.weight[2 * width :], None, backend=backend, prologue=norm1)
            else:
                qkv = ops.linear(h, attn.qkv.weight, None, backend=backend, prologue=norm1)
                q, k, v = qkv.view(-1, tokens, 3, attn.heads, attn.head_dim).unbind(2)
                out = ops.self_attention(q, k, v, backend=backend).view(h.shape)
            h = ops.linear(out, attn.proj.weight, attn.proj.bias, backend=backend, residual=h, gate=g1)
            hidden = ops.linear(h, *block.mlp_in.fused(), backend=backend, activation="gelu_mul",
                                prologue=ops.norm_prologue(block.norm2, shift=b2, scale=s2))
            h = ops.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias, backend=backend, residual=h, gate=g2)
        final = self.final_layer
        shift, scale = modulation[..., 6 * width * depth :].split(width, dim=-1)
        out = ops.linear(h, final.linear.weight, final.linear.bias, backend=backend,
                         prologue=ops.norm_prologue(final.norm_final, shift=shift, scale=scale),
                         flow=self._flow_epilogue(x, sigma, sigma_next, cfg))
        return out.view(x.shape)

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
