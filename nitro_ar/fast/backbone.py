"""Accelerated E-MMDiT block: fused q/k/v GEMMs, fused norm + modulation + gated residual,
and the fused joint attention with ASA. Same parameters and state-dict keys as the reference
classes they replace (they subclass them; :func:`nitro_ar.fast.accelerate` swaps the class).

Sampling on a kernel backend runs each block in five launches for both streams, GEMMs with
their norms and residuals fused in (:meth:`FastJointTransformerBlock._fused_forward`);
autograd, autocast, the torch backend and ``NITRO_AR_GEMM=library`` run library GEMMs between
the fused norm and attention kernels, each of which has a backward.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AdaLNAffine, RMSNorm, asa_group, asa_ungroup
from ..mmdit import JointAttention, JointTransformerBlock
from . import ops


def fuse_linears_(linears: Sequence[nn.Linear]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Re-home the weights (and biases) of ``linears`` into one contiguous buffer each, in
    place, and return the fused (out_total, in) weight and (out_total,) bias.

    The parameters stay the same objects (views into the fused storage), so optimisers,
    ``state_dict`` keys and values are unchanged and no weight is stored twice.
    """
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
        start = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = weight[start : start + rows]
            if bias is not None:
                lin.bias.data = bias[start : start + rows]
            start += rows
    return weight, bias


