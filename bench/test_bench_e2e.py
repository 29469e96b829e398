"""End to end: backbone + head sampling (text encoder and VAE excluded), reference vs fast.

Columns (``impl``): "eager" (the reference), "compile" (torch.compile of the reference networks,
GPU only: on CPU the inductor build alone takes minutes), "fast" (``nitro_ar.fast.accelerate``
without graphs), "fast+graphs" and "fast-library+graphs" (library GEMMs,
``NITRO_AR_GEMM=library``; GPU only). Released full-size configs at batch 1 (latency)
and 32 (throughput) on a GPU, with time per image and images/s; reduced configs at batch 1 on
CPU, said in ``extra_info``.

``test_work_per_image`` records, everywhere and without timing, what one image costs at full
size with the released sampling settings at batch 1 and 32: kernels (aten ops that compute +
Triton launches) and host synchronisations, for eager, fast with library GEMMs and fast with
fused GEMMs (:func:`nitro_ar.fast.counting.work_per_image`). The model runs on the meta device,
so nothing computes and a full-size count takes seconds on CPU.
"""
import pytest
import torch

import nitro_ar.fast
from benchutil import ON_GPU, count_flops, mean_seconds, record_rate, synchronized
from nitro_ar import NitroAR, NitroARConfig, NitroE, NitroEConfig
from nitro_ar.fast.counting import IMPLEMENTATIONS, work_per_image
from nitro_ar.kernels.backend import ENV_GEMM

REDUCED = dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64, caption_channels=48)
FAMILIES = ["gan", "joint_gan", "nitro_e"]
BATCHES = [1, 32] if ON_GPU else [1]
IMPLS = ["eager", "fast"] + (["compile", "fast+graphs", "fast-library+graphs"] if ON_GPU else [])


def build(family: str, device: torch.device):
    """(model, text width, sampling kwargs): released sampling settings on GPU; on CPU fewer steps."""
    if family == "nitro_e":
        cfg = NitroEConfig() if ON_GPU else NitroEConfig(**REDUCED)
        model, kwargs = NitroE(cfg), dict(steps=20 if ON_GPU else 4, cfg=4.5)
    else:
        extra = {} if ON_GPU else dict(REDUCED, diffloss_w=128, diffloss_d=2)
        cfg = NitroARConfig.for_variant(family, **extra)
        model = NitroAR(cfg)
        kwargs = dict(cfg=4.0) if ON_GPU or family == "joint_gan" else dict(cfg=4.0, ar_steps=8)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    return model.to(device=device, dtype=dtype).eval(), cfg.caption_channels, kwargs


def prepare(model, impl: str):
    if impl.startswith("fast"):
        nitro_ar.fast.accelerate(model, graphs=impl.endswith("+graphs"))
    elif impl == "compile":
        mode = "max-autotune-no-cudagraphs"
        if isinstance(model, NitroAR):
            # Module.compile keeps the head's class, so its sample() calls the compiled forward.
            model.diffloss.net.compile(mode=mode, dynamic=True)
            model.backbone = torch.compile(model.backbone, mode=mode)
        else:
            model.compile(mode=mode)
    return model


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate(benchmark, device, family, batch, impl, monkeypatch):
    model, width, kwargs = build(family, device)
    text = torch.randn(batch, 128 if ON_GPU else 16, width, device=device, dtype=model.dtype)
    uncond = torch.randn(1, text.shape[1], width, device=device, dtype=model.dtype)

    def run():
        return model.generate(text, uncond, generator=torch.Generator(device).manual_seed(0), **kwargs)

    flops = count_flops(run)  # of the reference, before any swap
    reference = run()
    if "library" in impl:
        monkeypatch.setenv(ENV_GEMM, "library")
    prepare(model, impl)
    benchmark.group = f"e2e {family} batch {batch}"
    out = benchmark.pedantic(synchronized(run, device), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(impl=impl, config="full size" if ON_GPU else "reduced (CPU)", batch=batch,
                                sampling=kwargs, backend=nitro_ar.fast.backend_of(model) or "reference")
    record_rate(benchmark, device, flops=flops)
    seconds = mean_seconds(benchmark)
    if seconds:
        benchmark.extra_info["images_per_s"] = round(batch / seconds, 3)
        benchmark.extra_info["ms_per_image"] = round(1e3 * seconds / batch, 3)
    # Same numbers as the reference: fp32 rounding on CPU, bf16 rounding (relative norm) on GPU.
    error = (out.float() - reference.float()).norm() / reference.float().norm()
    assert error < (5e-2 if ON_GPU else 1e-4), f"{impl} differs from the reference by {error:.2e}"


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_work_per_image(benchmark, family, impl, batch):
    """Kernels and host syncs per image: full size, released sampling settings, meta device;
    eager, fast with library GEMMs (``NITRO_AR_GEMM=library``) and fast with fused GEMMs."""
    work = work_per_image(family, impl, batch)
    benchmark.group = f"work per image {family} batch {batch}"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the record; counts are not timings
    benchmark.extra_info.update(impl=impl, config="full size", batch=batch, timed=False, **work)
    assert work["host_syncs_per_image"] == 0
