"""Baseline: the eager reference samplers end to end (backbone + head; text encoder and VAE excluded).

On a GPU the released full-size configs run; on CPU, reduced configs (said in the benchmark's
extra_info) so the suite stays quick. Every later speed-up is measured against these numbers.
"""
import pytest
import torch

from benchutil import ON_GPU, synchronized
from nitro_ar import NitroAR, NitroARConfig, NitroE, NitroEConfig

REDUCED = dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64, caption_channels=48)


def build(family: str, device: torch.device):
    """(model, text width, sampling kwargs) at full size on GPU, reduced on CPU."""
    if family == "nitro_e":
        cfg = NitroEConfig() if ON_GPU else NitroEConfig(**REDUCED)
        model, kwargs = NitroE(cfg), dict(steps=20 if ON_GPU else 4)
    else:
        extra = {} if ON_GPU else dict(REDUCED, diffloss_w=128, diffloss_d=2)
        cfg = NitroARConfig.for_variant(family, **extra)
        model, kwargs = NitroAR(cfg), {} if ON_GPU else dict(ar_steps=4)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    return model.to(device=device, dtype=dtype).eval(), cfg.caption_channels, kwargs


@pytest.mark.parametrize("family", ["gan", "joint_gan", "nitro_e"])
def test_reference_sampler(benchmark, device, family):
    model, width, kwargs = build(family, device)
    text = torch.randn(1, 128 if ON_GPU else 16, width, device=device, dtype=model.dtype)
    uncond = torch.randn_like(text)
    benchmark.group = f"reference-{family}"
    benchmark.extra_info.update(config="full" if ON_GPU else "reduced (CPU)", batch=1, **kwargs)

    def run():
        return model.generate(text, uncond, generator=torch.Generator(device).manual_seed(0), **kwargs)

    out = benchmark.pedantic(synchronized(run, device), rounds=3 if ON_GPU else 1, iterations=1, warmup_rounds=1)
    assert out.shape[1:] == (32, 16, 16)
