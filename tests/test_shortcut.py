"""FAR shortcut heads: exactness until trained, checkpoints, the objective's conventions, the
train mode, sampling with uniform steps (and DiSA counts), and a toy where the shortcut head
beats flow matching at 1 and 2 steps."""
import dataclasses
import json
import logging
import math

import pytest
import torch
from torch import nn

from factories import TEXT_WIDTH, randomize_, tiny_ar
from nitro_ar import NitroAR
from nitro_ar.checkpoint import infer_config, read_state_dict
from nitro_ar.errors import CheckpointError, ConfigError
from nitro_ar.heads import MLPHead, TransformerHead, euler_sample
from nitro_ar.objectives import ObjectiveSettings
from nitro_ar.schedules import FlowSchedule, shortcut_schedule, step_head_counts
from nitro_ar.shortcut import (
    ShortcutObjective,
    ShortcutSettings,
    consistency_steps,
    draw_shortcut_step,
    enable_shortcut,
    head_nets,
    shortcut_errors,
)
from nitro_ar.train import TrainConfig, main
from shortcut_toy import Toy, compare


def make_head(kind: str, shortcut: bool) -> nn.Module:
    if kind == "mlp":
        return MLPHead(8, 64, 2, 24, shortcut=shortcut)
    return TransformerHead(8, 64, 2, 24, grid=4, shortcut=shortcut)


def head_inputs(kind: str, dtype):
    g = torch.Generator().manual_seed(3)
    shape = (6, 8) if kind == "mlp" else (2, 16, 8)
    rows = shape[0]
    x = torch.randn(shape, generator=g).to(dtype)
    c = torch.randn(*shape[:-1], 24, generator=g).to(dtype)
    t = torch.rand(rows, generator=g) * 1000
    return x, t, c, torch.rand(rows, generator=g) * 1000


def step_keys(state):
    return sorted(k for k in state if ".step_embed." in k)


# --------------------------------------------------------------------------------------------
# the step embedding
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_untrained_step_embedding_is_the_official_head_bit_for_bit(kind, dtype):
    official = randomize_(make_head(kind, shortcut=False), seed=1).to(dtype)
    head = make_head(kind, shortcut=True)
    missing, unexpected = head.load_state_dict(official.state_dict(), strict=False)
    assert sorted(missing) == [f"step_embed.mlp.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")] and not unexpected
    with torch.no_grad():
        head.step_embed.mlp[0].weight.normal_()  # a trained first layer changes nothing while the last is zero
    head = head.to(dtype)
    x, t, c, per_row = head_inputs(kind, dtype)
    expected = official(x, t, c)
    for dt in (None, torch.tensor(0.0), torch.tensor(333.3), per_row):
        assert torch.equal(head(x, t, c, dt), expected)
        assert torch.equal(head.condition(t, c, dtype, dt), official.condition(t, c, dtype))
    with torch.no_grad():
        head.step_embed.mlp[2].weight.normal_()
    assert not torch.equal(head(x, t, c, torch.tensor(500.0)), expected)  # a trained embedding is used
    assert torch.equal(head(x, t, c), head(x, t, c, torch.tensor(0.0)))  # no step size: d = 0
    # One step size for all rows is embedded once (a 1-row GEMM: rounding may differ).
    torch.testing.assert_close(head(x, t, c, torch.tensor(500.0)), head(x, t, c, torch.full((x.shape[0],), 500.0)),
                               rtol=1e-4, atol=1e-3)
    assert torch.equal(official(x, t, c, per_row), expected)  # a head without embedding ignores step sizes


