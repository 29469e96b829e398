"""Reference primitives against diffusers' definitions and their defining properties."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nitro_ar.layers import (
    asa_group,
    asa_ungroup,
    joint_attention,
    rms_norm,
    sincos_pos_table,
    timestep_embedding,
)


@pytest.mark.parametrize("dim,grid,base,scale", [(768, 16, 16, 1), (64, 16, 16, 1), (128, 32, 32, 2), (48, 8, 8, 1)])
def test_pos_table_matches_diffusers(dim, grid, base, scale):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    full = get_2d_sincos_pos_embed(dim, 96, base_size=base, interpolation_scale=scale, output_type="pt").float()
    ours_full = sincos_pos_table(dim, grid, base_size=base, interpolation_scale=scale, full=True)
    assert torch.equal(ours_full[0], full)
    top = (96 - grid) // 2
    crop = full.reshape(96, 96, dim)[top : top + grid, top : top + grid].reshape(1, -1, dim)
    assert torch.equal(sincos_pos_table(dim, grid, base_size=base, interpolation_scale=scale), crop)


def test_pos_table_channel_layout():
    # First half encodes the column, second half the row, each [sin, cos].
    table = sincos_pos_table(8, 16)[0].reshape(16, 16, 8)
    col_x = (torch.arange(16) + 40) / 6.0
    assert torch.allclose(table[3, :, 0], torch.sin(col_x), atol=1e-6)
    assert torch.allclose(table[:, 5, 4], torch.sin(col_x), atol=1e-6)
    assert torch.allclose(table[2, :, 2], torch.cos(col_x), atol=1e-6)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 333.5, 999.0, 1000.0])
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, 256), ref)


def test_rms_norm_fp32_statistics():
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    w = torch.randn(96)
    xf = x.float()
    ref = (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, w), ref)
    assert rms_norm(x, w).dtype == torch.bfloat16


@given(
    blocks=st.integers(1, 3), s=st.sampled_from([1, 2, 4]), n=st.sampled_from([1, 2, 4]), batch=st.integers(1, 2)
)
def test_asa_group_rule_and_inverse(blocks, s, n, batch):
    length = blocks * s * n
    x = torch.arange(batch * length).reshape(batch, length, 1).float()
    grouped = asa_group(x, s, n)
    assert grouped.shape == (batch * s, length // s, 1)
    for b in range(batch):
        for g in range(s):
            members = [p for p in range(length) if (p // n) % s == g]
            assert grouped[b * s + g, :, 0].tolist() == [b * length + p for p in members]
    assert torch.equal(asa_ungroup(grouped, s, n), x)


def test_asa_group_rejects_bad_length():
    with pytest.raises(ValueError, match="not divisible"):
        asa_group(torch.zeros(1, 10, 2), 4, 1)


@given(s=st.sampled_from([1, 2, 4]), n=st.sampled_from([1, 4]), li_blocks=st.integers(1, 3), lt_blocks=st.integers(1, 2))
def test_joint_attention_is_per_group_attention(s, n, li_blocks, lt_blocks):
    li, lt, heads, d = li_blocks * s * n, lt_blocks * s * n, 2, 8
    q, k, v = (torch.randn(1, li, heads, d) for _ in range(3))
    cq, ck, cv = (torch.randn(1, lt, heads, d) for _ in range(3))
    out_img, out_txt = joint_attention(q, k, v, cq, ck, cv, s, n)
    for g in range(s):
        img = [p for p in range(li) if (p // n) % s == g]
        txt = [p for p in range(lt) if (p // n) % s == g]
        qq = torch.cat([q[:, img], cq[:, txt]], 1).transpose(1, 2)
        kk = torch.cat([k[:, img], ck[:, txt]], 1).transpose(1, 2)
        vv = torch.cat([v[:, img], cv[:, txt]], 1).transpose(1, 2)
        att = torch.softmax(qq @ kk.transpose(-1, -2) / d**0.5, -1) @ vv
        att = att.transpose(1, 2)
        assert torch.allclose(out_img[:, img], att[:, : len(img)], atol=1e-5)
        assert torch.allclose(out_txt[:, txt], att[:, len(img) :], atol=1e-5)


def test_feedforward_uses_tanh_gelu():
    from nitro_ar.layers import FeedForward

    ff = FeedForward(8)
    x = torch.randn(4, 8)
    ref = ff.net[2](F.gelu(ff.net[0].proj(x), approximate="tanh"))
    assert torch.equal(ff(x), ref)
    assert set(ff.state_dict()) == {"net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias"}
