"""64-bit offsets: the launch plans choose them from sizes and strides alone (no allocation),
and the kernels' own index arithmetic is exact in the chosen width (no int32 wrap).

The plans are built on ``meta`` tensors, which carry sizes and strides but no storage. The index
arithmetic is checked by small probe kernels that call the kernels' ``@triton.jit`` helpers
(``widen``, the tile offsets of the modulated norm, the ASA member positions of attention) at
indices whose offsets pass 2^31, against exact Python integers.
"""
import pytest
import torch
import triton
import triton.language as tl

from nitro_ar.kernels import flow_step as fs
from nitro_ar.kernels import fused_linear as fl
from nitro_ar.kernels import joint_attention as ja
from nitro_ar.kernels import modulated_norm as mn
from nitro_ar.kernels.backend import interpreter_requested
from nitro_ar.kernels.fused_linear import _rows
from nitro_ar.kernels.joint_attention import _member_positions
from nitro_ar.kernels.launch import INDEX_32_LIMIT, needs_int64, storage_span
from nitro_ar.kernels.modulated_norm import _tile_offsets
from nitro_ar.kernels.offsets import widen
from nitro_ar.kernels.reference import LinearProblem

META = torch.device("meta")
DEVICE = torch.device("cuda") if torch.cuda.is_available() and not interpreter_requested() else torch.device("cpu")


def test_storage_span_from_sizes_and_strides():
    assert storage_span((2, 3, 4), (12, 4, 1)) == 24
    assert storage_span((2, 3, 4), (0, 4, 1)) == 12  # expanded over the batch
    assert storage_span((5, 4), (10, 1)) == 44  # every other row of a wider buffer
    assert storage_span((0, 4), (4, 1)) == 0
    assert not needs_int64(None, INDEX_32_LIMIT - 1) and needs_int64(None, INDEX_32_LIMIT)


def _modulation_rows(rows, width):
    """The transformer head's per-token modulation: shift/scale/gate chunks of a (1, rows, width)
    projection of every step and block, read in place (token stride ``width``)."""
    projection = torch.empty(1, rows, width, device=META)
    return projection[..., :768], projection[..., 768:1536], projection[..., 1536:2304]


@pytest.mark.parametrize("rows,wide", [(4096, False), (55_000, False), (56_000, True), (200_000, True)])
def test_modulated_norm_plan_selects_64_bit_from_strides(rows, wide):
    """Token stride 50 x 768 (issue 10: int32 wrapped above ~55.9k rows): the plan widens exactly
    when rows * stride reaches 2^31, although x itself (rows x 768) stays far below."""
    x = torch.empty(1, rows, 768, device=META)
    shift, scale, gate = _modulation_rows(rows, 50 * 768)
    plan, _ = mn._prepare(x, norm="rms", eps=1e-6, shift=shift, scale=scale, residual=torch.empty_like(x),
                          gate=gate)
    assert plan.index_64 == wide
    assert storage_span(x.shape, x.stride()) < INDEX_32_LIMIT


def test_modulated_norm_plan_counts_outputs_and_expanded_inputs():
    """The outputs (B, L, D) count even when every input is expanded (stride 0) and small."""
    x = torch.empty(1, 1, 768, device=META).expand(4096, 1024, 768)
    plan, _ = mn._prepare(x, norm="layer", eps=1e-6)
    assert storage_span(x.shape, x.stride()) == 768 and plan.index_64


@pytest.mark.parametrize("batch,wide", [(64, False), (4096, True)])
def test_attention_plan_selects_64_bit_from_strides(batch, wide):
    """One fused (B, L, 3, H, d) projection per stream, unbound: Nitro-E's 24 x 32 heads at 256
    image and 128 text tokens; a training batch of 4096 spans more than 2^31 elements."""
    img = torch.empty(batch, 256, 3, 24, 32, device=META).unbind(2)
    txt = torch.empty(batch, 128, 3, 24, 32, device=META).unbind(2)
    assert ja._index_64(*img, *txt) == wide


def test_flow_step_plan_selects_64_bit_from_sizes():
    assert fs.launch_plan(2**30, True, 1024)[1] and not fs.launch_plan(2**30, False, 1024)[1]