@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_official_checkpoint_loads_into_a_shortcut_model_and_exports_back(variant, tmp_path):
    model = tiny_ar(variant, block_groups=(1, 1, 1))
    official_file = tmp_path / "official.safetensors"
    model.save_official(official_file)
    config = dataclasses.replace(model.config, shortcut=True)
    loaded = NitroAR.from_pretrained(official_file, config=config)
    nets = head_nets(loaded)
    assert len(nets) == (2 if variant == "joint_gan" else 1)  # joint_gan's global head too
    for _, net in nets:
        assert torch.equal(net.step_embed.mlp[0].weight, net.time_embed.mlp[0].weight)
        assert not net.step_embed.mlp[2].weight.any() and not net.step_embed.mlp[2].bias.any()
    kind = "mlp" if variant == "gan" else "transformer"
    g = torch.Generator().manual_seed(0)
    shape = (5, 32) if kind == "mlp" else (2, 256, 32)
    x, c = torch.randn(shape, generator=g), torch.randn(*shape[:-1], 64, generator=g)
    t = torch.full((shape[0],), 700.0)
    for dt in (None, torch.tensor(250.0)):
        assert torch.equal(loaded.diffloss.net(x, t, c, dt), model.diffloss.net(x, t, c))
    if variant == "gan":
        text = torch.randn(1, 16, TEXT_WIDTH, generator=g)
        sample = {"ar_steps": 2, "cfg": 2.0, "uncond_emb": torch.zeros(1, 16, TEXT_WIDTH)}
        assert torch.equal(loaded.generate(text, generator=torch.Generator().manual_seed(1), **sample),
                           model.generate(text, generator=torch.Generator().manual_seed(1), **sample))

    # Untrained: exports to exactly the official file's tensors.
    loaded.save_official(tmp_path / "again.safetensors")
    again, source = read_state_dict(tmp_path / "again.safetensors"), read_state_dict(official_file)
    assert again.keys() == source.keys() and all(torch.equal(again[k], source[k]) for k in source)
    # The project's layout keeps the embedding and the flag, with or without config.json.
    loaded.save_pretrained(tmp_path / "saved")
    assert NitroAR.from_pretrained(tmp_path / "saved").config.shortcut
    assert step_keys(read_state_dict(tmp_path / "saved" / "model.safetensors"))
    assert infer_config(read_state_dict(tmp_path / "saved" / "model.safetensors")).shortcut
    # Trained: refused, and nothing written.
    with torch.no_grad():
        nets[-1][1].step_embed.mlp[2].bias.fill_(0.01)
    with pytest.raises(CheckpointError, match=r"step embedding of diffloss(_global)?\.net is trained"):
        loaded.save_official(tmp_path / "trained.safetensors")
    assert not (tmp_path / "trained.safetensors").exists()


def test_enable_shortcut_is_idempotent_and_keeps_the_outputs():
    model = tiny_ar("gan", block_groups=(1, 1, 1))
    x, t, c = torch.randn(4, 32), torch.full((4,), 500.0), torch.randn(4, 64)
    before = model.head(x, t, c)
    embed = enable_shortcut(model).diffloss.net.step_embed
    assert enable_shortcut(model).diffloss.net.step_embed is embed and model.config.shortcut
    assert torch.equal(model.diffloss.net(x, t, c, torch.tensor(1000.0)), before)


# --------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------
class PointMassField(nn.Module):
    """The exact flow-matching velocity when the data is the point ``c``: v = (x - c) / s."""

    def forward(self, x, t, c, dt=None):
        return (x - c) / (t / 1000).view(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("step_sizes", ["levels", "uniform"])
def test_consistency_targets_follow_our_sigma_convention(step_sizes):
    # Paths to a point mass are straight: two exact half steps toward the data (s -> s - h)
    # land on the path, so the self-consistency target is the flow-matching one, noise - x0;
    # a step in the wrong direction (shortcut-models' t runs the other way) would not be.
    g = torch.Generator().manual_seed(0)
    rows = 512
    x0, noise = 0.3 * torch.randn(rows, 4, generator=g), torch.randn(rows, 4, generator=g).clamp(-3, 3)
    sigmas = torch.rand(rows, generator=g) * 0.9 + 0.05
    uniforms = torch.rand(rows, 3, generator=g)
    settings = ShortcutSettings(fraction=0.75, step_sizes=step_sizes)
    errors = shortcut_errors(PointMassField(), x0, noise, x0, sigmas, sigmas * 1000, uniforms, settings)
    assert (uniforms[:, 0] < 0.75).sum() > 300
    assert errors.max() < 1e-8


def test_teacher_parameters_give_the_targets():
    head = randomize_(make_head("mlp", shortcut=True), seed=4, scale=0.1)
    g = torch.Generator().manual_seed(5)
    x0, noise, c = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g), torch.randn(64, 24, generator=g)
    sigmas, uniforms = torch.rand(64, generator=g) * 0.9 + 0.05, torch.rand(64, 3, generator=g)
    args = (head, x0, noise, c, sigmas, sigmas * 1000, uniforms, ShortcutSettings(fraction=0.5))
    online = shortcut_errors(*args)
    own = {name: p.detach().clone() for name, p in head.named_parameters()}
    assert torch.equal(shortcut_errors(*args, teacher=own), online)  # an EMA equal to the weights: the same targets
    other = {**own, "final_layer.linear.bias": own["final_layer.linear.bias"] + 1.0}
    changed = shortcut_errors(*args, teacher=other) != online
    assert changed.any(dim=1).sum() == (uniforms[:, 0] < 0.5).sum()  # exactly the self-consistency rows change


