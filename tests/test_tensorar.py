"""TensorAR-style refinement window (nitro_ar.tensorar, NitroAR.generate(window=k))."""
import math

import pytest
import torch

import nitro_ar.fast as fast
from factories import tiny_ar
from nitro_ar import NitroAR
from nitro_ar.errors import CheckpointError, ConfigError, InvalidArgumentError
from nitro_ar.fast.graphs import GraphCache, HostSyncs, enable_graphs
from nitro_ar.nitro_ar_model import masked_before_steps
from nitro_ar.objectives import ObjectiveSettings
from nitro_ar.schedules import step_head_counts
from nitro_ar.tensorar import AGE_NOISE, RefineObjective, age_noise_level, band_ages, band_bounds, draw_refine_step
from test_sync_free import SMALL, _text, oracle_generate


def _windowed(model, window):
    """``model``'s weights in a config with ``refine_window=window`` (zero age embedding)."""
    other = NitroAR(type(model.config)(**{**vars(model.config), "refine_window": window})).eval()
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["age_embed.weight"] and not unexpected
    return other


def _generation_steps(model, orders, ar_steps):
    """Per image, the AR step at which each position is first generated, from plain sampling's plan."""
    plan = model.sampling_plan(orders.shape[0], ar_steps=ar_steps, window=1)
    made = torch.full_like(orders, -1)
    for step, positions in zip(plan.steps, plan.positions(orders)):
        made.scatter_(1, positions, step.index)
    assert (made >= 0).all()
    return made


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("variant,opts", [
    ("gan", dict(ar_steps=4, head_steps=2, cfg=4.0, cfg_schedule="linear")),
    ("joint_gan", dict(ar_steps=2, head_steps=2, cfg=3.0)),
])
def test_window_one_is_plain_sampling_bit_for_bit(variant, opts):
    model = tiny_ar(variant, **SMALL)
    text, uncond = _text(2), _text(1, seed=1)
    want = oracle_generate(model, text, uncond, generator=torch.Generator().manual_seed(5), **opts)
    for flush in (True, False):
        got = model.generate(text, uncond, window=1, flush_window=flush, generator=torch.Generator().manual_seed(5), **opts)
        assert torch.equal(got, want)
    # a windowed config sampled with window=1 is the official model too
    got = _windowed(model, 3).generate(text, uncond, window=1, generator=torch.Generator().manual_seed(5), **opts)
    assert torch.equal(got, want)


@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_zero_age_embedding_is_the_official_model(variant):
    model = tiny_ar(variant, **SMALL)
    windowed = _windowed(model, 3)
    tokens = torch.randn(2, model.seq_len, model.config.in_channels)
    ages = torch.randint(0, 3, (2, model.seq_len))  # 2 = no age
    assert torch.equal(windowed.backbone(tokens, _text(2), ages), model.backbone(tokens, _text(2)))
    opts = dict(ar_steps=3, head_steps=2, cfg=4.0, window=3)
    want = model.generate(_text(1), _text(1, seed=1), generator=torch.Generator().manual_seed(2), **opts)
    got = windowed.generate(_text(1), _text(1, seed=1), generator=torch.Generator().manual_seed(2), **opts)
    assert torch.equal(got, want)
    assert windowed.sampling_plan(1, ar_steps=3).window == 3  # the config's window is the default


