"""Nitro-E training: the official rectified-flow + REPA objective (against an independent
transcription of the official ``train.py`` / ``core/loss.py`` with diffusers' helpers), the REPA
projectors' official names, DINOv2 features from a tiny random ``Dinov2Model``, the trainer
(loss drop, exact resume, fast vs eager loss curves under the Triton interpreter, bf16, EMA,
gradient checkpointing), official export, and few-step distillation."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from nitro_ar import NitroE, NitroEConfig
from nitro_ar.checkpoint import read_state_dict, write_safetensors_atomic
from nitro_ar.data import make_synthetic_dataset
from nitro_ar.dino import (
    DINO_GRID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    dino_feat_from_bytes,
    dino_feat_to_bytes,
    dino_features,
    dino_pixels,
    load_dino,
    precompute_dino_feat,
    resample_position_embeddings,
)
from nitro_ar.errors import CheckpointError, InvalidArgumentError
from nitro_ar.objectives_nitro_e import (
    FeatureDiscriminator,
    NitroEObjective,
    NitroESettings,
    StudentGenerator,
    build_projectors,
    draw_flow_step,
    loss_weighting,
    projection_loss,
    split_projector_state,
    timestep_density,
)
from nitro_ar.schedules import flow_schedule
from nitro_ar.train import Trainer, main, parse_config

TEXT_SHAPE = (16, 48)
# Reduced Nitro-E with one block per group: block 0 full attention, 1 ASA (4, 1), 2 ASA (4, 4).
MODEL = dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64, caption_channels=48,
             block_groups=[1, 1, 1], text_max_length=16)
Z_DIM = 32  # the tiny DINOv2's width


def tiny_model(seed: int = 0) -> NitroE:
    torch.manual_seed(seed)
    return NitroE(NitroEConfig(**MODEL))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), 32, text_shape=TEXT_SHAPE, shard_size=16, dino=True)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    """A tiny random DINOv2 (14 px patches, 37 x 37 table like ViT-B/14 at 518 px) saved as a hub folder."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino")
    Dinov2Model(Dinov2Config(hidden_size=Z_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=518, patch_size=14)).save_pretrained(path)
    return path


def train_args(data, out, **settings):
    flags = {"model": "nitro_e", "data_dir": data, "output_dir": out, "batch_size": 4, "max_steps": 3,
             "learning_rate": 1e-3, "warmup_steps": 0, "num_workers": 0, "progress": "false", "save_every": 1000,
             "model_config": json.dumps(MODEL), "text_length": TEXT_SHAPE[0]}
    flags.update(settings)
    args = []
    for key, value in flags.items():
        if value is not None:
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


def read_log(out):
    records = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


def checkpoint(out, step):
    return Path(out) / "checkpoints" / f"step-{step:08d}"


# --------------------------------------------------------------------------------------------
# the objective against the official code's formulas
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_timestep_density_matches_diffusers(scheme):
    settings = NitroESettings(weighting_scheme=scheme, logit_mean=0.3, logit_std=1.2)
    torch.manual_seed(5)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=64, logit_mean=0.3, logit_std=1.2,
                                              mode_scale=1.29)
    ours = timestep_density(64, torch.Generator().manual_seed(5), settings, 1000)
    assert torch.equal(ours, (u * 1000).long())


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt", "cosmap"])
def test_loss_weighting_matches_diffusers(scheme):
    sigmas = torch.rand(8, 1, 1, 1) * 0.9 + 0.05
    assert torch.allclose(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas).float())