def test_consistency_step_sizes_are_the_shortcut_models_levels():
    u = torch.rand(4096, 3, generator=torch.Generator().manual_seed(1))
    s, d, half, teacher_dt = consistency_steps(u, ShortcutSettings())
    k = torch.log2(1 / d)
    assert torch.equal(k, k.round()) and set(k.long().tolist()) == set(range(7))  # d = 1 ... 1/64
    assert torch.equal(half, d / 2)
    j = (1 - s) / d
    assert torch.allclose(j, j.round(), atol=1e-4) and (s >= d).all() and (s <= 1).all()  # on the student's grid
    assert torch.equal(teacher_dt == 0, d == 1 / 64)  # the finest level 1/128 is flow matching (d = 0)
    s, d, half, teacher_dt = consistency_steps(u, ShortcutSettings(step_sizes="uniform"))
    assert (s > 0).all() and (s <= 1).all() and (2 * half <= s).all() and torch.equal(teacher_dt, half)


def test_shortcut_draws_do_not_depend_on_how_the_batch_is_split():
    model = enable_shortcut(tiny_ar("joint_gan", block_groups=(1, 1, 1)))
    settings = ObjectiveSettings(diffusion_batch_mul=1)
    whole = draw_shortcut_step(model, settings, seed=3, step=5, positions=range(4))
    halves = [draw_shortcut_step(model, settings, seed=3, step=5, positions=range(a, a + 2)) for a in (0, 2)]
    assert whole.uniforms.shape == (4, 1, 1, 3) and whole.global_uniforms.shape == (4, 3)
    assert torch.equal(whole.uniforms, torch.cat([h.uniforms for h in halves]))
    assert torch.equal(whole.global_uniforms, torch.cat([h.global_uniforms for h in halves]))


def test_bad_shortcut_settings_are_named():
    for bad, name in (({"fraction": 2}, "fraction"), ({"levels": 100}, "levels"), ({"step_sizes": "log"}, "step_sizes"),
                      ({"clip": -1}, "clip"), ({"fraction": True}, "fraction")):
        with pytest.raises(ConfigError, match=f"shortcut.{name}"):
            ShortcutSettings.from_dict(bad)
    with pytest.raises(ConfigError, match="unknown shortcut settings"):
        ShortcutSettings.from_dict({"bootstrap_every": 4})
    with pytest.raises(ConfigError, match="shortcut.fraction"):
        TrainConfig(data_dir="d", output_dir="o", mode="shortcut", shortcut={"fraction": -0.1}).validate()
    with pytest.raises(ConfigError, match="step embeddings"):
        ShortcutObjective(tiny_ar("gan", block_groups=(1, 1, 1)), torch.zeros(1, 16, TEXT_WIDTH), ObjectiveSettings())


# --------------------------------------------------------------------------------------------
# nitro-ar train, mode: shortcut
# --------------------------------------------------------------------------------------------
MODEL = dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64, caption_channels=48,
             diffloss_w=128, diffloss_d=2, block_groups=[1, 1, 1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from nitro_ar.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), 8, text_shape=(16, 48), shard_size=8)


def run(data, out, **settings):
    flags = {"data_dir": data, "output_dir": out, "mode": "shortcut", "batch_size": 2, "max_steps": 2, "text_length": 16,
             "learning_rate": 1e-3, "warmup_steps": 0, "num_workers": 0, "progress": "false",
             "shortcut": json.dumps({"fraction": 0.5}), **settings}
    return main([a for k, v in flags.items() for a in ("--" + k.replace("_", "-"), str(v))])