@pytest.mark.parametrize("window,flush", [(2, True), (3, True), (3, False), (5, True)])
def test_re_predicted_tokens_follow_the_window_rule(window, flush):
    """Step s predicts exactly the tokens first generated at steps s-k+1 .. s (flush passes:
    no new ones); every token is predicted k times (flush) and changes only when predicted."""
    ar_steps = 4
    model = _windowed(tiny_ar("gan", **SMALL), window)
    with torch.no_grad():
        model.age_embed.weight.normal_()  # ages must not change which tokens are predicted
    plan = model.sampling_plan(2, ar_steps=ar_steps, cfg=1.0, window=window, flush_window=flush)
    assert len(plan.steps) == ar_steps + (window - 1 if flush else 0)
    orders = torch.stack([torch.randperm(model.seq_len, generator=torch.Generator().manual_seed(b)) for b in range(2)])
    made = _generation_steps(model, orders, ar_steps)
    assert torch.equal(plan.generation_steps(orders), made)
    times = torch.zeros_like(made)
    for step, positions in zip(plan.steps, plan.positions(orders)):
        predicted = torch.zeros_like(made, dtype=torch.bool).scatter_(1, positions, True)
        assert torch.equal(predicted, (made <= step.index) & (made > step.index - window))
        assert step.noise_rows == 2 * positions.shape[1]
        age = plan.age_indices(step, made)  # rows of the age embedding: re-predicted, visible tokens
        assert torch.equal(age < window - 1, predicted & (made < step.index))
        assert torch.equal(age[age < window - 1], (step.index - 1 - made)[age < window - 1])
        times += predicted
    want = torch.full_like(made, window) if flush else torch.clamp(ar_steps - made, max=window)
    assert torch.equal(times, want)
    # in the images: a token changes at, and only at, the steps that predict it
    seen = []
    model.generate(_text(2), ar_steps=ar_steps, cfg=1.0, window=window, flush_window=flush,
                   generator=torch.Generator().manual_seed(9), callback=lambda index, tokens: seen.append(tokens.clone()))
    gen = torch.Generator().manual_seed(9)  # generate draws the orders first (module docstring)
    orders = torch.stack([torch.randperm(model.seq_len, generator=gen) for _ in range(2)])
    before = model.mask_token.expand(2, model.seq_len, -1)
    assert len(seen) == len(plan.steps)
    for positions, tokens in zip(plan.positions(orders), seen):
        predicted = torch.zeros(2, model.seq_len, dtype=torch.bool).scatter_(1, positions, True)
        assert torch.equal((tokens != before).any(-1), predicted)
        before = tokens


@pytest.mark.parametrize("variant,impls", [("gan", ("reference", "torch", "graphs")), ("joint_gan", ("torch", "graphs"))])
def test_window_works_with_disa_cfg_schedules_fast_path_and_graphs_without_syncs(variant, impls):
    from graph_standin import StandInGraphs

    opts = dict(ar_steps=3, head_steps=3, head_steps_schedule="linear", head_steps_end=1, cfg=4.0,
                cfg_schedule="linear", window=3)
    results = {}
    for impl in impls:
        model = _windowed(tiny_ar(variant, **SMALL), 3)
        with torch.no_grad():
            model.age_embed.weight.normal_(generator=torch.Generator().manual_seed(1))
        if impl != "reference":
            fast.accelerate(model, backend="torch", graphs=False)
        if impl == "graphs":
            enable_graphs(model, GraphCache(StandInGraphs))
        plan = model.sampling_plan(1, **opts)
        counts = step_head_counts(3, 3, "linear", 1)
        assert [s.head_steps for s in plan.steps] == counts + [counts[-1]] * 2  # flush: the last step's
        assert plan.steps[-1].cfg == plan.steps[3].cfg == plan.steps[2].cfg
        for count in plan.head_counts:
            model.head_schedule(count)
        with HostSyncs(strict=True):
            results[impl] = model.generate(_text(1), _text(1, seed=1), generator=torch.Generator().manual_seed(0), **opts)
    assert torch.equal(results["graphs"], results["torch"])  # graphs replay the eager phases
    assert all(out.isfinite().all() for out in results.values())


def test_window_argument_errors_are_named():
    gan, joint = tiny_ar("gan", **SMALL), tiny_ar("joint_gan", **SMALL)
    with pytest.raises(InvalidArgumentError, match="window"):
        gan.sampling_plan(1, window=0)
    with pytest.raises(InvalidArgumentError, match="refine"):
        gan.sampling_plan(1, window=2, refine=True)
    with pytest.raises(InvalidArgumentError, match="ar_steps"):
        joint.sampling_plan(1, window=2)  # released joint_gan samples in one step: nothing to refine
    joint.sampling_plan(1, window=2, ar_steps=2)
    with pytest.raises(ValueError, match="refine_window"):
        tiny_ar("gan", **SMALL, refine_window=0)


