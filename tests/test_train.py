"""Training: the official objective (checked against an independent transcription of the
official loss), the Accelerate loop over MDS data (loss drop, exact resume after a kill across
epochs, two processes vs one, gradient accumulation, EMA, the fast path and its fallback),
adversarial head fine-tuning, and clear errors for data that does not fit."""
import dataclasses
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

import nitro_ar.fast
from factories import TINY_AR, tiny_ar_config
from nitro_ar import NitroAR
from nitro_ar.checkpoint import CheckpointError, read_state_dict
from nitro_ar.data import DatasetError, make_synthetic_dataset
from nitro_ar.objectives import (
    HeadGenerator,
    MaskedARObjective,
    ObjectiveSettings,
    TokenDiscriminator,
    discriminator_loss,
    draw_step,
    freeze_all_but_head,
    generator_loss,
    logit_normal_timestep_indices,
    num_masked_tokens,
    sample_mask_ratio,
    training_timesteps,
)
from nitro_ar.train import ConfigError, Trainer, main, parse_config

ROOT = Path(__file__).resolve().parents[1]
TEXT_SHAPE = (16, 48)
MODEL = TINY_AR  # the reduced test model of tests/factories.py (config JSON of the CLI runs)


# Weights after Adam steps computed with another summation order (micro-batches, processes):
# Adam divides each gradient element by its running RMS, so an element whose gradient is ~0
# can move by a sizeable fraction of one step (lr 1e-3) on rounding alone.
ADAM_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def tiny_model(variant: str, seed: int = 0) -> NitroAR:
    torch.manual_seed(seed)
    return NitroAR(tiny_ar_config(variant))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), 64, text_shape=TEXT_SHAPE, shard_size=32)


def train_args(data, out, **settings):
    """Command-line flags of a quick CPU run; ``settings`` override (None removes a flag)."""
    flags = {"data_dir": data, "output_dir": out, "batch_size": 4, "max_steps": 3, "learning_rate": 1e-3,
             "warmup_steps": 0, "num_workers": 0, "progress": "false", "save_every": 1000,
             "text_length": TEXT_SHAPE[0], "model_config": json.dumps(MODEL)}
    flags.update(settings)
    args = []
    for key, value in flags.items():
        if value is not None:
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


def read_log(out):
    """{step: metrics}; when a step was logged twice (a killed run redone), the last one wins."""
    records = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