def _official_losses(model, projectors, latents, text, empty, draws, dino, proj_coeff=0.5):
    """The official training step's loss, transcribed from ``train.py`` and ``core/loss.py``:
    scheduler timesteps / sigmas, ``token_drop``, token-layout prediction vs patchified target,
    REPA on the image tokens after block group 0."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    timesteps = sched.timesteps[draws.t_index]
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[step_indices].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * draws.noise
    y = torch.where(draws.text_drop[:, None, None], empty, text)
    # the official forward, group by group, keeping the group-0 tokens for the projectors
    h = model.pos_embed(noisy)
    temb = model.adaln_single(timesteps, h.dtype)
    c = model.context_embedder(y)
    h, c = model.run_group(0, h, c, temb)
    zs_tilde = [p(h) for p in projectors]
    skip = h
    h, c = model.run_group(1, model.compress(h), c, temb)
    h = model.reconstruct(h, skip) + model.pos_embed_lv0
    h, _ = model.run_group(2, h, c, temb)
    pred = model.proj_out(model.norm_out(h))  # (n, t, c): the official training output
    pred = pred.permute(0, 2, 1)[..., None]  # 'n t (p1 p2 c) -> n c t (p1 p2)', p = 1
    target = (draws.noise - latents).flatten(2)[..., None]  # patchify_and_apply_mask, p = 1
    weighting = compute_loss_weighting_for_sd3("logit_normal", sigmas)
    diff = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
    z_tilde, z = F.normalize(zs_tilde[0], dim=-1), F.normalize(dino, dim=-1)
    proj = (-1 * (z_tilde * z).sum(dim=-1).mean(-1)).mean()
    return diff, proj, diff + proj_coeff * proj


@pytest.mark.parametrize("checkpointing", [False, True])
def test_objective_is_the_official_loss(checkpointing):
    model = tiny_model().train()
    model.gradient_checkpointing = checkpointing
    torch.manual_seed(1)
    projectors = build_projectors(model.config.inner_dim, 64, (Z_DIM,))
    settings = NitroESettings(text_dropout=0.5)
    empty = torch.randn(1, *TEXT_SHAPE)
    latents, text, dino = torch.randn(4, 32, 16, 16), torch.randn(4, *TEXT_SHAPE), torch.randn(4, 256, Z_DIM)
    draws = draw_flow_step(model, settings, seed=3, step=2, positions=range(4))
    assert draws.text_drop.any() and not draws.text_drop.all()
    ours = NitroEObjective(model, empty, settings, projectors)(latents, text, draws, dino)
    diff, proj, total = _official_losses(model, projectors, latents, text, empty, draws, dino)
    torch.testing.assert_close(ours["diff_loss"], diff, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours["proj_loss"], proj, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours["loss"], total, rtol=1e-6, atol=1e-6)
    # gradients reach the projectors and the model through both terms
    ours["loss"].backward()
    assert projectors[0][0].weight.grad.abs().sum() > 0
    assert model.block_groups[0][0].scale_shift_bias.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(1)
        projectors = build_projectors(model.config.inner_dim, 64, (Z_DIM,))
        settings = NitroESettings()
        torch.manual_seed(2)
        latents, text, dino = torch.randn(2, 32, 16, 16), torch.randn(2, *TEXT_SHAPE), torch.randn(2, 256, Z_DIM)
        draws = draw_flow_step(model, settings, seed=0, step=0, positions=range(2))
        NitroEObjective(model, torch.zeros(1, *TEXT_SHAPE), settings, projectors)(latents, text, draws, dino)["loss"].backward()
        grads.append([p.grad.clone() for p in list(model.parameters()) + list(projectors.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_projection_loss_is_negative_cosine():
    z = torch.randn(2, 5, 8)
    assert projection_loss([z], [3 * z]).item() == pytest.approx(-1.0)
    assert projection_loss([z], [-z]).item() == pytest.approx(1.0)
    with pytest.raises(InvalidArgumentError, match="dino_feat"):
        projection_loss([z], [z[:, :4]])


def test_draws_do_not_depend_on_how_the_batch_is_split():
    model, settings = tiny_model(), NitroESettings()
    whole = draw_flow_step(model, settings, seed=1, step=7, positions=range(6), distill=True)
    parts = [draw_flow_step(model, settings, seed=1, step=7, positions=range(a, a + 3), distill=True) for a in (0, 3)]
    for name in ("noise", "t_index", "text_drop", "disc_noise", "disc_t_index"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(p, name) for p in parts])), name
    assert whole.t_index.max() < settings.student_steps


def test_projectors_have_the_official_names_and_are_not_in_the_model():
    model = tiny_model()
    projectors = build_projectors(model.config.inner_dim)
    objective = NitroEObjective(model, torch.zeros(1, *TEXT_SHAPE), NitroESettings(), projectors)
    names = {k: tuple(v.shape) for k, v in objective.state_dict().items() if k.startswith("projectors.")}
    d = model.config.inner_dim
    assert names == {"projectors.0.0.weight": (2048, d), "projectors.0.0.bias": (2048,),
                     "projectors.0.2.weight": (2048, 2048), "projectors.0.2.bias": (2048,),
                     "projectors.0.4.weight": (768, 2048), "projectors.0.4.bias": (768,)}
    assert not any(k.startswith("projectors.") for k in model.state_dict())
    state, proj = split_projector_state(objective.state_dict())
    assert set(proj) == {k[len("projectors."):] for k in names} and not any("projectors" in k for k in state)


# --------------------------------------------------------------------------------------------
# DINOv2 features
# --------------------------------------------------------------------------------------------
def test_dino_features_from_a_local_dinov2(dino_dir):
    from PIL import Image

    dino = load_dino(dino_dir)
    assert tuple(dino.embeddings.position_embeddings.shape) == (1, 1 + DINO_GRID**2, Z_DIM)
    assert not any(p.requires_grad for p in dino.parameters())
    images = [Image.new("RGB", (640, 512), (255, 255, 255)), Image.new("L", (300, 700), 0)]
    pixels = dino_pixels(images)
    assert pixels.shape == (2, 3, 224, 224)
    white = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(pixels[0], white[:, None, None].expand(3, 224, 224))
    feats = dino_features(dino, pixels)
    assert feats.shape == (2, 256, Z_DIM) and feats.dtype == torch.float32
    # the final LayerNorm's patch tokens (what x_norm_patchtokens is), [CLS] left out
    full = dino(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(feats, full[:, 1:])
    # MDS column round trip: float16 (256, 768)-style bytes per sample
    data = dino_feat_to_bytes(feats)
    assert len(data) == 2 and len(data[0]) == 256 * Z_DIM * 2
    torch.testing.assert_close(dino_feat_from_bytes(data[1], 256, Z_DIM), feats[1].half().float())
    with pytest.raises(InvalidArgumentError, match="bytes"):
        dino_feat_from_bytes(data[0][:-2], 256, Z_DIM)


def test_position_table_resampling_is_timm_bicubic_antialiased(dino_dir):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(dino_dir)
    table = model.embeddings.position_embeddings.detach().clone()
    resample_position_embeddings(model, 16)
    new = model.embeddings.position_embeddings
    assert torch.equal(new[:, :1], table[:, :1])  # [CLS] kept
    grid = table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 256, -1)
    torch.testing.assert_close(new[:, 1:], expected)
    # transformers' own (non-antialiased) interpolation differs, so it must not be what runs
    plain = F.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, -1)
    assert not torch.allclose(new[:, 1:], plain, atol=1e-3)
    assert torch.equal(model.embeddings.interpolate_pos_encoding(torch.zeros(1, 257, Z_DIM), 224, 224), new)


def test_load_dino_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_dino(tmp_path)


def test_precompute_dino_feat_adds_the_column(tmp_path, dino_dir):
    from PIL import Image
    from streaming.base.format import reader_from_json

    from nitro_ar.data import _writer, encode_sample, mds_columns

    images = [Image.new("RGB", (600, 512), (40 * i, 255 - 40 * i, 90)) for i in range(3)]
    with _writer(tmp_path / "src", mds_columns(512, images=True)) as writer:
        for i, image in enumerate(images):
            writer.write(encode_sample(f"prompt {i}", torch.randn(32, 16, 16), text=torch.randn(*TEXT_SHAPE), image=image))
    out = precompute_dino_feat(tmp_path / "src", tmp_path / "out", dino_dir, batch_size=2)
    index = json.loads((out / "index.json").read_text())
    reader = reader_from_json(str(out), None, index["shards"][0])
    src_index = json.loads((tmp_path / "src" / "index.json").read_text())
    stored = reader_from_json(str(tmp_path / "src"), None, src_index["shards"][0])
    decoded = [stored.get_item(i)["jpg"] for i in range(3)]  # JPEG-compressed: not the images written
    expected = dino_features(load_dino(dino_dir), dino_pixels(decoded)).half().float()
    for i in range(3):
        row = reader.get_item(i)
        assert row["caption"] == f"prompt {i}"
        torch.testing.assert_close(dino_feat_from_bytes(row["dino_feat"], 256, Z_DIM), expected[i])
    assert not list(tmp_path.glob(".*partial"))
    from nitro_ar.errors import DatasetError

    with pytest.raises(DatasetError, match="does not exist yet"):
        precompute_dino_feat(tmp_path / "src", tmp_path / "out", dino_dir)
    with pytest.raises(DatasetError, match="already has"):
        precompute_dino_feat(tmp_path / "out", tmp_path / "again", dino_dir)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
REPA = dict(repa_depth=0, projector_dim=64)


@pytest.mark.slow
def test_pretraining_with_repa_lowers_the_loss_and_exports_to_the_official_layout(data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(data_dir, out, max_steps=30, batch_size=8, learning_rate=2e-3, ema="true", ema_rate=0.9,
                           **REPA)) == 0
    log = read_log(out)
    first, last = (sum(log[s]["diff_loss"] for s in steps) / 3 for steps in ((1, 2, 3), (28, 29, 30)))
    assert last < 0.8 * first, (first, last)
    assert all(math.isfinite(log[s]["grad_norm"]) and math.isfinite(log[s]["proj_loss"]) for s in log)
    projectors = read_state_dict(checkpoint(out, 30) / "projectors.safetensors")
    assert sorted(projectors) == sorted(f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))
    model = NitroE.from_pretrained(checkpoint(out, 30) / "model")
    ema = NitroE.from_pretrained(checkpoint(out, 30) / "ema")
    assert model.config == NitroEConfig(**MODEL) and ema.config == model.config
    official = model.save_official(tmp_path / "official.safetensors")
    keys = set(read_state_dict(official))
    assert keys == set(model.state_dict()) and not any(k.startswith("projectors.") for k in keys)
    reloaded = NitroE.from_pretrained(official, config=NitroEConfig(**MODEL))
    x, t = torch.randn(1, 32, 16, 16), torch.randn(1, *TEXT_SHAPE)
    torch.testing.assert_close(reloaded(x, t, torch.tensor([500.0])), model(x, t, torch.tensor([500.0])))
    state = json.loads((checkpoint(out, 30) / "state.json").read_text())
    assert state["model"] == "nitro_e" and state["variant"] is None


@pytest.mark.slow
def test_resume_with_repa_matches_the_straight_run(data_dir, tmp_path):
    common = dict(ema="true", batch_size=8, **REPA)  # 4 steps of 8 cross the 32-sample epoch
    assert main(train_args(data_dir, tmp_path / "straight", max_steps=5, **common)) == 0
    assert main(train_args(data_dir, tmp_path / "resumed", max_steps=2, **common)) == 0
    assert main(train_args(data_dir, tmp_path / "resumed", max_steps=5, **common)) == 0
    ours, ref = read_log(tmp_path / "resumed"), read_log(tmp_path / "straight")
    for step in range(1, 6):
        for key in ("loss", "proj_loss", "grad_norm"):
            assert ours[step][key] == pytest.approx(ref[step][key], rel=1e-6, abs=1e-7), (step, key)
    for part in ("model/model.safetensors", "ema/model.safetensors", "optimizer.safetensors", "projectors.safetensors"):
        a, b = read_state_dict(checkpoint(tmp_path / "resumed", 5) / part), read_state_dict(checkpoint(tmp_path / "straight", 5) / part)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_fast_path_matches_the_eager_loss_curve(data_dir, tmp_path, caplog):
    # Under the suite's TRITON_INTERPRET=1 the fast path runs kernels 1 (AdaLN-affine fused norm)
    # and 2 (joint attention with ASA), forward and backward, in the Triton interpreter.
    import logging

    import nitro_ar.fast

    assert main(train_args(data_dir, tmp_path / "eager", fast="false", max_steps=3, batch_size=2, **REPA)) == 0
    with caplog.at_level(logging.INFO, logger="nitro_ar.train"):
        trainer = Trainer(parse_config(train_args(data_dir, tmp_path / "fast", fast="true", max_steps=3, batch_size=2, **REPA)))
        assert trainer.fast_active and nitro_ar.fast.backend_of(trainer.model) == "interpret"
        trainer.train()
    eager, fast = read_log(tmp_path / "eager"), read_log(tmp_path / "fast")
    for step in range(1, 4):
        assert fast[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-4)
        assert fast[step]["proj_loss"] == pytest.approx(eager[step]["proj_loss"], rel=1e-4, abs=1e-6)
        assert fast[step]["grad_norm"] == pytest.approx(eager[step]["grad_norm"], rel=1e-3)


def test_bf16_and_gradient_checkpointing_run(data_dir, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier runs in this process fixed fp32
    try:
        assert main(train_args(data_dir, tmp_path / "a", mixed_precision="bf16", gradient_checkpointing="true",
                               max_steps=2, grad_clip=0.5)) == 0
    finally:  # Accelerate's precision is process-global: later runs use fp32 again
        AcceleratorState._reset_state(reset_partial_state=True)
    log = read_log(tmp_path / "a")
    assert all(math.isfinite(log[s]["loss"]) for s in (1, 2))


def test_official_stage1_file_with_projectors(data_dir, tmp_path):
    """An official stage-1 file carries ``projectors.*``: REPA continues with them; pre-training
    without REPA (stage 2) drops them, as the official code does."""
    model = tiny_model(seed=3)
    projectors = build_projectors(model.config.inner_dim, 64)
    state = {**model.state_dict(), **{f"projectors.{k}": v for k, v in projectors.state_dict().items()}}
    write_safetensors_atomic(state, tmp_path / "stage1.safetensors")
    with pytest.raises(CheckpointError, match="projectors"):
        NitroE.from_pretrained(tmp_path / "stage1.safetensors", config=NitroEConfig(**MODEL))
    args = train_args(data_dir, tmp_path / "stage2", init_from=tmp_path / "stage1.safetensors", model_config=None,
                      max_steps=1, ema="true")
    trainer = Trainer(parse_config(args))
    assert trainer.family.projectors is None
    for key, value in model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value)
    trainer = Trainer(parse_config(args[:-2] + ["--output-dir", str(tmp_path / "repa"), "--repa-depth", "8",
                                                "--projector-dim", "64"]))
    for key, value in projectors.state_dict().items():
        assert torch.equal(trainer.family.projectors.state_dict()[key], value)


# --------------------------------------------------------------------------------------------
# few-step distillation
# --------------------------------------------------------------------------------------------
def test_distillation_pieces():
    student, teacher = tiny_model(0).train(), tiny_model(1)
    settings = NitroESettings()
    gen = StudentGenerator(student, torch.zeros(1, *TEXT_SHAPE), settings)
    schedule = flow_schedule(4)
    assert torch.equal(gen.student_timesteps, schedule.timesteps) and torch.equal(gen.student_sigmas, schedule.sigmas[:4])
    latents, text = torch.randn(2, 32, 16, 16), torch.randn(2, *TEXT_SHAPE)
    draws = draw_flow_step(student, settings, seed=0, step=0, positions=range(2), distill=True)
    x0, diff, text_in = gen(latents, text, draws)
    sigma = schedule.sigmas[draws.t_index].view(-1, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * draws.noise
    with torch.no_grad():
        v = student(noisy, text_in, schedule.timesteps[draws.t_index])
    torch.testing.assert_close(x0.detach(), noisy - sigma * v)
    torch.testing.assert_close(diff.detach(), ((v - (draws.noise - latents)) ** 2).mean())
    disc = FeatureDiscriminator(teacher.requires_grad_(False).eval(), hidden=16)
    assert all(k.startswith("heads.") for k in disc.state_dict())
    logits = disc(*gen.renoise(x0, draws)[:1], text_in, gen.renoise(x0, draws)[1])
    assert logits.shape == (2, 256 + 80 + 256)
    logits.sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.proj_out.weight.grad.abs().sum() > 0  # through the frozen extractor to the student


@pytest.mark.slow
def test_distill_mode_trains_the_student_and_resumes(data_dir, tmp_path):
    teacher = tiny_model(seed=5)
    teacher.save_pretrained(tmp_path / "teacher")
    common = dict(mode="distill", init_from=tmp_path / "teacher", model_config=None, disc_hidden=16, batch_size=2)
    assert main(train_args(data_dir, tmp_path / "straight", max_steps=2, **common)) == 0
    assert main(train_args(data_dir, tmp_path / "resumed", max_steps=1, **common)) == 0
    assert main(train_args(data_dir, tmp_path / "resumed", max_steps=2, **common)) == 0
    ours, ref = read_log(tmp_path / "resumed"), read_log(tmp_path / "straight")
    for step in (1, 2):
        for key in ("loss", "g_loss", "d_loss", "diff_loss"):
            assert ours[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), (step, key)
    student = NitroE.from_pretrained(checkpoint(tmp_path / "straight", 2) / "model")
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])]
    assert moved
    heads = read_state_dict(checkpoint(tmp_path / "straight", 2) / "discriminator.safetensors")
    assert heads and all(k.startswith("heads.") for k in heads)
    latents = student.generate(torch.randn(1, *TEXT_SHAPE), steps=4, cfg=1.0, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (1, 32, 16, 16) and torch.isfinite(latents).all()


def test_bad_settings_are_config_errors(data_dir, tmp_path):
    from nitro_ar.errors import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        parse_config(train_args(data_dir, tmp_path, mode="adversarial"))
    with pytest.raises(ConfigError, match="variant"):
        parse_config(train_args(data_dir, tmp_path, variant="gan"))
    with pytest.raises(ConfigError, match="init_from"):
        Trainer(parse_config(train_args(data_dir, tmp_path, mode="distill")))
    assert main(train_args(data_dir, tmp_path / "x", weighting_scheme="bogus")) == 2


def test_example_configs_are_the_official_stages():
    root = Path(__file__).resolve().parents[1] / "configs"
    one, two, distill = (parse_config([str(root / f"nitro_e_{name}.yaml")]) for name in ("stage1", "stage2", "distill"))
    # default_config.yaml + emmdit_512train_step1.yaml
    assert (one.model, one.mode, one.repa_depth, one.projector_dim, one.z_dims, one.proj_coeff) == (
        "nitro_e", "pretrain", 8, 2048, [768], 0.5)
    assert (one.learning_rate, one.grad_clip, one.ema, one.max_steps, one.batch_size, one.warmup_steps) == (
        3e-4, 0.5, False, 100000, 256, 500)
    assert (one.weight_decay, one.adam_eps, one.text_dropout, one.text_length, one.mixed_precision) == (0.03, 1e-10, 0.1, 128, "bf16")
    assert (one.weighting_scheme, one.logit_mean, one.logit_std, one.mode_scale) == ("logit_normal", 0.0, 1.0, 1.29)
    # + emmdit_512train_step2.yaml
    assert (two.repa_depth, two.learning_rate, two.grad_clip, two.ema, two.ema_rate, two.max_steps) == (-1, 1e-4, 1.0, True, 0.9999, 50000)
    assert two.init_from and two.data_streams == one.data_streams
    assert (distill.mode, distill.student_steps, distill.max_steps) == ("distill", 4, 20000)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_doubled_batch(data_dir, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "nitro_ar.train", *train_args(data_dir, two, batch_size=2, max_steps=2, **REPA)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((checkpoint(two, 2) / "state.json").read_text())["num_processes"] == 2
    one = tmp_path / "one"
    assert main(train_args(data_dir, one, batch_size=4, max_steps=2, **REPA)) == 0
    log_two, log_one = read_log(two), read_log(one)
    for step in (1, 2):
        for key in ("loss", "proj_loss"):
            assert log_two[step][key] == pytest.approx(log_one[step][key], rel=1e-5, abs=1e-6), (step, key)
    for part in ("model/model.safetensors", "projectors.safetensors"):
        a, b = read_state_dict(checkpoint(two, 2) / part), read_state_dict(checkpoint(one, 2) / part)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
