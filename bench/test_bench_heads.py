"""Head sampling: the eager reference loop vs the fast heads (kernels 3 and 4) vs torch.compile.

On a GPU the released sizes in bf16: the ``gan`` MLP head (width 768, depth 8, 3 Euler steps,
CFG 4) on the rows the cosine schedule predicts at each of 20 AR steps over 256 tokens (x 2 for
CFG), and the ``joint_gan`` transformer head (width 768, depth 8) on 2 x 256 tokens for 6
steps plus the global token. Cases: single AR iterations and the whole image (every AR step of
one image). On CPU: reduced widths, 4 AR steps, an 8 x 8 grid, fp32, and only eager and the
fast heads' torch backend (torch.compile's CPU compile time would dominate a quick run).

``extra_info``: launches per AR iteration (:func:`nitro_ar.fast.heads.count_launches`: device
kernels on a GPU, computing ops on CPU), the head's useful FLOPs (counted on the eager loop) and
TFLOP/s, rows, steps, backend.
"""
import copy
from typing import List

import pytest
import torch

import nitro_ar.fast as fast
from benchutil import ON_GPU, count_flops, record_rate, synchronized
from nitro_ar.fast.counting import count_launches
from nitro_ar.heads import MLPHead, TransformerHead, head_steps_schedule, sample_head
from nitro_ar.schedules import mar_mask_len

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
WIDTH, DEPTH = (768, 8) if ON_GPU else (128, 2)
Z_CHANNELS, CHANNELS = (768 if ON_GPU else 64), 32
GRID = 16 if ON_GPU else 8
TOKENS = GRID * GRID
AR_STEPS = 20 if ON_GPU else 4
CFG = 4.0
IMPLS = ["eager", "fast", "compile"] if ON_GPU else ["eager", "fast"]


def predicted_rows(ar_steps: int, seq_len: int) -> List[int]:
    """Tokens the MAR cosine schedule predicts at each AR step of one image."""
    rows, masked = [], seq_len
    for step in range(ar_steps):
        mask_len = 0 if step == ar_steps - 1 else mar_mask_len(step, ar_steps, seq_len, masked)
        rows.append(masked - mask_len)
        masked = mask_len
    return rows


ROWS = predicted_rows(AR_STEPS, TOKENS)


def build_head(kind: str, device: torch.device) -> torch.nn.Module:
    if kind == "gan":
        head = MLPHead(CHANNELS, WIDTH, DEPTH, Z_CHANNELS)
    else:
        head = TransformerHead(CHANNELS, WIDTH, DEPTH, Z_CHANNELS, grid=GRID)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.02)
    return head.to(device=device, dtype=DTYPE).eval()


def implementation(head: torch.nn.Module, impl: str) -> torch.nn.Module:
    """The network sample_head runs: the reference, the fast drop-in, or the compiled reference."""
    if impl == "fast":
        return fast.accelerate(copy.deepcopy(head), graphs=False)
    if impl == "compile":  # Module.compile keeps the class: sample() calls the compiled forward
        compiled = copy.deepcopy(head)
        compiled.compile()
        return compiled
    return head


def sampling_calls(kind: str, case: str, device: torch.device):
    """[(z, noise, schedule)] of one case: one AR iteration, or every one of an image."""
    transformer = kind == "joint_gan"
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=DTYPE)

    if transformer:
        steps = head_steps_schedule(6, True, 1000, 1.0)
        main = (randn(2, TOKENS, Z_CHANNELS), randn(1, TOKENS, CHANNELS), steps)
        global_token = (randn(2, 1, Z_CHANNELS), randn(1, 1, CHANNELS), steps)
        return {"tokens": [main], "global": [global_token], "image": [global_token, main]}[case]
    steps = head_steps_schedule(3, False, 1000, 1.0)
    ar_steps = range(AR_STEPS) if case == "image" else [int(case.removeprefix("ar_step"))]
    return [(randn(2 * ROWS[k], Z_CHANNELS), randn(ROWS[k], CHANNELS), steps) for k in ar_steps]


def _case_ids(kind: str) -> List[str]:
    if kind == "joint_gan":
        return ["tokens", "global", "image"]
    return [f"ar_step{k}" for k in sorted({0, AR_STEPS // 2 - 1, AR_STEPS - 1})] + ["image"]


CASES = [(kind, case) for kind in ("gan", "joint_gan") for case in _case_ids(kind)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,case", CASES, ids=[f"{kind}-{case}" for kind, case in CASES])
def test_head_sampling(benchmark, device, kind, case, impl):
    reference = build_head(kind, device)
    net = implementation(reference, impl)
    calls = sampling_calls(kind, case, device)

    def run():
        with torch.no_grad():
            return [sample_head(net, z, noise, steps, CFG) for z, noise, steps in calls]

    benchmark.group = f"head {kind} {case}"
    benchmark.extra_info.update(
        impl=impl, config="full (bf16)" if ON_GPU else "reduced (CPU, fp32)", width=WIDTH, depth=DEPTH,
        rows=[z.shape[0] * (z.shape[1] if z.dim() == 3 else 1) for z, _, _ in calls], head_steps=len(calls[0][2]),
        ar_iterations=len(calls), backend=fast.backend_of(net) or impl,
    )
    timed = synchronized(run, device)
    outputs = benchmark.pedantic(timed, rounds=10 if ON_GPU else 5, iterations=1, warmup_rounds=2 if ON_GPU else 1)
    assert all(torch.isfinite(out).all() for out in outputs)

    launches = count_launches(run, device)
    with torch.no_grad():  # useful work, counted on the eager loop (the kernels hide theirs from the counter)
        flops = count_flops(lambda: [sample_head(reference, z, noise, steps, CFG) for z, noise, steps in calls])
    benchmark.extra_info.update(launches=launches, launches_per_ar_iteration=launches / len(calls))
    record_rate(benchmark, device, flops=flops)
