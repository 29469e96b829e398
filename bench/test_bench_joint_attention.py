"""Joint (MMDiT) attention with ASA, q/k RMSNorm included: eager reference vs the Triton kernel
vs SDPA on pre-arranged inputs vs torch.compile of the reference.

Every implementation starts from the same projections (one fused QKV tensor per stream, viewed
(B, L, 3, H, d) and unbound) and the four q/k-norm weights, except ``sdpa-prearranged``, which
gets q/k/v already normalised, grouped and concatenated ((B * s, H, (Li + Lt) / s, d)): the
attention alone, the floor that the copies and launches of the reference sit on top of.

GPU: bf16, 24 heads x 32, image 256 and 80 tokens + 128 text tokens, CFG batch 2 and training
batch 64, every ASA pattern (s, n). CPU (no Triton kernel, and torch.compile would take minutes
to compile there): fp32 at 4 heads, batch 2. ``extra_info`` records the attention FLOPs, the
achieved TFLOP/s, the device and, where its peak is known, the fraction of peak bf16 TFLOP/s.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from benchutil import ON_GPU, measure, record_rate, synchronized
from nitro_ar import layers
from nitro_ar.kernels.joint_attention import joint_attention

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HEADS, HEAD_DIM, LEN_TXT = (24, 32, 128) if ON_GPU else (4, 32, 128)
BATCHES = (2, 64) if ON_GPU else (2,)
PATTERNS = [(1, 1), (4, 1), (4, 4)]
IMPLEMENTATIONS = ["eager", "sdpa-prearranged", "compile", "triton"] if ON_GPU else ["eager", "sdpa-prearranged"]
CASES = [(batch, len_img, groups, group_len) for batch in BATCHES for len_img in (256, 80)
         for groups, group_len in PATTERNS]


def eager(q_img, k_img, v_img, q_txt, k_txt, v_txt, norms, groups, group_len):
    """The reference block's attention: per-head q/k RMSNorm, then cat + rearrange + SDPA + inverse."""
    q_img, k_img, q_txt, k_txt = (layers.rms_norm(x, w, 1e-6) for x, w in zip((q_img, k_img, q_txt, k_txt), norms))
    return layers.joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, groups, group_len)


@functools.lru_cache(maxsize=None)
def compiled(case):
    """One torch.compile wrapper per case: each keeps its own graphs (no recompile-limit fallback)."""
    return torch.compile(eager, dynamic=False)


def triton_kernel(q_img, k_img, v_img, q_txt, k_txt, v_txt, norms, groups, group_len):
    return joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, groups=groups, group_len=group_len,
                           q_norm_img=norms[0], k_norm_img=norms[1], q_norm_txt=norms[2], k_norm_txt=norms[3],
                           backend="triton")


def sdpa_prearranged(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def inputs(case, impl, device, requires_grad):
    """(function, arguments, leaves): the arguments of one call and the tensors to differentiate."""
    batch, len_img, groups, group_len = case

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=DTYPE, requires_grad=requires_grad)

    if impl == "sdpa-prearranged":
        tokens = (len_img + LEN_TXT) // groups
        leaves = [randn(batch * groups, HEADS, tokens, HEAD_DIM) for _ in range(3)]
        return sdpa_prearranged, leaves, leaves
    qkv_img, qkv_txt = randn(batch, len_img, 3, HEADS, HEAD_DIM), randn(batch, LEN_TXT, 3, HEADS, HEAD_DIM)
    norms = [(torch.rand(HEAD_DIM, device=device, dtype=DTYPE) + 0.5).requires_grad_(requires_grad) for _ in range(4)]
    fn = {"eager": eager, "compile": compiled(case), "triton": triton_kernel}[impl]
    args = (*qkv_img.unbind(2), *qkv_txt.unbind(2), norms, groups, group_len)
    return fn, args, [qkv_img, qkv_txt, *norms]


def record_flops(benchmark, case, passes, device):
    """Attention matmul FLOPs per group (4 * queries * keys * d forward, 2.5x that backward)."""
    batch, len_img, groups, _ = case
    tokens = (len_img + LEN_TXT) // groups
    forward = 4 * batch * groups * HEADS * tokens * tokens * HEAD_DIM
    flops = forward * 7 // 2 if "backward" in passes else forward
    record_rate(benchmark, device, flops=flops)



def case_id(case):
    batch, len_img, groups, group_len = case
    return f"b{batch}-img{len_img}-txt{LEN_TXT}-s{groups}n{group_len}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward(benchmark, device, case, impl):
    benchmark.group = f"joint_attention forward {case_id(case)}"
    fn, args, _ = inputs(case, impl, device, requires_grad=False)

    def run():
        with torch.no_grad():
            return fn(*args)

    run()  # compile / warm up outside the timed rounds
    measure(benchmark, synchronized(run, device))
    record_flops(benchmark, case, ["forward"], device)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward(benchmark, device, case, impl):
    benchmark.group = f"joint_attention forward+backward {case_id(case)}"
    fn, args, leaves = inputs(case, impl, device, requires_grad=True)
    upstream = None

    def run():
        nonlocal upstream
        outputs = fn(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if upstream is None:
            upstream = [torch.randn_like(out) for out in outputs]
        return torch.autograd.grad(outputs, leaves, upstream)

    run()
    measure(benchmark, synchronized(run, device))
    record_flops(benchmark, case, ["forward", "backward"], device)