class FusedLinear:
    """One GEMM for several ``nn.Linear`` sharing an input (q/k/v of a stream).

    Without gradients it uses the fused storage made by :func:`fuse_linears_` (re-made if the
    module moved, e.g. after ``.to()``); while training it concatenates the live parameters so
    autograd reaches each of them.
    """

    def __init__(self, linears: Sequence[nn.Linear]):
        self.linears = list(linears)
        self.weight, self.bias = fuse_linears_(self.linears)

    def fused(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The fused (out_total, in) weight and bias, without gradients (re-fused after a move)."""
        first = self.linears[0].weight
        if first.data_ptr() != self.weight.data_ptr() or first.dtype != self.weight.dtype:
            self.weight, self.bias = fuse_linears_(self.linears)
        return self.weight, self.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        params = [lin.weight for lin in self.linears]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            bias = torch.cat([lin.bias for lin in self.linears]) if self.bias is not None else None
            return F.linear(x, torch.cat(params), bias)
        return F.linear(x, *self.fused())


def feed_forward(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``FeedForward`` without the per-submodule call overhead: Linear, GELU(tanh), Linear."""
    up, down = ff.net[0].proj, ff.net[2]
    return F.linear(F.gelu(F.linear(x, up.weight, up.bias), approximate="tanh"), down.weight, down.bias)


class FastRMSNorm(ops.DropIn, RMSNorm):
    """:class:`RMSNorm` as one launch of the modulated-norm kernel on a kernel backend (the
    eager reference is five ops): ``z_proj_ln`` of joint_gan, the transformer head's
    ``t_norm`` / ``c_norm``, every RMSNorm module called on its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend in ops.KERNEL_BACKENDS and x.dim() in (2, 3):
            return ops.modulated_norm(x, self, backend=self.backend)
        return super().forward(x)


class FastJointAttention(ops.DropIn, JointAttention):
    """:class:`JointAttention` with one q/k/v GEMM per stream and the fused attention kernel."""

    def prepare_fast(self, backend: str) -> None:
        super().prepare_fast(backend)
        self.qkv_img = FusedLinear([self.to_q, self.to_k, self.to_v])
        self.qkv_txt = FusedLinear([self.add_q_proj, self.add_k_proj, self.add_v_proj])

    def _fast_state(self) -> Tuple[str, ...]:
        return ("qkv_img", "qkv_txt")

    def _torch_inference(self, hidden: torch.Tensor, context: torch.Tensor, asa: Tuple[int, int]):
        """Torch backend without gradients: group the two (B, L, D) inputs once (not six q/k/v
        tensors), normalise q and k in place in the fused projection output, and build the
        joint sequence with one concatenation; outputs are projected, then ungrouped."""
        groups, group_len = asa
        heads, head_dim = self.heads, self.head_dim
        qkv_img = self.qkv_img(asa_group(hidden, groups, group_len)).unflatten(-1, (3, heads, head_dim))
        qkv_txt = self.qkv_txt(asa_group(context, groups, group_len)).unflatten(-1, (3, heads, head_dim))
        if self.norm_q is not None:
            for qkv, norm_q, norm_k in ((qkv_img, self.norm_q, self.norm_k), (qkv_txt, self.norm_added_q, self.norm_added_k)):
                q, k = ops.qk_rms_norm(qkv[:, :, 0], qkv[:, :, 1], norm_q, norm_k)
                qkv[:, :, 0], qkv[:, :, 1] = q, k
        q, k, v = torch.cat([qkv_img, qkv_txt], dim=1).transpose(1, 3).unbind(2)  # (B s, H, L / s, d) each
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
        split = qkv_img.shape[1]
        out_img = asa_ungroup(self.to_out[0](out[:, :split]), groups, group_len)
        out_txt = None if self.context_pre_only else asa_ungroup(self.to_add_out(out[:, split:]), groups, group_len)
        return out_img, out_txt

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, asa: Tuple[int, int] = (1, 1)):
        if self.backend not in ops.KERNEL_BACKENDS and not torch.is_grad_enabled():
            return self._torch_inference(hidden, context, asa)
        heads, head_dim = self.heads, self.head_dim
        q, k, v = self.qkv_img(hidden).unflatten(-1, (3, heads, head_dim)).unbind(2)
        cq, ck, cv = self.qkv_txt(context).unflatten(-1, (3, heads, head_dim)).unbind(2)
        norms = None if self.norm_q is None else (self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k)
        eps = self.norm_q.eps if norms is not None else 1e-6
        out_img, out_txt = ops.joint_attention(
            q, k, v, cq, ck, cv, groups=asa[0], group_len=asa[1], qk_norms=norms, eps=eps,
            text_output=not self.context_pre_only, backend=self.backend,
        )
        out_img = self.to_out[0](out_img.flatten(-2))
        out_txt = None if self.context_pre_only else self.to_add_out(out_txt.flatten(-2))
        return out_img, out_txt


class FastJointTransformerBlock(ops.DropIn, JointTransformerBlock):
    """:class:`JointTransformerBlock` in five launches when sampling on a kernel backend, both
    streams in each (:meth:`_fused_forward`); otherwise (autograd, torch backend) with each
    "gate, add, norm, modulate" step fused: per stream norm1 (+ AdaLN-affine shift/scale
    computed in the kernel); attention; one fused ``x + gate * attn`` -> norm2 -> modulate
    producing both the residual stream and the FF input; FF; gated residual.
    """

    def _adaln(self, temb: Optional[torch.Tensor], context: bool, chunks: Tuple[Optional[int], ...]):
        if not self.adaln or (context and self.context_pre_only):
            return None
        bias, scale = (
            (self.scale_shift_bias_c, self.scale_shift_scale_c) if context else (self.scale_shift_bias, self.scale_shift_scale)
        )
        shift_chunk, scale_chunk, gate_chunk = chunks
        return AdaLNAffine(temb, bias, scale, shift_chunk=shift_chunk, scale_chunk=scale_chunk, gate_chunk=gate_chunk)

    def _stream(self, x, temb, context: bool):
        """Pre-attention norm of one stream: (B, L, D) -> (B, L, D)."""
        norm = self.norm1_context if context else self.norm1
        return ops.modulated_norm(x, norm, backend=self.backend, adaln=self._adaln(temb, context, (0, 1, None)))

    def _after_attention(self, x, attn, temb, context: bool):
        """x + gate * attn -> norm2 -> modulate -> FF -> gated residual."""
        norm, ff = (self.norm2_context, self.ff_context) if context else (self.norm2, self.ff)
        adaln = self._adaln(temb, context, (3, 4, 2))
        x, h = ops.modulated_norm(x, norm, backend=self.backend, residual=attn, adaln=adaln)
        h = feed_forward(ff, h)
        if adaln is None:
            return x + h
        gate = self.modulation(temb, context)[5]
        return torch.addcmul(x, gate, h)

    def _fused_forward(self, x: torch.Tensor, c: torch.Tensor, temb: Optional[torch.Tensor]):
        """Five launches for both streams (:func:`nitro_ar.kernels.fused_linear.grouped_linear`):

        1. q/k/v GEMMs with norm1 (+ modulation) as their prologue;
        2. joint attention reading q/k/v in place;
        3. output projections with the gated residual ``x + gate * (.)`` as their epilogue;
        4. FF up-projections with norm2 (+ modulation) as prologue and GELU(tanh) as epilogue;
        5. FF down-projections with the gated residual as epilogue.
        The text stream of the context-pre-only block stops after its q/k/v.
        """
        attn, heads, head_dim, backend = self.attn, self.attn.heads, self.attn.head_dim, self.backend
        text = not self.context_pre_only
        # The residual epilogues read rows with unit stride; a transposed stream (Nitro-E's patch
        # embedding) is made contiguous once.
        x, c = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, c))
        qkv_img, qkv_txt = ops.linear_group([
            ops.LinearProblem(x, *attn.qkv_img.fused(), prologue=ops.norm_prologue(
                self.norm1, adaln=self._adaln(temb, False, (0, 1, None)))),
            ops.LinearProblem(c, *attn.qkv_txt.fused(), prologue=ops.norm_prologue(
                self.norm1_context, adaln=self._adaln(temb, True, (0, 1, None)))),
        ], backend=backend)
        q, k, v = qkv_img.unflatten(-1, (3, heads, head_dim)).unbind(2)
        cq, ck, cv = qkv_txt.unflatten(-1, (3, heads, head_dim)).unbind(2)
        norms = None if attn.norm_q is None else (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
        out_img, out_txt = ops.joint_attention(q, k, v, cq, ck, cv, groups=self.asa[0], group_len=self.asa[1],
                                               qk_norms=norms, eps=attn.norm_q.eps if norms else 1e-6,
                                               text_output=text, backend=backend)
        streams = [(x, out_img, attn.to_out[0], self.norm2, self.ff, False)]
        if text:
            streams.append((c, out_txt, attn.to_add_out, self.norm2_context, self.ff_context, True))
        residuals = ops.linear_group([
            ops.LinearProblem(out.flatten(-2), proj.weight, proj.bias, residual=stream,
                              gate=self._adaln(temb, context, (None, None, 2)))
            for stream, out, proj, _, _, context in streams], backend=backend)
        hidden = ops.linear_group([
            ops.LinearProblem(stream, ff.net[0].proj.weight, ff.net[0].proj.bias, prologue=ops.norm_prologue(
                norm, adaln=self._adaln(temb, context, (3, 4, None))))
            for stream, (_, _, _, norm, ff, context) in zip(residuals, streams)], backend=backend, activation="gelu_tanh")
        outputs = ops.linear_group([
            ops.LinearProblem(h, ff.net[2].weight, ff.net[2].bias, residual=stream,
                              gate=self._adaln(temb, context, (None, None, 5)))
            for h, stream, (_, _, _, _, ff, context) in zip(hidden, residuals, streams)], backend=backend)
        return outputs[0], outputs[1] if text else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: Optional[torch.Tensor] = None):
        if ops.fused_path(self.backend, self, x, c, temb):
            return self._fused_forward(x, c, temb)
        attn_x, attn_c = self.attn(self._stream(x, temb, False), self._stream(c, temb, True), self.asa)
        x = self._after_attention(x, attn_x, temb, False)
        if self.context_pre_only:
            return x, None
        return x, self._after_attention(c, attn_c, temb, True)