# ------------------------------------------------------------------------------ checkpoints
def test_official_files_load_into_a_windowed_config_and_trained_ages_are_not_exported(tmp_path):
    model = tiny_ar("gan", **SMALL)
    model.save_official(tmp_path / "official.safetensors")
    windowed = NitroAR.from_pretrained(tmp_path / "official.safetensors", config=_windowed(model, 3).config)
    assert torch.equal(windowed.age_embed.weight, torch.zeros(2, model.config.inner_dim))
    windowed.save_official(tmp_path / "again.safetensors")  # zero embedding: stripped
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "again.safetensors")) == set(model.state_dict())
    with torch.no_grad():
        windowed.age_embed.weight[0, 0] = 1.0
    with pytest.raises(CheckpointError, match="age embedding"):
        windowed.save_official(tmp_path / "trained.safetensors")
    assert not (tmp_path / "trained.safetensors").exists()
    windowed.save_pretrained(tmp_path / "dir")
    back = NitroAR.from_pretrained(tmp_path / "dir")
    assert back.config.refine_window == 3 and torch.equal(back.age_embed.weight, windowed.age_embed.weight)


# ------------------------------------------------------------------------------ training
def test_noise_schedules():
    k = 4
    for schedule, gamma in [("linear", lambda u: u), ("sine", lambda u: math.sin(math.pi * u / 2)),
                            ("sqrt", math.sqrt), ("exponential", lambda u: (math.exp(u) - 1) / (math.e - 1))]:
        levels = [age_noise_level(a, k, schedule) for a in range(k - 1)]
        assert levels == pytest.approx([gamma(0.75), gamma(0.5), gamma(0.25)])
        assert levels == sorted(levels, reverse=True)  # newest noisiest
    assert set(AGE_NOISE) == {"linear", "sine", "sqrt", "exponential"}
    with pytest.raises(ConfigError):
        age_noise_level(0, k, "cubic")
    with pytest.raises(ConfigError):
        age_noise_level(3, k, "sine")


@pytest.mark.parametrize("seq,ar_steps", [(64, 4), (256, 20), (1024, 8)])
def test_training_bands_are_the_bands_sampling_sees(seq, ar_steps):
    bounds = masked_before_steps(ar_steps, seq)
    for t in range(1, ar_steps):
        assert band_bounds(seq, bounds[t], ar_steps, 4) == [bounds[max(t - j, 0)] for j in range(4)]
    assert band_bounds(seq, seq, ar_steps, 4) == [seq] * 4  # all masked: no history
    orders = torch.randperm(seq)[None]
    ages = band_ages(orders, [2, 5, 9])
    assert torch.equal(ages[0, orders[0]], torch.tensor([2, 2, 0, 0, 0, 1, 1, 1, 1] + [2] * (seq - 9)))


@pytest.mark.parametrize("schedule", AGE_NOISE)
def test_training_inputs_are_noised_by_age(schedule, monkeypatch):
    model = _windowed(tiny_ar("gan", **SMALL), 3)
    settings = ObjectiveSettings(mask_ratio_min=0.3, text_dropout=0.0)
    objective = RefineObjective(model, _text(1), settings, noise=schedule, ar_steps=4)
    draws = draw_refine_step(model, settings, seed=1, step=0, positions=[0, 1])
    bounds = band_bounds(model.seq_len, draws.num_masked, 4, 3)
    seen = {}
    backbone = model.backbone

    def spy(tokens, text, ages=None):
        seen.update(tokens=tokens, ages=ages)
        return backbone(tokens, text, ages)

    monkeypatch.setattr(model, "backbone", spy)
    latents = torch.randn(2, model.config.in_channels, 8, 8)
    objective(latents, _text(2), draws)
    x0 = latents.flatten(2).transpose(1, 2)
    for j in (1, 2):
        beta = age_noise_level(j - 1, 3, schedule)
        cols = draws.orders[:, bounds[j - 1] : bounds[j]]
        got = seen["tokens"].gather(1, cols[..., None].expand(-1, -1, x0.shape[-1]))
        want = ((1 - beta) * x0 + beta * draws.input_noise).gather(1, cols[..., None].expand(-1, -1, x0.shape[-1]))
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
        assert (seen["ages"].gather(1, cols) == j - 1).all()
    clean = draws.orders[:, bounds[-1]:]
    assert torch.equal(seen["tokens"].gather(1, clean[..., None].expand(-1, -1, x0.shape[-1])),
                       x0.gather(1, clean[..., None].expand(-1, -1, x0.shape[-1])))
    assert (seen["ages"].gather(1, clean) == 2).all()