def checkpoint(out, step):
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def assert_same_tensors(a, b, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


# --------------------------------------------------------------------------------------------
# the objective's pieces against diffusers and the official formulas
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_timesteps_match_diffusers_scheduler(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    timesteps, sigmas = training_timesteps(1000, shift)
    assert torch.equal(timesteps, sched.timesteps) and torch.equal(sigmas, sched.sigmas[:1000])


def test_logit_normal_timesteps_match_diffusers():
    ours = logit_normal_timestep_indices(5000, torch.Generator().manual_seed(3), 1000, 0.0, 1.0)
    u = compute_density_for_timestep_sampling("logit_normal", 5000, 0.0, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, (u * 1000).long())


def _normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_mar_mask_ratio_is_the_truncated_normal():
    gen = torch.Generator().manual_seed(0)
    ratios = torch.tensor([sample_mask_ratio(gen, "mar", 0.7) for _ in range(4000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    a = (0.7 - 1.0) / 0.25
    mass = 0.5 - _normal_cdf(a)
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = 1.0 + 0.25 * (pdf(a) - pdf(0.0)) / mass
    assert abs(ratios.mean().item() - mean) < 0.006
    below_09 = (_normal_cdf((0.9 - 1.0) / 0.25) - _normal_cdf(a)) / mass
    assert abs((ratios < 0.9).float().mean().item() - below_09) < 0.03


def test_maskgit_mask_ratio_is_the_cosine_rule():
    gen = torch.Generator().manual_seed(0)
    ratios = torch.tensor([sample_mask_ratio(gen, "maskgit", 0.7) for _ in range(4000)])
    assert ratios.min() >= 0.0 and ratios.max() <= 1.0
    assert abs(ratios.mean().item() - 2 / math.pi) < 0.015


def test_num_masked_is_the_ceiling():
    assert num_masked_tokens(256, 0.7) == 180 and num_masked_tokens(256, 0.70001) == 180
    assert num_masked_tokens(256, 0.7032) == 181 and num_masked_tokens(256, 1.0) == 256
    assert num_masked_tokens(256, 0.0) == 1


def test_draws_do_not_depend_on_how_the_batch_is_split():
    model, settings = tiny_model("gan"), ObjectiveSettings()
    whole = draw_step(model, settings, seed=5, step=7, positions=range(4))
    halves = [draw_step(model, settings, seed=5, step=7, positions=range(i, i + 2)) for i in (0, 2)]
    assert whole.num_masked == halves[0].num_masked == halves[1].num_masked
    for name in ("orders", "text_drop", "noise", "t_index"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves]))
    again = draw_step(model, settings, seed=5, step=7, positions=range(4))
    assert torch.equal(again.noise, whole.noise)
    assert not torch.equal(draw_step(model, settings, seed=5, step=8, positions=range(4)).noise, whole.noise)
    assert whole.noise.shape == (4, 2, 256, 32) and whole.t_index.shape == (4, 2, 256)
    mask = whole.mask()
    assert (mask.sum(1) == whole.num_masked).all()
    assert mask.gather(1, whole.orders[:, : whole.num_masked]).all()


def _batch(variant, batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 32, 16, 16, generator=gen)
    text = torch.randn(batch, *TEXT_SHAPE, generator=gen)
    empty = torch.randn(1, *TEXT_SHAPE, generator=gen)
    thumbs = torch.randn(batch, 32, 1, 1, generator=gen) if variant == "joint_gan" else None
    return latents, text, empty, thumbs


def _official_inputs(model, latents, text, empty, draws, thumbs, dependency=False):
    """Masking and text dropout written out as the official forward does them."""
    batch, seq = latents.shape[0], model.seq_len
    tokens = latents.reshape(batch, 32, seq).permute(0, 2, 1)
    mask = torch.zeros(batch, seq)
    for b in range(batch):
        mask[b, draws.orders[b, : draws.num_masked]] = 1
    text = text.clone()
    text[draws.text_drop] = empty[0]
    fill = model.mask_token
    if thumbs is not None and (dependency or draws.num_masked == seq):
        fill = thumbs.reshape(batch, 1, 32)
    return tokens, torch.where(mask[..., None].bool(), fill, tokens), text, mask


def test_gan_loss_is_the_official_loss():
    model, settings = tiny_model("gan"), ObjectiveSettings(text_dropout=0.5)
    latents, text, empty, _ = _batch("gan")
    draws = draw_step(model, settings, seed=0, step=3, positions=range(3))
    assert draws.text_drop.any() and not draws.text_drop.all()
    ours = MaskedARObjective(model, empty, settings)(latents, text, draws)["loss"]

    # The official DiffLoss: every token, repeated diffusion_batch_mul times, weighted by the mask.
    tokens, inputs, text_in, mask = _official_inputs(model, latents, text, empty, draws, None)
    z = model.backbone(inputs, text_in)
    rep = settings.diffusion_batch_mul
    target = tokens.reshape(-1, 32).repeat(rep, 1)
    cond = z.reshape(target.shape[0] // rep, -1).repeat(rep, 1)
    weight = mask.reshape(-1).repeat(rep)
    noise = draws.noise.permute(1, 0, 2, 3).reshape(-1, 32)
    index = draws.t_index.permute(1, 0, 2).reshape(-1)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sigma = sched.sigmas[index][:, None]
    v = model.head((1 - sigma) * target + sigma * noise, sched.timesteps[index], cond)
    per_row = ((v - (noise - target)) ** 2).mean(1)
    expected = (per_row * weight).sum() / weight.sum()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("full_mask, dependency", [(False, False), (True, False), (False, True)])
def test_joint_loss_is_the_official_loss(full_mask, dependency):
    model = tiny_model("joint_gan")
    settings = ObjectiveSettings(diffusion_batch_mul=1, text_dropout=0.5, global_token_dependency=dependency)
    latents, text, empty, thumbs = _batch("joint_gan")
    draws = draw_step(model, settings, seed=0, step=3, positions=range(3))
    if full_mask:
        draws = dataclasses.replace(draws, num_masked=model.seq_len)
    out = MaskedARObjective(model, empty, settings)(latents, text, draws, thumbs)

    tokens, inputs, text_in, mask = _official_inputs(model, latents, text, empty, draws, thumbs, dependency)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    index = draws.t_index[:, 0, 0]
    sigma, noise = sched.sigmas[index][:, None, None], draws.noise[:, 0]
    v = model.head((1 - sigma) * tokens + sigma * noise, sched.timesteps[index], model.backbone(inputs, text_in))
    per_token = ((v - (noise - tokens)) ** 2).mean(-1)
    image = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    g_index, g_noise, g0 = draws.global_t_index, draws.global_noise, thumbs.reshape(3, 1, 32)
    g_sigma = sched.sigmas[g_index][:, None, None]
    g_v = model.global_head((1 - g_sigma) * g0 + g_sigma * g_noise, sched.timesteps[g_index], model.global_backbone(text_in))
    glob = ((g_v - (g_noise - g0)) ** 2).mean()
    torch.testing.assert_close(out["image_loss"], image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["global_loss"], glob, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], image + glob)


def test_text_dropout_uses_the_empty_prompt():
    model = tiny_model("gan")
    latents, text, empty, _ = _batch("gan")
    dropped = ObjectiveSettings(text_dropout=1.0)
    kept = ObjectiveSettings(text_dropout=0.0)
    draws = draw_step(model, dropped, seed=0, step=0, positions=range(3))
    assert draws.text_drop.all()
    with_empty = MaskedARObjective(model, empty, dropped)(latents, text, draws)["loss"]
    draws.text_drop.zero_()
    reference = MaskedARObjective(model, empty, kept)(latents, empty.expand_as(text), draws)["loss"]
    assert torch.equal(with_empty, reference)


@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_adversarial_pieces(variant):
    model = tiny_model(variant)
    head = freeze_all_but_head(model)
    assert {id(p) for p in head} == {id(p) for p in model.diffloss.parameters()}
    settings = ObjectiveSettings(diffusion_batch_mul=1)
    latents, text, empty, thumbs = _batch(variant)
    draws = draw_step(model, settings, seed=0, step=0, positions=range(3))
    fake, real, text_in, mask = HeadGenerator(model, empty, settings, head_steps=2)(latents, text, draws, thumbs)
    assert torch.equal(fake[~mask], real[~mask]) and not torch.equal(fake[mask], real[mask])
    # The generated tokens are the head's few-step samples from the draws' noise.
    full = variant == "joint_gan" and draws.num_masked == model.seq_len
    fill = thumbs.reshape(3, 1, 32) if full else model.mask_token
    with torch.no_grad():
        z = model.backbone(torch.where(mask[..., None], fill, real), text_in)
        noise = draws.noise[:, 0]
        if variant == "gan":
            expected = model.head_sample(z[mask], num_steps=2, noise=noise[mask])
        else:
            expected = model.head_sample(z, num_steps=2, noise=noise)[mask]
    torch.testing.assert_close(fake[mask].detach(), expected, rtol=1e-5, atol=1e-6)
    disc = TokenDiscriminator(model, hidden=32)
    assert {n for n, _ in disc.named_parameters()} == {f"score.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")}
    g_loss = generator_loss(disc(fake, text_in, mask))
    g_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    real_logits, fake_logits = disc(real, text_in, mask), disc(fake.detach(), text_in, mask)
    assert real_logits.shape == (int(mask.sum()),)
    d_loss = discriminator_loss(real_logits, fake_logits)
    expected = torch.nn.functional.softplus(-real_logits).mean() + torch.nn.functional.softplus(fake_logits).mean()
    torch.testing.assert_close(d_loss, expected)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_fifty_steps_lower_the_loss(data_dir, tmp_path, variant):
    args = train_args(data_dir, tmp_path / "run", variant=variant, max_steps=50, batch_size=2, learning_rate=3e-3)
    assert main(args) == 0
    log = read_log(tmp_path / "run")
    losses = torch.tensor([log[s]["loss"] for s in range(1, 51)])
    assert torch.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.8 * first, f"loss {first:.3f} -> {last:.3f}"
    if variant == "joint_gan":
        assert log[50]["global_loss"] < log[1]["global_loss"]
    loaded = NitroAR.from_pretrained(checkpoint(tmp_path / "run", 50) / "model")
    assert loaded.config.variant == variant


def test_gradient_accumulation_matches_the_larger_batch(data_dir, tmp_path):
    assert main(train_args(data_dir, tmp_path / "big", max_steps=2)) == 0
    assert main(train_args(data_dir, tmp_path / "acc", max_steps=2, batch_size=2, gradient_accumulation_steps=2)) == 0
    big, acc = read_log(tmp_path / "big"), read_log(tmp_path / "acc")
    for step in (1, 2):
        assert big[step]["loss"] == pytest.approx(acc[step]["loss"], rel=1e-5)
    assert_same_tensors(read_state_dict(checkpoint(tmp_path / "big", 2) / "model" / "model.safetensors"),
                        read_state_dict(checkpoint(tmp_path / "acc", 2) / "model" / "model.safetensors"),
                        **ADAM_TOLERANCE)


def test_ema_and_checkpoint_layout(data_dir, tmp_path):
    init = tiny_model("gan", seed=4)
    init.save_pretrained(tmp_path / "init")
    args = train_args(data_dir, tmp_path / "run", model_config=None, init_from=tmp_path / "init",
                      max_steps=2, save_every=1, keep_checkpoints=1, ema="true", ema_rate=0.5)
    assert main(args) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002"]
    assert (ckpts / "latest").read_text() == "step-00000002"
    assert not list(ckpts.glob(".*partial"))
    state = json.loads((checkpoint(tmp_path / "run", 2) / "state.json").read_text())
    assert state["step"] == 2 and state["samples_consumed"] == 8 and state["mode"] == "pretrain"
    # EMA with rate 1/2 after two steps: (w0 / 2 + w1 / 2) / 2 + w2 / 2; recover w1 from a rerun to step 1.
    assert main(train_args(data_dir, tmp_path / "one", model_config=None, init_from=tmp_path / "init", max_steps=1)) == 0
    w0 = init.state_dict()
    w1 = read_state_dict(checkpoint(tmp_path / "one", 1) / "model" / "model.safetensors")
    w2 = read_state_dict(checkpoint(tmp_path / "run", 2) / "model" / "model.safetensors")
    ema = NitroAR.from_pretrained(checkpoint(tmp_path / "run", 2) / "ema").state_dict()
    expected = {k: 0.25 * w0[k] + 0.25 * w1[k] + 0.5 * w2[k] for k in w2}
    assert_same_tensors(ema, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_after_a_kill_matches_the_straight_run(tmp_path):
    # 20 samples, 5 batches an epoch: the 8 steps cross an epoch boundary, the kill is mid-epoch.
    data_dir = make_synthetic_dataset(tmp_path / "data", 20, text_shape=TEXT_SHAPE, shard_size=8)
    # Straight: 8 steps in one go.
    straight = tmp_path / "straight"
    assert main(train_args(data_dir, straight, max_steps=8)) == 0

    # Killed: the same run with a checkpoint every 3 steps, SIGKILLed once step 3 is saved.
    killed = tmp_path / "killed"
    args = train_args(data_dir, killed, max_steps=8, save_every=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nitro_ar.train", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        latest = killed / "checkpoints" / "latest"
        deadline = time.monotonic() + 240
        while not (latest.is_file() and latest.read_text() == "step-00000003"):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no checkpoint at step 3"
            time.sleep(0.01)
        proc.kill()
        proc.wait()
    assert proc.returncode == -9
    assert latest.read_text() == "step-00000003" and not checkpoint(killed, 6).exists()

    # Resume (auto: from checkpoints/latest) to step 8.
    assert main(args) == 0
    ours, reference = read_log(killed), read_log(straight)
    assert sorted(ours) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "grad_norm"):
            assert ours[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-7), (step, key)
    for part in ("model/model.safetensors", "ema/model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(read_state_dict(checkpoint(killed, 8) / part), read_state_dict(checkpoint(straight, 8) / part),
                            rtol=1e-6, atol=1e-7)
    for name in ("optimizer.json",):
        assert json.loads((checkpoint(killed, 8) / name).read_text()) == json.loads((checkpoint(straight, 8) / name).read_text())
    resumed = json.loads((checkpoint(killed, 8) / "state.json").read_text())["data"]
    assert resumed == json.loads((checkpoint(straight, 8) / "state.json").read_text())["data"]
    assert resumed["streaming"]["epoch"] == 1 and resumed["streaming"]["sample_in_epoch"] == 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_doubled_batch(data_dir, tmp_path):
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               "-m", "nitro_ar.train", *train_args(data_dir, two, batch_size=2, max_steps=3)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((checkpoint(two, 3) / "state.json").read_text())["num_processes"] == 2

    one = tmp_path / "one"
    assert main(train_args(data_dir, one, batch_size=4, max_steps=3)) == 0
    log_two, log_one = read_log(two), read_log(one)
    for step in (1, 2, 3):
        assert log_two[step]["loss"] == pytest.approx(log_one[step]["loss"], rel=1e-5)
    assert_same_tensors(read_state_dict(checkpoint(two, 3) / "model" / "model.safetensors"),
                        read_state_dict(checkpoint(one, 3) / "model" / "model.safetensors"), **ADAM_TOLERANCE)


def test_fast_path_matches_the_eager_loss_curve(data_dir, tmp_path, caplog):
    # Under the test suite's TRITON_INTERPRET=1 the fast path runs its kernels (forward and
    # backward) in the Triton interpreter: slow, so a short curve.
    assert main(train_args(data_dir, tmp_path / "eager", fast="false", max_steps=3, batch_size=2)) == 0
    with caplog.at_level(logging.INFO, logger="nitro_ar.train"):
        assert main(train_args(data_dir, tmp_path / "fast", fast="true", max_steps=3, batch_size=2)) == 0
    assert any("fast path" in r.getMessage() for r in caplog.records), "the fast path was not used"
    eager, fast = read_log(tmp_path / "eager"), read_log(tmp_path / "fast")
    for step in range(1, 4):
        assert fast[step]["loss"] == pytest.approx(eager[step]["loss"], rel=2e-3)


def _one_step_config(data_dir, out, **kw):
    return parse_config(train_args(data_dir, out, max_steps=1, **kw))


def test_fast_path_is_used_when_it_works(data_dir, tmp_path, monkeypatch):
    calls = []

    def identity(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(nitro_ar.fast, "accelerate", identity, raising=False)
    trainer = Trainer(_one_step_config(data_dir, tmp_path / "a", fast="true"))
    assert trainer.fast_active and calls == [{"graphs": False}]
    assert not Trainer(_one_step_config(data_dir, tmp_path / "b", fast="false")).fast_active


def test_fast_path_failure_falls_back_to_eager_with_a_log_line(data_dir, tmp_path, monkeypatch, caplog):
    def broken(model, **kwargs):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(nitro_ar.fast, "accelerate", broken, raising=False)
    with caplog.at_level(logging.WARNING, logger="nitro_ar.train"):
        trainer = Trainer(_one_step_config(data_dir, tmp_path / "a", fast="true"))
    assert not trainer.fast_active
    lines = [r.getMessage() for r in caplog.records if "eager reference" in r.getMessage()]
    assert len(lines) == 1 and "no kernel for this shape" in lines[0]
    assert math.isfinite(trainer.train_step()["loss"])

    monkeypatch.delattr(nitro_ar.fast, "accelerate")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nitro_ar.train"):
        assert not Trainer(_one_step_config(data_dir, tmp_path / "b", fast="true")).fast_active
    assert any("not available" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_adversarial_mode_updates_only_the_head_and_saves_a_loadable_checkpoint(data_dir, tmp_path, variant):
    init = tiny_model(variant, seed=2)
    init.save_pretrained(tmp_path / "init")
    out = tmp_path / "adv"
    args = train_args(data_dir, out, model_config=None, init_from=tmp_path / "init", mode="adversarial",
                      max_steps=2, batch_size=2)
    assert main(args) == 0
    log = read_log(out)
    assert all(math.isfinite(log[s][k]) for s in (1, 2) for k in ("g_loss", "d_loss", "d_real", "d_fake"))
    tuned = NitroAR.from_pretrained(checkpoint(out, 2) / "model")
    before, after = init.state_dict(), tuned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("diffloss.net.") for k in changed)
    assert sum(k.startswith("diffloss.net.") for k in changed) > len(changed) // 2
    assert read_state_dict(checkpoint(out, 2) / "discriminator.safetensors")
    assert not (checkpoint(out, 2) / "ema").exists()  # off by default for fine-tuning
    latents = tuned.generate(torch.randn(1, *TEXT_SHAPE), ar_steps=2, cfg=1.0, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (1, 32, 16, 16) and torch.isfinite(latents).all()


# --------------------------------------------------------------------------------------------
# configuration and errors
# --------------------------------------------------------------------------------------------
def test_yaml_config_with_flag_overrides(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("data_dir: /data\noutput_dir: /out\nvariant: joint_gan\nmax_steps: 100\n"
                      "model_config: {num_attention_heads: 2}\nema: false\n")
    cfg = parse_config([str(config), "--max-steps", "7", "--grad-clip", "0.5"])
    assert (cfg.data_dir, cfg.variant, cfg.max_steps, cfg.grad_clip, cfg.ema) == ("/data", "joint_gan", 7, 0.5, False)
    assert cfg.model_config == {"num_attention_heads": 2} and cfg.learning_rate == 1e-4
    assert (cfg.weight_decay, cfg.adam_eps) == (0.03, 1e-10)
    config.write_text("data_dir: /data\noutput_dir: /out\nlearning_rte: 1\n")
    with pytest.raises(ConfigError, match="learning_rte"):
        parse_config([str(config)])
    with pytest.raises(ConfigError, match="mode must be one of"):
        parse_config(["--data-dir", "d", "--output-dir", "o", "--mode", "finetune"])


def test_adversarial_mode_needs_a_trained_model(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="pass init_from"):
        Trainer(_one_step_config(data_dir, tmp_path / "o", mode="adversarial"))


def test_text_width_mismatch_is_a_clear_error(tmp_path, caplog):
    data = make_synthetic_dataset(tmp_path / "d", 4, text_shape=(16, 32), shard_size=4)
    with pytest.raises(DatasetError, match=r"shard\.00000\.mds: 'text_feat' holds 16 x 32 .* expected 16 x 48 \(the model's "
                                           r"caption_channels"):
        Trainer(_one_step_config(data, tmp_path / "o"))
    with caplog.at_level(logging.ERROR, logger="nitro_ar.train"):
        assert main(train_args(data, tmp_path / "o", max_steps=1)) == 2
    assert any("caption_channels" in r.getMessage() for r in caplog.records)


def test_latent_shape_mismatch_is_a_clear_error(tmp_path):
    data = make_synthetic_dataset(tmp_path / "d", 4, latent_shape=(32, 8, 8), text_shape=TEXT_SHAPE, shard_size=4)
    with pytest.raises(DatasetError, match=r"no 'latents_512' column .* the dataset has \['latents_256'\]"):
        Trainer(_one_step_config(data, tmp_path / "o"))


def test_joint_training_needs_thumbnails(tmp_path):
    data = make_synthetic_dataset(tmp_path / "d", 4, text_shape=TEXT_SHAPE, thumbnails=False, shard_size=4)
    with pytest.raises(DatasetError, match="no 'nitro_thumb_latent' column .*joint_gan global token"):
        Trainer(_one_step_config(data, tmp_path / "o", variant="joint_gan"))


def test_missing_or_corrupt_shard_is_a_named_error(tmp_path, caplog):
    data = make_synthetic_dataset(tmp_path / "d", 8, text_shape=TEXT_SHAPE, shard_size=4)
    shard = data / "shard.00001.mds"
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0xFF  # same size, other bytes: only the checksum sees it
    shard.write_bytes(bytes(blob))
    trainer = Trainer(_one_step_config(data, tmp_path / "o"))
    with pytest.raises(DatasetError, match=r"shard\.00001\.mds: xxh64 checksum mismatch"):
        for _ in range(2):
            trainer.train_step()
    shard.unlink()
    with caplog.at_level(logging.ERROR, logger="nitro_ar.train"):
        assert main(train_args(data, tmp_path / "o2", max_steps=1)) == 2
    assert any("shard.00001.mds: missing" in r.getMessage() for r in caplog.records)




# --------------------------------------------------------------------------------------------
# crash safety: re-saving a step, resume fallback, log and RNG after a resume, non-finite losses
# --------------------------------------------------------------------------------------------
class SimulatedKill(BaseException):
    """Raised at a crash point: like SIGKILL, nothing up the stack cleans up for it."""


def _crash_at(monkeypatch, stage):
    from nitro_ar.kernels import atomic_files

    def crash_point(name):
        if name == stage:
            raise SimulatedKill(stage)

    monkeypatch.setattr(atomic_files, "crash_point", crash_point)


def _samples_in(path):
    return json.loads((path / "state.json").read_text())["samples_consumed"]


RESAVE_STAGES = [(True, "file-written"), (True, "dir-built"), (True, "dir-exchanged"), (True, "dir-committed"),
                 (True, "checkpoint-committed"), (True, "latest-written"), (False, "dir-aside")]


def test_a_crash_while_re_saving_a_step_leaves_a_resumable_checkpoint(data_dir, tmp_path, monkeypatch, caplog):
    from nitro_ar.kernels import atomic_files
    from nitro_ar.train import _checkpoint_problem

    trainer = Trainer(_one_step_config(data_dir, tmp_path / "o", save_every=1))
    trainer.train_step()
    first = trainer.save_checkpoint()
    ckpts = first.parent
    for exchange, stage in RESAVE_STAGES:
        old = _samples_in(first)
        trainer.samples_consumed += 1  # the re-saved copy is told apart by its state
        with monkeypatch.context() as patch:
            _crash_at(patch, stage)
            if not exchange:
                patch.setattr(atomic_files, "_exchange", lambda a, b: False)
            with pytest.raises(SimulatedKill):
                trainer.save_checkpoint()
        with caplog.at_level(logging.WARNING, logger="nitro_ar.train"):
            found = trainer._find_resume()  # also sweeps what the "killed" save left
        assert found == first and _checkpoint_problem(found) is None, stage
        assert _samples_in(found) in (old, trainer.samples_consumed), stage
        assert (ckpts / "latest").read_text() == first.name
        NitroAR.from_pretrained(found / "model")
        # Only temporaries of a live writer may stay (here: this process, the "killed" one).
        kept = [p.name for p in ckpts.iterdir() if not atomic_files.is_temp(p)]
        assert sorted(kept) == ["latest", first.name], stage


def test_resume_falls_back_to_the_newest_complete_checkpoint(data_dir, tmp_path, caplog):
    trainer = Trainer(parse_config(train_args(data_dir, tmp_path / "o", max_steps=2)))
    trainer.train_step()
    one = trainer.save_checkpoint()
    trainer.train_step()
    two = trainer.save_checkpoint()
    latest = one.parent / "latest"
    assert trainer._find_resume() == two

    def fallback(expected, message):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nitro_ar.train"):
            assert trainer._find_resume() == expected
        assert any(message in r.getMessage() and "newest complete" in r.getMessage() for r in caplog.records), caplog.text

    latest.unlink()
    fallback(two, "latest is missing")
    latest.write_bytes(b"\xff\x00garbage")
    fallback(two, "latest is unreadable")
    latest.write_text("../../elsewhere")
    fallback(two, "not a checkpoint name")
    latest.write_text("")
    fallback(two, "latest is empty")
    latest.write_text(two.name)
    (two / "state.json").write_text('{"step": 2, "samp')  # torn marker: step 2 is not complete
    fallback(one, "names step-00000002, which is not complete")
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        Trainer(_one_step_config(data_dir, tmp_path / "o", resume_from=str(two)))
    (one / "state.json").unlink()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint; pass --resume-from none"):
        trainer._find_resume()
    assert main(train_args(data_dir, tmp_path / "o", max_steps=1)) == 2


@pytest.mark.slow
def test_resumed_run_has_the_log_and_rng_of_the_uninterrupted_run(data_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(train_args(data_dir, straight, max_steps=4, save_every=2, batch_size=2)) == 0
    assert main(train_args(data_dir, split, max_steps=2, save_every=2, batch_size=2)) == 0
    # What a run killed after logging step 3 (and half of step 4) leaves behind.
    with open(split / "train_log.jsonl", "a") as log:
        log.write(json.dumps({"step": 3, "loss": 123.0}) + "\n" + '{"step": 4, "lo')
    assert main(train_args(data_dir, split, max_steps=4, save_every=2, batch_size=2)) == 0
    rows = [json.loads(line) for line in (split / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    reference = read_log(straight)
    assert all(r["loss"] == pytest.approx(reference[r["step"]]["loss"], rel=1e-6) for r in rows)
    assert_same_tensors(read_state_dict(checkpoint(split, 4) / "rng-0.safetensors"),
                        read_state_dict(checkpoint(straight, 4) / "rng-0.safetensors"), rtol=0, atol=0)


def test_non_finite_losses_skip_the_update_then_stop_training(data_dir, tmp_path, monkeypatch, caplog):
    from nitro_ar.errors import TrainingError

    real_forward = MaskedARObjective.forward

    def nan_loss(self, *args, **kwargs):
        losses = real_forward(self, *args, **kwargs)
        return {**losses, "loss": losses["loss"] * float("nan")}

    monkeypatch.setattr(MaskedARObjective, "forward", nan_loss)
    trainer = Trainer(parse_config(train_args(data_dir, tmp_path / "o", max_steps=10, max_nonfinite_steps=2, ema="true")))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    shadow = {k: v.clone() for k, v in trainer.ema.shadow.items()}
    with caplog.at_level(logging.WARNING, logger="nitro_ar.train"), \
            pytest.raises(TrainingError, match=r"not finite \(nan\) for 3 steps in a row.*max_nonfinite_steps=2"):
        trainer.train()
    assert trainer.step == 3
    assert_same_tensors(trainer.model.state_dict(), before, rtol=0, atol=0)
    assert_same_tensors(trainer.ema.shadow, shadow, rtol=0, atol=0)
    assert sum("update skipped" in r.getMessage() for r in caplog.records) == 3
    rows = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, None), (2, None), (3, None)]
    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        _one_step_config(data_dir, tmp_path / "p", max_nonfinite_steps=-1)
