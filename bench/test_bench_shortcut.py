"""Shortcut head vs flow-matching head on a toy conditional distribution (FAR's claim in small).

A mixture of 4 Gaussians in 32 dimensions per condition (4 conditions), the same MLP head
(width 128, depth 2) trained for the same steps and batch with flow matching and with the
shortcut objective, then sampled in 1, 2, 4 and 8 uniform Euler steps. The figure of merit is
the sliced 2-Wasserstein distance to true samples (mean over conditions), recorded in
``extra_info`` (``sw2_flow_matching``, ``sw2_shortcut``: {steps: distance}); the time is the
whole experiment's (both trainings and the evaluation), for reference only.

``teacher``: "online" (the online head gives the self-consistency targets, shortcut-models'
``bootstrap_ema=0``) or "ema" (the EMA of the weights, rate 0.99 at this short budget; its
published default is 0.999 over ~800k steps). Both heads sample with EMA weights in "ema".
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the toy is shared with the tests
from shortcut_toy import Toy, compare  # noqa: E402

STEPS = 600
BATCH = 256
FRACTION = 0.25


@pytest.mark.parametrize("teacher", ["online", "ema"])
def test_shortcut_vs_flow_matching_on_a_toy(benchmark, teacher):
    result = {}

    def run():
        result.update(compare(Toy(), steps=STEPS, batch=BATCH, width=128, samples=512, fraction=FRACTION,
                              ema_rate=0.99 if teacher == "ema" else None))

    benchmark.group = "shortcut toy (32-d mixtures): sliced W2 at 1/2/4/8 head steps"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(
        impl=f"shortcut-{teacher}", train_steps=STEPS, batch=BATCH, fraction=FRACTION,
        sw2_flow_matching={str(n): round(v, 4) for n, v in result["flow_matching"].items()},
        sw2_shortcut={str(n): round(v, 4) for n, v in result["shortcut"].items()},
    )