# --------------------------------------------------------------------------------------------
# The index arithmetic itself
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets_probe(out_ptr, batch_index, row_start, stride_b, stride_l, INDEX_64: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The modulated-norm kernels' offsets of one tile, as the forward forms them."""
    batch = widen(batch_index, INDEX_64)
    rows = widen(row_start, INDEX_64) + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    offsets = _tile_offsets(batch, stride_b, stride_l, rows, cols).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BLOCK_ROWS)[:, None] * BLOCK_D + cols[None, :], offsets)


@triton.jit
def _position_offsets_probe(out_ptr, member_start, group, stride_l, GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr,
                            INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    """The attention kernels' row offsets ``position * stride_l`` of BLOCK ASA group members."""
    members = member_start + tl.arange(0, BLOCK)
    positions = _member_positions(members, group, GROUPS, GROUP_LEN, INDEX_64)
    tl.store(out_ptr + tl.arange(0, BLOCK), (positions * stride_l).to(tl.int64))


def _probe_tile_offsets(index_64, batch, row_start, stride_b, stride_l):
    out = torch.zeros(4, 8, dtype=torch.int64, device=DEVICE)
    _tile_offsets_probe[(1,)](out, batch, row_start, stride_b, stride_l, INDEX_64=index_64, BLOCK_ROWS=4, BLOCK_D=8)
    return out.cpu()


def test_modulated_norm_offsets_do_not_wrap():
    """Rows 55996.. of a token stride 38400 (offsets about 2.15e9): exact with the plan's choice."""
    rows, stride_l = 56_000, 50 * 768
    x = torch.empty(1, rows, 768, device=META)
    shift, scale, gate = _modulation_rows(rows, stride_l)
    plan, _ = mn._prepare(x, norm="rms", eps=1e-6, shift=shift, scale=scale, residual=torch.empty_like(x),
                          gate=gate)
    row_start, stride_b = rows - 4, rows * stride_l
    exact = torch.tensor([[row * stride_l + col for col in range(8)] for row in range(row_start, rows)])
    assert exact.max() > 2**31
    torch.testing.assert_close(_probe_tile_offsets(plan.index_64, 0, row_start, stride_b, stride_l), exact,
                               rtol=0, atol=0)
    # The same arithmetic in int32 wraps: what the plan protects against.
    assert (_probe_tile_offsets(False, 0, row_start, stride_b, stride_l) != exact).any()


def test_attention_positions_do_not_wrap():
    """Members ~1M of ASA group 3 (4 groups of 4) with row stride 3 x 24 x 32 (fused qkv)."""
    groups, group_len, group, stride_l, start = 4, 4, 3, 3 * 24 * 32, 250_000
    members = range(start, start + 16)
    exact = torch.tensor([((m // group_len) * groups * group_len + group * group_len + m % group_len) * stride_l
                          for m in members])
    assert exact.max() > 2**31
    for index_64, wraps in ((True, False), (False, True)):
        out = torch.zeros(16, dtype=torch.int64, device=DEVICE)
        _position_offsets_probe[(1,)](out, start, group, stride_l, GROUPS=groups, GROUP_LEN=group_len,
                                      INDEX_64=index_64, BLOCK=16)
        assert bool((out.cpu() != exact).any()) == wraps


@triton.jit
def _fused_linear_rows_probe(out_ptr, first, M, L, stride_b, stride_l, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    batch, pos, _ = _rows(first, M, L, BLOCK, INDEX_64)
    tl.store(out_ptr + tl.arange(0, BLOCK), batch * stride_b + pos * stride_l)


def test_fused_linear_plan_and_row_offsets_do_not_wrap():
    """The transformer head's modulation GEMM at 2 x 110 images (56,320 rows of 38,400 outputs,
    ~2.16e9 elements): the plan, from meta tensors, asks for 64-bit offsets, and with them the
    last rows' output offsets are exact (they wrap in int32)."""
    rows, width = 2 * 110 * 256, 38_400
    x = torch.empty(2, rows // 2, 768, device=META)
    plan, _ = fl._prepare([LinearProblem(x, torch.empty(width, 768, device=META))], None, None)
    assert plan.index_64
    length, first = rows // 2, rows - 16
    exact = torch.tensor([(r // length) * length * width + (r % length) * width for r in range(first, rows)])
    assert exact.max() > 2**31
    for index_64, wraps in ((True, False), (False, True)):
        out = torch.zeros(16, dtype=torch.int64, device=DEVICE)
        _fused_linear_rows_probe[(1,)](out, first, rows, length, length * width, width, INDEX_64=index_64, BLOCK=16)
        assert bool((out.cpu() != exact).any()) == wraps