@pytest.mark.slow
def test_fine_tuning_a_flow_matching_model_into_a_shortcut_model(data_dir, tmp_path, caplog):
    # FMSC: a flow-matching (pre-trained) model, its heads given zero step embeddings, trained on;
    # one step, then a resumed second one (the checkpoint holds the embedding and the EMA).
    torch.manual_seed(0)
    init = NitroAR(NitroAR.config_class.for_variant("gan", **MODEL))
    init.save_pretrained(tmp_path / "init")
    out = tmp_path / "run"
    assert run(data_dir, out, init_from=tmp_path / "init", max_steps=1, save_every=1) == 0
    assert run(data_dir, out, init_from=tmp_path / "init", max_steps=2, save_every=1) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    tuned = NitroAR.from_pretrained(out / "checkpoints" / "step-00000002" / "model")
    assert tuned.config.shortcut and tuned.diffloss.net.step_embed.mlp[2].weight.any()  # trained
    assert NitroAR.from_pretrained(out / "checkpoints" / "step-00000002" / "ema").config.shortcut
    with pytest.raises(CheckpointError, match="trained"):
        tuned.save_official(tmp_path / "official.safetensors")
    # Without EMA the targets come from the online head, and the run says so.
    with caplog.at_level(logging.WARNING, logger="nitro_ar.shortcut"):
        assert run(data_dir, tmp_path / "no_ema", variant="joint_gan", model_config=json.dumps(MODEL), ema="false") == 0
    assert "online head" in caplog.text
    # From scratch (zero final layers: the step embeddings get gradients from the second step on).
    joint = NitroAR.from_pretrained(tmp_path / "no_ema" / "checkpoints" / "step-00000002" / "model")
    assert all(net.step_embed.mlp[2].weight.any() for _, net in head_nets(joint))


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_shortcut_sampling_takes_uniform_steps_of_the_embedded_size(kind):
    head = randomize_(make_head(kind, shortcut=True), seed=2, scale=0.1)  # a "trained" step embedding
    x, _, c, _ = head_inputs(kind, torch.float32)
    z = torch.cat([torch.zeros_like(c), c])  # [uncond; cond]
    for n in step_head_counts(4, 4, "linear", 1):  # DiSA: a schedule per AR step, [4, 3, 2, 1]
        schedule = shortcut_schedule(n)
        sampled = euler_sample(head, z, x, schedule, cfg=2.0)  # the step size comes with the schedule
        expected = x.clone()
        for i in range(n):
            v = head(torch.cat([expected, expected]), torch.full((2 * x.shape[0],), 1000 * (1 - i / n)), z,
                     torch.tensor(1000 / n))
            v_u, v_c = v.chunk(2)
            expected = expected - (v_u + 2.0 * (v_c - v_u)) / n
        torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-5)
        without_d = FlowSchedule(schedule.timesteps, schedule.sigmas)  # the same steps, d = 0
        assert not torch.allclose(sampled, euler_sample(head, z, x, without_d, cfg=2.0))  # d matters


@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_generate_with_the_shortcut_sampler_fast_and_reference_agree(variant):
    import nitro_ar.fast

    model = randomize_(NitroAR(dataclasses.replace(tiny_ar(variant).config, shortcut=True)), seed=4, scale=0.1).eval()
    g = torch.Generator().manual_seed(0)
    text, empty = torch.randn(2, 5, TEXT_WIDTH, generator=g), torch.randn(1, 5, TEXT_WIDTH, generator=g)
    options = dict(ar_steps=3 if variant == "gan" else 2, head_steps=4, head_steps_schedule="linear", head_steps_end=2,
                   cfg=3.0, head_sampler="shortcut")
    reference = model.generate(text, empty, generator=torch.Generator().manual_seed(1), **options)
    official = model.generate(text, empty, generator=torch.Generator().manual_seed(1), **{**options, "head_sampler": "official"})
    assert not torch.allclose(reference, official)
    nitro_ar.fast.accelerate(model, backend="torch")
    try:
        fast = model.generate(text, empty, generator=torch.Generator().manual_seed(1), **options)
    finally:
        nitro_ar.fast.restore(model)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="head_sampler"):
        model.generate(text, empty, head_sampler="ddim")


# --------------------------------------------------------------------------------------------
# evidence on a toy
# --------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Tiny GEMMs run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_toy_shortcut_head_beats_flow_matching_at_one_and_two_steps(one_thread):
    # Same head, steps and batch; sliced W2 to true samples (bench/test_bench_shortcut.py has the
    # full table at 1, 2, 4, 8 steps with a larger budget).
    result = compare(Toy(), steps=200, batch=128, width=64, samples=256, fraction=0.5, ema_rate=None,
                     step_counts=(1, 2))
    for n in (1, 2):
        assert result["shortcut"][n] < result["flow_matching"][n], result
