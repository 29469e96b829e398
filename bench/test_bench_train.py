"""Training throughput and peak memory: one optimizer step at batch 32, eager reference vs
``nitro_ar.fast``, for Nitro-AR masked AR pre-training and Nitro-E pre-training (rectified flow
+ REPA, the official stage-1 recipe: the fused backward passes of AdaLN-affine and ASA).

Runs the real loop (:class:`nitro_ar.train.Trainer`: MDS data loading, draws, forward, backward,
clipping, AdamW, EMA) on synthetic data. CPU: reduced models, fp32, a few steps. GPU: also the
full-size ``gan``, ``joint_gan`` and Nitro-E models, bf16 mixed precision. ``extra_info``
records samples/s, tokens/s (latent tokens), peak memory (GPU: ``torch.cuda.max_memory_allocated``;
CPU: the process's peak resident set, which only ever grows) and the fast backend actually used.

The Nitro-E post's anchor: the released recipe (stage 1, 100k steps of 2048 samples, and stage 2,
50k steps) trains in 1.5 days on 8 MI300X, i.e. about 2048 x 150k / (8 x 129600 s) ~ 296
samples/s per GPU; compare ``samples_per_s`` of the full-size Nitro-E case on one GPU.
"""
import json
import resource

import pytest
import torch

import nitro_ar.fast
from benchutil import ON_GPU, mean_seconds, synchronized
from nitro_ar.data import make_synthetic_dataset
from nitro_ar.train import Trainer, parse_config

BATCH = 32
REDUCED = dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64, caption_channels=48)
REDUCED_AR = dict(REDUCED, diffloss_w=128, diffloss_d=2)
# (model family, size, Nitro-AR variant or Nitro-E recipe)
CASES = [("nitro_ar", "reduced", "gan"), ("nitro_e", "reduced", "stage1")]
if ON_GPU:
    CASES += [("nitro_ar", "full", "gan"), ("nitro_ar", "full", "joint_gan"), ("nitro_e", "full", "stage1")]
IMPLS = ["eager", "fast"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return {
        "reduced": make_synthetic_dataset(root / "reduced", 2 * BATCH, text_shape=(128, 48), shard_size=BATCH, dino=True),
        "full": make_synthetic_dataset(root / "full", 2 * BATCH, text_shape=(128, 2048), shard_size=BATCH, dino=True)
        if ON_GPU else None,
    }


def _flags(model: str, size: str, variant: str):
    if model == "nitro_ar":
        flags = ["--variant", variant]
        return flags + (["--model-config", json.dumps(REDUCED_AR)] if size == "reduced" else [])
    # Nitro-E stage 1: REPA on (official projector width on GPU), grad clip 0.5, no EMA
    flags = ["--model", "nitro_e", "--repa-depth", "8", "--grad-clip", "0.5", "--learning-rate", "3e-4"]
    return flags + (["--model-config", json.dumps(REDUCED), "--projector-dim", "256"] if size == "reduced" else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model, size, variant", CASES)
def test_train_step(benchmark, device, datasets, tmp_path, model, size, variant, impl):
    flags = ["--data-dir", str(datasets[size]), "--output-dir", str(tmp_path),
             "--batch-size", str(BATCH), "--num-workers", "2" if ON_GPU else "0", "--progress", "false",
             "--fast", "true" if impl == "fast" else "false", *_flags(model, size, variant)]
    trainer = Trainer(parse_config(flags))
    first = trainer.train_step()  # warm-up: data workers, kernel selection, optimizer state
    assert torch.isfinite(torch.tensor(first["loss"]))
    assert trainer.fast_active == (impl == "fast")
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats(device)

    benchmark.group = f"train {model} {size} {variant} batch {BATCH}"
    benchmark.pedantic(synchronized(trainer.train_step, device), rounds=10 if ON_GPU else 1, iterations=1)
    peak = torch.cuda.max_memory_allocated(device) if ON_GPU else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    benchmark.extra_info.update(
        impl=impl, config=f"{model} {size} {variant}", batch=BATCH,
        precision=trainer.accelerator.mixed_precision,
        backend=nitro_ar.fast.backend_of(trainer.model) or "reference",
        peak_memory_mb=round(peak / 2**20, 1),
        peak_memory_kind="cuda max allocated" if ON_GPU else "process peak RSS",
    )
    seconds = mean_seconds(benchmark)
    if seconds:
        benchmark.extra_info.update(samples_per_s=round(BATCH / seconds, 3),
                                    tokens_per_s=round(BATCH * trainer.model.config.num_tokens / seconds, 1))
