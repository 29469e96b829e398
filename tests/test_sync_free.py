"""NitroAR.generate: host-side plan, no host synchronisation inside the AR loop, and outputs
bit-identical to the loop it replaced (kept below as the oracle)."""
import pytest
import torch

import nitro_ar.fast as fast
from factories import TEXT_WIDTH, tiny_ar
from nitro_ar.errors import InvalidArgumentError
from nitro_ar.fast.graphs import GraphCache, HostSyncs, enable_graphs
from nitro_ar.schedules import cfg_for_step, mar_mask_len, step_head_counts

SMALL = dict(block_groups=(1, 1, 1), sample_size=8)  # 64 tokens: every code path, fast on CPU


def _text(batch, seed=0, length=16):
    return torch.randn(batch, length, TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def oracle_generate(model, text_emb, uncond_emb, *, ar_steps, head_steps, cfg, cfg_schedule="constant",
                    head_steps_schedule="constant", head_steps_end=None, refine=False,
                    global_token_dependency=False, generator=None):
    """The AR loop as it was before the sync-free rewrite (boolean masks, ``nonzero``, host
    reads of the mask length): the oracle the new loop must match bit for bit."""
    counts = step_head_counts(ar_steps, head_steps, head_steps_schedule, head_steps_end)
    batch, device, dtype = text_emb.shape[0], model.device, model.dtype
    guided = cfg != 1.0
    text_in = torch.cat([uncond_emb.expand(batch, -1, -1), text_emb]) if guided else text_emb
    chans, seq = model.config.in_channels, model.seq_len

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    def doubled(x):
        return torch.cat([x, x]) if guided else x

    if model.is_joint:
        global_noise = randn(batch, 1, chans)
        global_token = model.global_head_sample(model.global_backbone(text_in), num_steps=counts[0], cfg=cfg,
                                                noise=global_noise)
        tokens = global_token.expand(batch, seq, chans).clone()
    else:
        tokens = model.mask_token.to(dtype).expand(batch, seq, chans).clone()
    orders = torch.stack([torch.randperm(seq, generator=generator) for _ in range(batch)])
    mask = torch.ones(batch, seq, dtype=torch.bool)
    for step in range(ar_steps):
        z = model.backbone(doubled(tokens), text_in)
        mask_len = mar_mask_len(step, ar_steps, seq, int(mask.sum(-1)[0]))
        mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :mask_len], True)
        last = step == ar_steps - 1
        if refine:
            to_pred = torch.ones_like(mask) if last else ~mask_next
        else:
            to_pred = mask if last else mask & ~mask_next
        mask = mask_next
        weight = cfg_for_step(cfg, cfg_schedule, seq, mask_len)
        new_tokens = tokens.clone()
        if model.is_joint:
            sampled = model.head_sample(z, num_steps=counts[step], cfg=weight, noise=randn(batch, seq, chans))
            if not global_token_dependency and step == 0:
                new_tokens = model.mask_token.to(dtype).expand(batch, seq, chans).clone()
            new_tokens[to_pred] = sampled[to_pred]
        else:
            rows = to_pred.nonzero(as_tuple=True)
            z_rows = torch.cat([z[:batch][rows], z[batch:][rows]]) if guided else z[rows]
            new_tokens[rows] = model.head_sample(z_rows, num_steps=counts[step], cfg=weight,
                                                 noise=randn(rows[0].numel(), chans))
        tokens = new_tokens
    grid = model.config.grid_size
    return tokens.reshape(batch, grid, grid, chans).permute(0, 3, 1, 2).contiguous()


# (variant, generate options): constant and linear CFG, DiSA, refine, CFG 1, per-step counts.
CASES = [
    ("gan", dict(ar_steps=4, head_steps=3, cfg=4.0)),
    ("gan", dict(ar_steps=3, head_steps=2, cfg=4.0, cfg_schedule="linear")),
    ("gan", dict(ar_steps=4, head_steps=4, cfg=3.0, head_steps_schedule="linear", head_steps_end=1)),
    ("gan", dict(ar_steps=3, head_steps=1, cfg=4.0, refine=True)),
    ("gan", dict(ar_steps=3, head_steps=[1, 2, 1], cfg=1.0)),
    ("joint_gan", dict(ar_steps=1, head_steps=3, cfg=4.0)),
    ("joint_gan", dict(ar_steps=2, head_steps=2, cfg=4.0, cfg_schedule="linear", refine=True)),
    ("joint_gan", dict(ar_steps=2, head_steps=2, cfg=1.0, global_token_dependency=True)),
    ("joint_gan", dict(ar_steps=3, head_steps=3, cfg=2.0, head_steps_schedule="cosine", head_steps_end=1)),
]
IDS = [f"{variant}-{i}" for i, (variant, _) in enumerate(CASES)]


