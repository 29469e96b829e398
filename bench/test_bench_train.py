"""Training throughput and peak memory: one optimizer step of masked AR pre-training at batch 32,
eager reference vs ``nitro_ar.fast``.

Runs the real loop (:class:`nitro_ar.train.Trainer`: data loading, draws, forward, backward,
clipping, AdamW, EMA) on synthetic data. CPU: the reduced ``gan`` model, fp32, a few steps.
GPU: also the full-size ``gan`` and ``joint_gan`` models, bf16 mixed precision. ``extra_info``
records samples/s, tokens/s, peak memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: the
process's peak resident set, which only ever grows) and the fast backend actually used.
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
REDUCED = dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64, caption_channels=48,
               diffloss_w=128, diffloss_d=2)
CASES = [("reduced", "gan")] + ([("full", "gan"), ("full", "joint_gan")] if ON_GPU else [])
IMPLS = ["eager", "fast"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return {
        "reduced": make_synthetic_dataset(root / "reduced", 2 * BATCH, text_shape=(128, 48), shard_size=BATCH),
        "full": make_synthetic_dataset(root / "full", 2 * BATCH, text_shape=(128, 2048), shard_size=BATCH) if ON_GPU else None,
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size, variant", CASES)
def test_train_step(benchmark, device, datasets, tmp_path, size, variant, impl):
    flags = ["--data-dir", str(datasets[size]), "--output-dir", str(tmp_path), "--variant", variant,
             "--batch-size", str(BATCH), "--num-workers", "2" if ON_GPU else "0", "--progress", "false",
             "--fast", "true" if impl == "fast" else "false"]
    if size == "reduced":
        flags += ["--model-config", json.dumps(REDUCED)]
    trainer = Trainer(parse_config(flags))
    first = trainer.train_step()  # warm-up: data workers, kernel selection, optimizer state
    assert torch.isfinite(torch.tensor(first["loss"]))
    assert trainer.fast_active == (impl == "fast")
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats(device)

    benchmark.group = f"train {size} {variant} batch {BATCH}"
    benchmark.pedantic(synchronized(trainer.train_step, device), rounds=10 if ON_GPU else 1, iterations=1)
    peak = torch.cuda.max_memory_allocated(device) if ON_GPU else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    benchmark.extra_info.update(
        impl=impl, config=f"{size} {variant}", batch=BATCH,
        precision=trainer.accelerator.mixed_precision,
        backend=nitro_ar.fast.backend_of(trainer.model) or "reference",
        peak_memory_mb=round(peak / 2**20, 1),
        peak_memory_kind="cuda max allocated" if ON_GPU else "process peak RSS",
    )
    seconds = mean_seconds(benchmark)
    if seconds:
        benchmark.extra_info.update(samples_per_s=round(BATCH / seconds, 3),
                                    tokens_per_s=round(BATCH * trainer.model.config.num_tokens / seconds, 1))
