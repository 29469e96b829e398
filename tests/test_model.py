"""The reference model layer: official layout, configs, shapes, defining properties, samplers."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from factories import TEXT_WIDTH, tiny_ar, tiny_ar_config, tiny_e
from nitro_ar import NitroAR, NitroARConfig, NitroE, NitroEConfig

# Copies of shared/reference/official_keys_*.txt: every tensor name and shape of the official
# checkpoints (the last line holds the parameter count).
REFERENCE = Path(__file__).resolve().parent / "data"


def official_listing(name):
    shapes, total = {}, None
    for line in (REFERENCE / f"official_keys_{name}.txt").read_text().splitlines():
        parts = line.split("\t")
        if parts[0] == "TOTAL_PARAMETERS":
            total = int(parts[1])
        else:
            shapes[parts[0]] = tuple(int(v) for v in parts[1].strip("[]").split(",") if v.strip())
    return shapes, total


@pytest.mark.parametrize(
    "name,build",
    [
        ("gan", lambda: NitroAR(NitroARConfig.for_variant("gan"))),
        ("joint_gan", lambda: NitroAR(NitroARConfig.for_variant("joint_gan"))),
        ("nitro_e", lambda: NitroE(NitroEConfig())),
    ],
)
def test_full_size_keys_and_shapes_match_official_listing(name, build):
    with torch.device("meta"):
        model = build()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official, total = official_listing(name)
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == total


def test_from_official_kwargs_reduced():
    kwargs = dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64, caption_channels=48,
                  in_channels=32, out_channels=32, sample_size=16, patch_size=1, qk_norm="rms_norm", diffloss_d=2,
                  diffloss_w=128, num_sampling_steps=1000, shift=1.0, repa_depth=-1, z_dims=[768], diffusion_batch_mul=2,
                  global_token_type="vae_thumbnail_pred", global_head="separate_global_token_head")
    cfg = NitroARConfig.from_official_kwargs(kwargs, "joint_gan")
    assert (cfg.inner_dim, cfg.diffloss_w, cfg.diffloss_d, cfg.global_head, cfg.head_steps) == (64, 128, 2, True, 6)
    gan = NitroARConfig.from_official_kwargs({k: v for k, v in kwargs.items() if "global" not in k}, "gan")
    assert gan.variant == "gan" and gan.head_steps == 3 and gan.ar_steps == 20
    with pytest.raises(ValueError, match="unknown"):
        NitroARConfig.from_official_kwargs({**kwargs, "bogus": 1}, "gan")
    with pytest.raises(ValueError, match="caption_projection_dim"):
        NitroARConfig.from_official_kwargs({**kwargs, "caption_projection_dim": 32}, "gan")
    e = NitroEConfig.from_official_kwargs(dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64,
                                               caption_channels=48, use_sub_attn=False, repa_depth=-1))
    assert e.asa_pattern == ((1, 1),)
    assert NitroEConfig().asa_for_block(4) == (4, 1) and NitroEConfig().asa_for_block(23) == (4, 4)


def test_config_json_roundtrip_and_validation():
    cfg = tiny_ar_config("joint_gan")
    assert NitroARConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="model_type"):
        NitroEConfig.from_dict(cfg.to_dict())
    with pytest.raises(ValueError, match="variant"):
        NitroARConfig(variant="diffusion")


def _text(batch, length=16, seed=0):
    return torch.randn(batch, length, TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_backbone_shapes_and_bad_input(variant):
    model = tiny_ar(variant)
    tokens = torch.randn(2, 256, 32)
    out = model.backbone(tokens, _text(2))
    assert out.shape == (2, 256, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="tokens"):
        model.backbone(torch.randn(2, 255, 32), _text(2))
    with pytest.raises(ValueError, match="text"):
        model.backbone(tokens, torch.randn(2, 16, 47))


def test_backbone_masked_tokens_matter_only_through_inputs():
    """Changing one input token changes the output: every block attends over all tokens."""
    model = tiny_ar("gan")
    tokens = torch.randn(1, 256, 32)
    other = tokens.clone()
    other[0, 17] += 1
    a, b = model.backbone(tokens, _text(1)), model.backbone(other, _text(1))
    assert (a - b).abs().amax(-1).min() > 0


def test_last_block_is_context_pre_only():
    model = tiny_ar("gan", block_groups=(1, 1, 2))  # the last group has another block
    last = model.block_groups[2][-1]
    assert last.context_pre_only and last.attn.to_add_out is None and last.ff_context is None
    assert all(not b.context_pre_only for g in model.block_groups for b in g if b is not last)


def test_global_backbone_runs_group_zero_only():
    model = tiny_ar("joint_gan")
    text = _text(2)
    before = model.global_backbone(text)
    assert before.shape == (2, 1, 64)
    with torch.no_grad():
        for p in model.block_groups[1].parameters():
            p.add_(1.0)
    assert torch.equal(model.global_backbone(text), before)
    with pytest.raises(ValueError, match="joint_gan"):
        tiny_ar("gan").global_backbone(text)


def test_mlp_head_formula():
    """v = final(res_blocks(input_proj(x), y)) with y = t_emb + cond_embed(c), per token."""
    model = tiny_ar("gan")
    net = model.diffloss.net
    x, t, c = torch.randn(5, 32), torch.rand(5) * 1000, torch.randn(5, 64)
    v = model.head(x, t, c)
    assert v.shape == (5, 32)
    # Rows are independent: the MLP head samples tokens one by one.
    assert torch.allclose(model.head(x[2:3], t[2:3], c[2:3]), v[2:3], rtol=1e-5, atol=1e-5)
    blk = net.res_blocks[0]
    y = net.time_embed(t) + net.cond_embed(c)
    shift, scale, gate = blk.adaLN_modulation(y).chunk(3, -1)
    h = net.input_proj(x)
    expected = h + gate * blk.mlp(F.layer_norm(h, (128,), blk.in_ln.weight, blk.in_ln.bias, 1e-6) * (1 + scale) + shift)
    assert torch.allclose(blk(h, y), expected, atol=1e-6)


def test_transformer_head_tokens_interact_and_use_exact_gelu():
    model = tiny_ar("joint_gan")
    x, t, c = torch.randn(1, 256, 32), torch.tensor([500.0]), torch.randn(1, 256, 64)
    v = model.head(x, t, c)
    x2 = x.clone()
    x2[0, 0] += 1
    assert (model.head(x2, t, c)[0, 1:] - v[0, 1:]).abs().max() > 0  # joint sampling
    mlp = model.diffloss.net.res_blocks[0].mlp
    h = torch.randn(3, 128)
    assert torch.allclose(mlp(h), mlp.fc2(F.gelu(mlp.fc1_g(h)) * mlp.fc1_x(h)))
    assert not torch.allclose(mlp(h), mlp.fc2(F.gelu(mlp.fc1_g(h), approximate="tanh") * mlp.fc1_x(h)))
    one = model.global_head(torch.randn(2, 1, 32), torch.tensor([1000.0, 1.0]), torch.randn(2, 1, 64))
    assert one.shape == (2, 1, 32)


@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_head_sample_is_euler_over_head(variant, cfg):
    """head_sample == hand-written Euler loop over model.head with the official schedule."""
    model = tiny_ar(variant)
    rows = (3, 32) if variant == "gan" else (1, 256, 32)
    zrows = (rows[0] * (2 if cfg != 1 else 1),) + rows[1:-1] + (64,)
    z, noise = torch.randn(zrows), torch.randn(rows)
    out = model.head_sample(z, num_steps=3, cfg=cfg, noise=noise)
    sched = model.head_schedule(3)
    x = noise
    for i, t in enumerate(sched.timesteps):
        xin = torch.cat([x, x]) if cfg != 1 else x
        v = model.head(xin, t.expand(xin.shape[0]), z)
        if cfg != 1:
            vu, vc = v.chunk(2)
            v = vu + cfg * (vc - vu)
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
    assert torch.allclose(out, x, atol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        model.head_sample(z, num_steps=3, cfg=cfg, noise=noise[:1] if variant == "gan" else torch.randn(1, 255, 32))


def _gen(model, seed=0, **kw):
    text, uncond = _text(2, seed=1), _text(1, seed=2)
    return model.generate(text, uncond, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("variant,kw", [("gan", dict(ar_steps=4)), ("joint_gan", dict())])
def test_generate_deterministic(variant, kw):
    model = tiny_ar(variant)
    a, b, c = _gen(model, 0, **kw), _gen(model, 0, **kw), _gen(model, 1, **kw)
    assert a.shape == (2, 32, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_fills_every_token_with_head_samples():
    """Each AR step writes exactly the positions it predicts, so no mask token survives."""
    model = tiny_ar("gan")
    seen = []
    latents = _gen(model, ar_steps=5, cfg=1.0, callback=lambda step, tokens: seen.append(tokens.clone()))
    mask = model.mask_token.reshape(1, 1, 32)
    counts = [int((t == mask).all(-1).sum()) for t in seen]
    assert counts[-1] == 0 and counts == sorted(counts, reverse=True) and len(seen) == 5
    assert latents.shape == (2, 32, 16, 16)


@pytest.mark.parametrize("opts", [dict(cfg_schedule="linear"), dict(head_steps=4, head_steps_schedule="linear", head_steps_end=1),
                                  dict(refine=True), dict(head_steps=[1, 2, 1])])
def test_generate_options(opts):
    model = tiny_ar("gan")
    out = _gen(model, ar_steps=3, **opts)
    assert out.shape == (2, 32, 16, 16) and torch.isfinite(out).all()


def test_generate_bad_input():
    model = tiny_ar("gan")
    with pytest.raises(ValueError, match="uncond_emb"):
        model.generate(_text(1), None, cfg=4.0)
    with pytest.raises(ValueError, match="uncond_emb"):
        model.generate(_text(2), _text(2, length=8), cfg=4.0)


def test_joint_generate_multistep_and_dependency():
    model = tiny_ar("joint_gan")
    a = _gen(model, ar_steps=2, head_steps=2)
    b = _gen(model, ar_steps=2, head_steps=2, global_token_dependency=True)
    assert a.shape == b.shape == (2, 32, 16, 16) and not torch.equal(a, b)


def test_bf16_generate_runs():
    model = tiny_ar("gan").to(torch.bfloat16)
    out = _gen(model, ar_steps=2)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_nitro_e_forward_and_asa():
    model = tiny_e()
    lat, text = torch.randn(2, 32, 16, 16), _text(2)
    v = model(lat, text, torch.tensor([999.0, 10.0]))
    assert v.shape == lat.shape
    blocks = [block for group in model.block_groups for block in group]  # ASA by index across groups
    assert blocks[1].asa == (4, 1) and blocks[2].asa == (4, 4)
    full = tiny_e(asa_pattern=((1, 1),))
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(full(lat, text, torch.tensor([999.0, 10.0])), v)
    with pytest.raises(ValueError, match="latents"):
        model(torch.randn(2, 32, 8, 8), text, torch.tensor([1.0, 1.0]))


def test_nitro_e_generate():
    model = tiny_e()
    text, uncond = _text(1), _text(1, seed=3)
    a = model.generate(text, uncond, steps=3, generator=torch.Generator().manual_seed(0))
    b = model.generate(text, uncond, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (1, 32, 16, 16)
    # Distilled use: 4 steps, no guidance (uncond not needed).
    assert model.generate(text, steps=4, cfg=1.0, generator=torch.Generator().manual_seed(0)).shape == (1, 32, 16, 16)
    noise = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    x = noise
    sched = __import__("nitro_ar.schedules", fromlist=["flow_schedule"]).flow_schedule(2)
    for i in range(2):
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * model(x, text, sched.timesteps[i].expand(1))
    assert torch.allclose(model.generate(text, steps=2, cfg=1.0, latents=noise), x, atol=1e-5)