@pytest.mark.parametrize("variant,opts", CASES, ids=IDS)
def test_generate_is_bit_identical_to_the_old_loop(variant, opts):
    model = tiny_ar(variant, **SMALL)
    text, uncond = _text(2), _text(1, seed=1)
    want = oracle_generate(model, text, uncond, generator=torch.Generator().manual_seed(3), **opts)
    got = model.generate(text, uncond, generator=torch.Generator().manual_seed(3), **opts)
    assert torch.equal(got, want)


# Under the strict sync guard: every option with the reference; the torch backend and graph
# capture (CPU stand-in) run the same phases, checked on one gan and one joint_gan case.
SYNC_CASES = [(*CASES[i], "reference") for i in (0, 1, 2, 3, 4, 6, 7)] + [
    (*CASES[i], impl) for impl in ("torch", "graphs") for i in (1, 6)]


@pytest.mark.parametrize("variant,opts,impl", SYNC_CASES, ids=[f"{v}-{impl}-{i}" for i, (v, _, impl) in enumerate(SYNC_CASES)])
def test_generate_never_synchronises_with_the_host(variant, opts, impl):
    """No .item(), int(tensor), nonzero, masked_select, boolean indexing or index_put with a
    boolean mask anywhere in generate (aten ops listed in nitro_ar.fast.graphs.SYNC_OPS)."""
    from graph_standin import StandInGraphs

    model = tiny_ar(variant, **SMALL)
    if impl != "reference":
        fast.accelerate(model, backend="torch", graphs=False)
    if impl == "graphs":
        enable_graphs(model, GraphCache(StandInGraphs))
    text, uncond = _text(1), _text(1, seed=1)
    for count in model.sampling_plan(1, **opts).head_counts:
        model.head_schedule(count)  # host math on CPU tensors (cached): outside the guarded region
    with HostSyncs(strict=True):
        model.generate(text, uncond, generator=torch.Generator().manual_seed(0), **opts)


def test_the_sync_guard_catches_the_old_loop():
    model = tiny_ar("gan", **SMALL)
    counter = HostSyncs()
    with counter:
        oracle_generate(model, _text(1), _text(1, seed=1), ar_steps=2, head_steps=1, cfg=4.0)
    assert counter.syncs >= 4 and {"aten._local_scalar_dense.default", "aten.nonzero.default"} <= set(counter.ops)
    with pytest.raises(AssertionError, match="host synchronisation"), HostSyncs(strict=True):
        torch.ones(3)[torch.tensor([True, False, True])]
    with pytest.raises(AssertionError, match="index_put"), HostSyncs(strict=True):
        torch.ones(3).index_put_((torch.tensor([True, False, True]),), torch.tensor(0.0))


def test_plan_holds_the_host_numbers():
    model = tiny_ar("gan", **SMALL)
    plan = model.sampling_plan(2, ar_steps=4, head_steps=3, cfg=4.0, cfg_schedule="linear")
    assert [s.rows for s in plan.steps] == [s.hi - s.lo for s in plan.steps]
    assert sum(s.rows for s in plan.steps) == plan.seq  # each token predicted once
    assert plan.steps[-1].mask_len == 1 and plan.steps[-1].lo == 0
    assert [s.noise_offset for s in plan.steps] == [0] + [sum(2 * t.rows for t in plan.steps[:i]) for i in range(1, 4)]
    assert plan.steps[0].cfg < plan.steps[-1].cfg and plan.head_counts == (3,)
    orders = torch.stack([torch.randperm(plan.seq) for _ in range(2)])
    positions = plan.positions(orders)
    assert all(p.shape == (2, s.rows) for p, s in zip(positions, plan.steps))
    assert torch.equal(torch.cat(positions, 1).sort(1).values, torch.arange(plan.seq).expand(2, -1))
    assert hash(plan) == hash(model.sampling_plan(2, ar_steps=4, head_steps=3, cfg=4.0, cfg_schedule="linear"))


@pytest.mark.parametrize("kwargs,name", [
    (dict(cfg=float("nan")), "cfg"), (dict(cfg=float("inf")), "cfg"), (dict(cfg="4"), "cfg"), (dict(cfg=True), "cfg"),
    (dict(ar_steps=0), "ar_steps"), (dict(ar_steps=2.9), "ar_steps"), (dict(ar_steps=True), "ar_steps"),
    (dict(cfg_schedule="cosine"), "cfg_schedule"), (dict(head_steps_schedule="exp", head_steps_end=1), "head_steps_schedule"),
])
def test_bad_generate_arguments_are_named(kwargs, name):
    model = tiny_ar("gan", **SMALL)
    with pytest.raises(InvalidArgumentError, match=f"^{name}="):
        model.generate(_text(1), _text(1, seed=1), **kwargs)


def test_empty_batch_is_refused():
    model = tiny_ar("gan", **SMALL)
    with pytest.raises(InvalidArgumentError, match="^batch="):
        model.generate(_text(1)[:0], _text(1, seed=1))