@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_a_few_training_steps_reduce_both_loss_parts(variant):
    torch.manual_seed(0)
    model = _windowed(tiny_ar(variant, **SMALL), 3).train()
    settings = ObjectiveSettings(mask_ratio_min=0.3, text_dropout=0.0, diffusion_batch_mul=1)
    objective = RefineObjective(model, _text(1), settings, noise="sine", ar_steps=4)
    latents = torch.randn(4, model.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    thumbs = latents.mean((2, 3), keepdim=True) if variant == "joint_gan" else None
    text = _text(4, seed=4)
    probe = [draw_refine_step(model, settings, seed=7, step=s, positions=range(4)) for s in range(3)]
    probe = [d for d in probe if d.num_masked < model.seq_len]

    def measure():
        with torch.no_grad():
            parts = [objective(latents, text, d, thumbs) for d in probe]
        return [sum(float(p[k]) for p in parts) for k in ("image_loss", "refine_loss")]

    start = measure()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(25):
        loss = objective(latents, text, draw_refine_step(model, settings, seed=0, step=step, positions=range(4)), thumbs)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = measure()
    assert end[0] < 0.9 * start[0] and end[1] < 0.9 * start[1], (start, end)
    assert model.age_embed.weight.abs().sum() > 0  # the age embedding is trained


def test_refine_objective_refuses_what_it_cannot_train():
    with pytest.raises(ConfigError, match="refine_window"):
        RefineObjective(tiny_ar("gan", **SMALL), _text(1), ObjectiveSettings())
    with pytest.raises(ConfigError, match="AR steps"):
        RefineObjective(_windowed(tiny_ar("joint_gan", **SMALL), 2), _text(1), ObjectiveSettings())
    with pytest.raises(ConfigError, match="refine_noise"):
        RefineObjective(_windowed(tiny_ar("gan", **SMALL), 2), _text(1), ObjectiveSettings(), noise="cubic")


def test_train_mode_refine_fine_tunes_official_weights(tmp_path):
    from nitro_ar.data import make_synthetic_dataset
    from nitro_ar.train import main
    from test_train import TEXT_SHAPE, checkpoint, read_log, tiny_model, train_args

    data = make_synthetic_dataset(tmp_path / "data", 8, text_shape=TEXT_SHAPE, shard_size=8)
    tiny_model("gan").save_official(tmp_path / "official.safetensors")
    args = train_args(data, tmp_path / "run", model_config=None, init_from=tmp_path / "official.safetensors",
                      mode="refine", refine_window=3, refine_noise="exponential", refine_ar_steps=4,
                      mask_ratio_min=0.3, max_steps=2, batch_size=2)
    assert main(args) == 0
    log = read_log(tmp_path / "run")
    assert {"image_loss", "refine_loss", "loss"} <= set(log[2])
    trained = NitroAR.from_pretrained(checkpoint(tmp_path / "run", 2) / "model")
    assert trained.config.refine_window == 3 and trained.age_embed.weight.abs().sum() > 0
    with pytest.raises(CheckpointError, match="age embedding"):
        trained.save_official(tmp_path / "out.safetensors")
