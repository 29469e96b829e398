"""Nitro-AR training on Hugging Face Accelerate: masked AR pre-training and adversarial head
fine-tuning (see :mod:`nitro_ar.objectives` for the losses, :mod:`nitro_ar.data` for the data).

Usage::

    nitro-ar train CONFIG.yaml [--key value ...]          # or: python -m nitro_ar.train ...
    accelerate launch --multi_gpu --num_processes 8 -m nitro_ar.train CONFIG.yaml

Every :class:`TrainConfig` field is a YAML key and a ``--flag`` (underscores become dashes);
flags override the file. Data parallelism (DDP) is Accelerate's: each process reads its slice
of every global batch. Checkpoints (``OUTPUT_DIR/checkpoints/step-XXXXXXXX``) hold the model in
the project's layout (``model/``: ``NitroAR.from_pretrained`` loads it), the EMA weights
(``ema/``) when on, the optimizer(s), learning-rate schedule(s), per-process RNG states and
the data position; ``checkpoints/latest`` names the newest. A run resumes from it by default
and continues exactly as if it had not stopped.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, read_state_dict, write_safetensors_atomic, write_text_atomic
from .config import NitroARConfig
from .data import DatasetError, PairDataset
from .errors import ConfigError
from .nitro_ar_model import NitroAR
from .tensorar import AGE_NOISE, RefineObjective, draw_refine_step, with_refine_window
from .objectives import (
    HeadGenerator,
    MaskedARObjective,
    ObjectiveSettings,
    TokenDiscriminator,
    discriminator_loss,
    draw_step,
    freeze_all_but_head,
    generator_loss,
    mix_seed,
    official_head_init,
)

logger = logging.getLogger("nitro_ar.train")

__all__ = ["TrainConfig", "ConfigError", "Trainer", "parse_config", "main"]

MODES = ("pretrain", "adversarial", "refine")
PRECISIONS = ("auto", "no", "bf16")
LATEST = "latest"
STATE_NAME = "state.json"
LOG_NAME = "train_log.jsonl"


def _opt(default, help: str, parse=None):
    return field(default=default, metadata={"help": help, "parse": parse})


def _opt_factory(factory, help: str, parse=None):
    return field(default_factory=factory, metadata={"help": help, "parse": parse})


def _parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_json_dict(text) -> dict:
    value = json.loads(text) if isinstance(text, str) else text
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


@dataclass
class TrainConfig:
    """Settings of a training run (defaults: the released Nitro-AR ``gan`` config)."""

    data_dir: str = _opt("", "dataset folder written by `nitro-ar precompute` (or make_synthetic_dataset)", str)
    output_dir: str = _opt("", "where checkpoints and the log go", str)
    mode: str = _opt("pretrain", "pretrain (masked AR flow matching), adversarial (head fine-tuning) or refine "
                     "(TensorAR-style refinement window, nitro_ar.tensorar)", str)
    variant: Optional[str] = _opt(None, "gan or joint_gan for a new model (default gan; init_from fixes it otherwise)", str)
    model_config: Dict = _opt_factory(dict, "JSON object of NitroARConfig overrides for a new model", _parse_json_dict)
    init_from: Optional[str] = _opt(None, "checkpoint to start from (required for adversarial mode)", str)
    seed: int = _opt(0, "seed of the model init, data order and every random draw", int)
    batch_size: int = _opt(32, "samples per process and micro-batch", int)
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step", int)
    max_steps: int = _opt(50000, "optimizer steps to train for (in total, over resumes)", int)
    learning_rate: float = _opt(1e-4, "AdamW learning rate (official joint_gan: 3e-4)", float)
    weight_decay: float = _opt(0.03, "AdamW weight decay", float)
    adam_eps: float = _opt(1e-10, "AdamW epsilon", float)
    adam_beta1: float = _opt(0.9, "AdamW beta1", float)
    adam_beta2: float = _opt(0.999, "AdamW beta2", float)
    warmup_steps: int = _opt(500, "linear learning-rate warm-up from 0 (then constant)", int)
    grad_clip: float = _opt(1.0, "gradient-norm clipping (official joint_gan: 0.5); 0 disables", float)
    ema: Optional[bool] = _opt(None, "keep an EMA of the weights (default: on for gan pre-training, as released)", _parse_bool)
    ema_rate: float = _opt(0.9999, "EMA decay per optimizer step", float)
    gradient_checkpointing: bool = _opt(False, "recompute backbone blocks in backward to save memory", _parse_bool)
    mixed_precision: str = _opt("auto", "auto (bf16 on GPU, fp32 on CPU), no or bf16", str)
    fast: Optional[bool] = _opt(None, "train through nitro_ar.fast (default: on when a GPU is present)", _parse_bool)
    mask_ratio_min: float = _opt(0.7, "lower bound of the mask ratio", float)
    ratio_sampling: str = _opt("mar", "mask ratio law: mar (truncated normal) or maskgit (cosine)", str)
    diffusion_batch_mul: Optional[int] = _opt(None, "head passes per token (default: 2 gan, 1 joint_gan)", int)
    text_dropout: float = _opt(0.1, "probability of replacing a prompt by the empty prompt", float)
    logit_mean: float = _opt(0.0, "mean of the logit-normal timestep law", float)
    logit_std: float = _opt(1.0, "std of the logit-normal timestep law", float)
    global_token_dependency: bool = _opt(False, "joint_gan: fill every masked input with the global token", _parse_bool)
    global_loss_weight: float = _opt(1.0, "joint_gan: weight of the global-token loss", float)
    adv_head_steps: Optional[int] = _opt(None, "adversarial: head Euler steps (default: the model's, 3 gan / 6 joint_gan)", int)
    disc_learning_rate: Optional[float] = _opt(None, "adversarial: discriminator learning rate (default: learning_rate)", float)
    disc_hidden: int = _opt(256, "adversarial: width of the discriminator MLP", int)
    refine_window: int = _opt(4, "refine: window k (tokens of the last k - 1 AR steps are re-predicted)", int)
    refine_noise: str = _opt("sine", "refine: input noise over age: linear, sine, sqrt or exponential", str)
    refine_ar_steps: Optional[int] = _opt(None, "refine: AR steps K of the band schedule (default: the model's)", int)
    on_bad_shard: str = _opt("error", "error or skip: what to do with unreadable / inconsistent shards", str)
    num_workers: int = _opt(2, "DataLoader worker processes per training process", int)
    save_every: int = _opt(1000, "checkpoint every N optimizer steps (a final one is always written)", int)
    keep_checkpoints: int = _opt(3, "how many step checkpoints to keep (0: all)", int)
    log_every: int = _opt(10, "tracker / console logging period in steps (the JSONL log has every step)", int)
    resume_from: str = _opt("auto", "auto (latest checkpoint in output_dir, if any), none, or a checkpoint folder", str)
    report_to: str = _opt("none", "Accelerate tracker: none, tensorboard, wandb, ...", str)
    progress: bool = _opt(True, "show a progress bar", _parse_bool)

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        need(bool(self.data_dir), "data_dir is required")
        need(bool(self.output_dir), "output_dir is required")
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.variant in (None, "gan", "joint_gan"), f"variant must be gan or joint_gan, got {self.variant!r}")
        need(self.mixed_precision in PRECISIONS, f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        need(self.on_bad_shard in ("error", "skip"), f"on_bad_shard must be error or skip, got {self.on_bad_shard!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "save_every", "log_every", "disc_hidden"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep_checkpoints", "num_workers", "weight_decay", "grad_clip"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(0.0 <= self.ema_rate < 1.0, f"ema_rate must be in [0, 1), got {self.ema_rate}")
        need(self.mode != "refine" or self.refine_window >= 2, f"refine_window must be >= 2, got {self.refine_window}")
        need(self.refine_noise in AGE_NOISE, f"refine_noise must be one of {AGE_NOISE}, got {self.refine_noise!r}")
        need(not (self.init_from and self.model_config), "model_config applies to a new model; init_from fixes the architecture")

    def objective_settings(self, joint: bool) -> ObjectiveSettings:
        mul = self.diffusion_batch_mul if self.diffusion_batch_mul is not None else (1 if joint else 2)
        return ObjectiveSettings(
            mask_ratio_min=self.mask_ratio_min, ratio_sampling=self.ratio_sampling, diffusion_batch_mul=mul,
            text_dropout=self.text_dropout, logit_mean=self.logit_mean, logit_std=self.logit_std,
            global_token_dependency=self.global_token_dependency, global_loss_weight=self.global_loss_weight,
        )


def _load_yaml(path: str) -> dict:
    try:
        import yaml
    except ImportError as err:
        raise ConfigError("reading a YAML config needs pyyaml: pip install 'nitro-ar[train]'") from err
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return data


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """TrainConfig from ``[CONFIG.yaml] [--field value ...]`` (flags override the file)."""
    fields = dataclasses.fields(TrainConfig)
    parser = argparse.ArgumentParser(prog="nitro-ar train", description="Train Nitro-AR (masked AR pre-training or adversarial head fine-tuning).")
    parser.add_argument("config", nargs="?", help="YAML file of settings")
    for f in fields:
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                            type=f.metadata["parse"], help=f.metadata["help"])
    args = vars(parser.parse_args(argv))
    values = _load_yaml(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    names = {f.name: f for f in fields}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown settings in the config file: {unknown}")
    try:
        parsed = {k: (v if v is None else names[k].metadata["parse"](v)) for k, v in values.items()}
    except ValueError as err:
        raise ConfigError(f"bad value in the config file: {err}") from err
    parsed.update(args)
    cfg = TrainConfig(**parsed)
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------
# data order
# --------------------------------------------------------------------------------------------
class GlobalBatchSampler:
    """Index lists of this process's slice of successive global batches, for ever.

    The sample stream is the concatenation of per-epoch permutations (seeded by (seed, epoch));
    global batch k covers stream positions ``[start + k G, start + (k + 1) G)``, G = local batch
    x processes, and process r takes the r-th local slice. The data position of a run is the
    stream position, so resuming continues with exactly the next samples.
    """

    def __init__(self, num_samples: int, local_batch: int, num_processes: int, process_index: int, seed: int, start: int):
        self.num_samples, self.local_batch = num_samples, local_batch
        self.num_processes, self.process_index = num_processes, process_index
        self.seed, self.start = seed, start
        self._epoch, self._perm = -1, None

    def _sample(self, position: int) -> int:
        epoch = position // self.num_samples
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, -2))
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=gen)
        return int(self._perm[position % self.num_samples])

    def __iter__(self) -> Iterator[List[int]]:
        position = self.start + self.process_index * self.local_batch
        stride = self.local_batch * self.num_processes
        while True:
            yield [self._sample(position + i) for i in range(self.local_batch)]
            position += stride


# --------------------------------------------------------------------------------------------
# checkpoint pieces
# --------------------------------------------------------------------------------------------
class WarmupConstant:
    """Learning-rate factor: linear warm-up from 0 over ``warmup_steps``, then 1 (diffusers'
    ``get_constant_schedule_with_warmup``, as the official loop). Stateless, so the scheduler's
    state_dict is plain JSON."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return step / max(1, self.warmup_steps) if step < self.warmup_steps else 1.0


def _save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, name: str) -> None:
    """Optimizer state as ``{name}.safetensors`` (tensors) + ``{name}.json`` (the rest)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    write_safetensors_atomic(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def _load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, name: str) -> None:
    meta = json.loads((directory / f"{name}.json").read_text())
    entries: Dict[int, Dict[str, object]] = {}
    for source in (read_state_dict(directory / f"{name}.safetensors"), meta["scalars"]):
        for key, value in source.items():
            pid, attr = key.split(".", 1)
            entries.setdefault(int(pid), {})[attr] = value
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})


def _rng_state() -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _set_rng_state(state: Dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class EMA:
    """Exponential moving average (float32) of the trainable parameters, by name."""

    def __init__(self, named_params: Sequence[Tuple[str, nn.Parameter]], rate: float):
        self.rate = rate
        self.params = dict(named_params)
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.rate)

    def state_dict_over(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``state`` (a model state dict) with the averaged tensors in place of the trained ones."""
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in state.items()}

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(state[name])


def _apply_fast(model: NitroAR, enabled: bool) -> Tuple[NitroAR, bool]:
    """The model through ``nitro_ar.fast.accelerate``, or the eager model (with one log line)
    when the fast path is off, missing, or fails for this model."""
    if not enabled:
        return model, False
    try:
        from .fast import accelerate as fast_accelerate
    except ImportError as err:
        logger.warning("nitro_ar.fast.accelerate is not available (%s); training on the eager reference", err)
        return model, False
    try:
        return fast_accelerate(model, graphs=False), True
    except Exception as err:  # noqa: BLE001 -- any failure of the optional fast path falls back to eager
        logger.warning("nitro_ar.fast.accelerate failed for this model (%s: %s); training on the eager reference",
                       type(err).__name__, err)
        return model, False


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """One training run: build everything from a :class:`TrainConfig`, resume if asked, train.

    ``train()`` runs to ``max_steps``; ``train_step()`` does one optimizer step (all its
    micro-batches) and returns its metrics (used by the benchmarks).
    """

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator

        cfg.validate()
        self.cfg = cfg
        precision = cfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = acc = Accelerator(
            # Without a GPU, cpu=True makes a torchrun / `accelerate launch` job multi-process (gloo).
            cpu=not torch.cuda.is_available(),
            mixed_precision=precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=cfg.output_dir,
        )
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        if acc.is_main_process:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)

        self.dataset = PairDataset(cfg.data_dir, on_bad_shard=cfg.on_bad_shard)
        resume = self._find_resume()
        self.model = self._build_model(resume)
        if cfg.mode == "refine":  # released or pre-trained weights + a zero age embedding
            self.model = with_refine_window(self.model, cfg.refine_window)
        self._check_data_fits()
        self.adversarial = cfg.mode == "adversarial"
        settings = cfg.objective_settings(self.model.is_joint)

        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        # On the training device first: the fast path picks its backend from the weights' device.
        self.model.to(acc.device)
        fast = cfg.fast if cfg.fast is not None else torch.cuda.is_available()
        self.model, self.fast_active = _apply_fast(self.model, fast)
        if self.adversarial:
            trainable = freeze_all_but_head(self.model)
        else:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
        ids = {id(p) for p in trainable}
        self.model.train()

        empty = self.dataset.empty_text()
        self.optimizer = self._adamw(trainable, cfg.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupConstant(cfg.warmup_steps))
        if self.adversarial:
            head_steps = cfg.adv_head_steps or self.model.config.head_steps
            torch.manual_seed(mix_seed(cfg.seed, 1))
            self.discriminator = TokenDiscriminator(self.model, cfg.disc_hidden)
            if resume is not None:
                self.discriminator.load_state_dict(read_state_dict(resume / "discriminator.safetensors"))
            self.disc_optimizer = self._adamw(list(self.discriminator.parameters()), cfg.disc_learning_rate or cfg.learning_rate)
            self.disc_scheduler = torch.optim.lr_scheduler.LambdaLR(self.disc_optimizer, WarmupConstant(cfg.warmup_steps))
            generator = HeadGenerator(self.model, empty, settings, head_steps)
            self.train_module, self.optimizer, self.discriminator_ddp, self.disc_optimizer = acc.prepare(
                generator, self.optimizer, self.discriminator, self.disc_optimizer
            )
        else:
            objective = (RefineObjective(self.model, empty, settings, noise=cfg.refine_noise, ar_steps=cfg.refine_ar_steps)
                         if cfg.mode == "refine" else MaskedARObjective(self.model, empty, settings))
            self.train_module, self.optimizer = acc.prepare(objective, self.optimizer)
        self.trainable = trainable
        self.settings = settings
        # After prepare: the shadow lives on the training device.
        use_ema = cfg.ema if cfg.ema is not None else (not self.adversarial and not self.model.is_joint)
        self.ema = EMA([(n, p) for n, p in self.model.named_parameters() if id(p) in ids], cfg.ema_rate) if use_ema else None

        self.step = 0
        self.samples_consumed = 0
        if resume is not None:
            self._load_training_state(resume)
        self.global_batch = cfg.batch_size * acc.num_processes
        sampler = GlobalBatchSampler(len(self.dataset), cfg.batch_size, acc.num_processes, acc.process_index,
                                     cfg.seed, self.samples_consumed)
        self.batches = iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                       pin_memory=acc.device.type == "cuda", persistent_workers=cfg.num_workers > 0))
        if acc.is_main_process:
            logger.info("training %s (%s, %.1fM trainable parameters) on %d process(es), global batch %d x %d accumulation, "
                        "precision %s, %s path; %d samples in %s",
                        self.model.config.variant, cfg.mode, sum(p.numel() for p in trainable) / 1e6, acc.num_processes,
                        self.global_batch, cfg.gradient_accumulation_steps, precision,
                        "fast" if self.fast_active else "eager", len(self.dataset), cfg.data_dir)

    # ------------------------------------------------------------------ construction
    def _adamw(self, params: List[nn.Parameter], lr: float) -> torch.optim.AdamW:
        cfg = self.cfg
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay)

    def _find_resume(self) -> Optional[Path]:
        choice = self.cfg.resume_from
        if choice == "none":
            return None
        if choice == "auto":
            latest = self.ckpt_root / LATEST
            if not latest.is_file():
                return None
            path = self.ckpt_root / latest.read_text().strip()
        else:
            path = Path(choice)
        if not (path / STATE_NAME).is_file():
            raise CheckpointError(f"cannot resume from {path}: no {STATE_NAME} (not a training checkpoint)")
        return path

    def _build_model(self, resume: Optional[Path]) -> NitroAR:
        cfg = self.cfg
        config = None
        if not cfg.init_from:
            if cfg.mode == "adversarial" and resume is None:
                raise ConfigError("adversarial mode fine-tunes a trained model: pass init_from")
            try:
                config = NitroARConfig.for_variant(cfg.variant or "gan", **cfg.model_config)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"bad model_config {cfg.model_config}: {err}") from err
        if resume is not None or cfg.init_from:
            source = resume / "model" if resume is not None else Path(cfg.init_from)
            model = NitroAR.from_pretrained(source, dtype=torch.float32)
            if cfg.variant is not None and model.config.variant != cfg.variant:
                raise ConfigError(f"variant {cfg.variant!r} asked for, but {source} holds a {model.config.variant!r} model")
            if config is not None and cfg.mode == "pretrain" and model.config != config:
                raise ConfigError(f"{source} holds a model of another configuration than variant/model_config ask for")
            return model
        torch.manual_seed(cfg.seed)
        model = NitroAR(config)
        official_head_init(model)
        return model

    def _check_data_fits(self) -> None:
        mcfg, data = self.model.config, self.dataset
        latent = (mcfg.in_channels, mcfg.sample_size, mcfg.sample_size)
        if tuple(data.latent_shape) != latent:
            raise DatasetError(f"{data.root}: latents are {tuple(data.latent_shape)} but the model takes {latent}")
        if data.text_shape[-1] != mcfg.caption_channels:
            raise DatasetError(f"{data.root}: text embeddings have {data.text_shape[-1]} channels but the model's "
                               f"caption_channels is {mcfg.caption_channels} (wrong text encoder?)")
        if self.model.is_joint and not data.has_thumbnails:
            raise DatasetError(f"{data.root} has no global-token thumbnails, which joint_gan training needs "
                               "(rebuild it with `nitro-ar precompute` without --no-thumbnails)")

    # ------------------------------------------------------------------ steps
    def _next_batch(self) -> Dict[str, torch.Tensor]:
        batch = next(self.batches)
        return {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}

    def _draws(self, micro: int):
        acc, cfg = self.accelerator, self.cfg
        base = micro * self.global_batch + acc.process_index * cfg.batch_size
        draw = draw_refine_step if cfg.mode == "refine" else draw_step
        draws = draw(self.model, self.settings, seed=cfg.seed, step=self.step, positions=range(base, base + cfg.batch_size))
        return draws.to(acc.device)

    def _micro_batches(self, module: nn.Module) -> Iterator[Tuple[Dict[str, torch.Tensor], object, contextlib.AbstractContextManager]]:
        """(batch, draws, gradient-sync context) for each micro-batch of this step; gradients
        are only all-reduced on the last one."""
        accum = self.cfg.gradient_accumulation_steps
        for micro in range(accum):
            batch, draws = self._next_batch(), self._draws(micro)
            self.samples_consumed += self.global_batch
            sync = self.accelerator.no_sync(module) if micro < accum - 1 else contextlib.nullcontext()
            yield batch, draws, sync

    def _clip_and_step(self, params, optimizer, scheduler) -> float:
        """Clip, step (skipped, with a warning, when the gradient norm is not finite), zero."""
        acc = self.accelerator
        if self.cfg.grad_clip > 0:
            norm = acc.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norm = float(norm)
        if math.isfinite(norm):
            optimizer.step()
        else:
            logger.warning("step %d: non-finite gradient norm (%s); update skipped", self.step, norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _pretrain_step(self) -> Dict[str, float]:
        acc, accum = self.accelerator, self.cfg.gradient_accumulation_steps
        totals: Dict[str, torch.Tensor] = {}
        for batch, draws, sync in self._micro_batches(self.train_module):
            with sync, acc.autocast():
                losses = self.train_module(batch["latents"], batch["text"], draws, batch.get("thumbnail"))
                acc.backward(losses["loss"] / accum)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / accum
        metrics = {"grad_norm": self._clip_and_step(self.trainable, self.optimizer, self.scheduler)}
        if self.ema is not None:
            self.ema.update()
        metrics.update({k: float(acc.reduce(v, "mean")) for k, v in totals.items()})
        return metrics

    def _adversarial_step(self) -> Dict[str, float]:
        acc, accum = self.accelerator, self.cfg.gradient_accumulation_steps
        disc = self.discriminator
        disc_params = list(disc.parameters())
        g_total, d_total, real_score, fake_score = 0.0, 0.0, 0.0, 0.0
        generated = []
        # Generator update: the discriminator scores the few-step samples, its weights held.
        for param in disc_params:
            param.requires_grad_(False)
        for batch, draws, sync in self._micro_batches(self.train_module):
            with sync, acc.autocast():
                fake, real, text, mask = self.train_module(batch["latents"], batch["text"], draws, batch.get("thumbnail"))
                g_loss = generator_loss(disc(fake, text, mask))
                acc.backward(g_loss / accum)
            g_total += g_loss.detach() / accum
            generated.append((fake.detach(), real, text, mask))
        for param in disc_params:
            param.requires_grad_(True)
        g_norm = self._clip_and_step(self.trainable, self.optimizer, self.scheduler)
        if self.ema is not None:
            self.ema.update()
        # Discriminator update on the same samples: real and generated in one forward.
        for micro, (fake, real, text, mask) in enumerate(generated):
            sync = acc.no_sync(self.discriminator_ddp) if micro < accum - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                logits = self.discriminator_ddp(torch.cat([real, fake]), torch.cat([text, text]), torch.cat([mask, mask]))
                real_logits, fake_logits = logits.chunk(2)
                d_loss = discriminator_loss(real_logits, fake_logits)
                acc.backward(d_loss / accum)
            d_total += d_loss.detach() / accum
            real_score += torch.sigmoid(real_logits.detach()).mean() / accum
            fake_score += torch.sigmoid(fake_logits.detach()).mean() / accum
        d_norm = self._clip_and_step(disc_params, self.disc_optimizer, self.disc_scheduler)
        reduced = {k: float(acc.reduce(v, "mean")) for k, v in
                   {"g_loss": g_total, "d_loss": d_total, "d_real": real_score, "d_fake": fake_score}.items()}
        return {"loss": reduced["g_loss"], **reduced, "grad_norm": g_norm, "d_grad_norm": d_norm}

    def train_step(self) -> Dict[str, float]:
        """One optimizer step (of the generator and the discriminator in adversarial mode)."""
        metrics = self._adversarial_step() if self.adversarial else self._pretrain_step()
        self.step += 1
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def train(self) -> Dict[str, float]:
        """Train to ``max_steps`` with logging and checkpoints; returns the last step's metrics."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        if cfg.report_to != "none":
            acc.init_trackers("nitro-ar", config={k: v for k, v in dataclasses.asdict(cfg).items() if not isinstance(v, dict)})
        if acc.is_main_process:
            (self.output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.mode, unit="step",
                   disable=not (cfg.progress and acc.is_local_main_process))
        samples_per_step = self.global_batch * cfg.gradient_accumulation_steps
        metrics: Dict[str, float] = {}
        saved_at = self.step
        while self.step < cfg.max_steps:
            start = time.perf_counter()
            metrics = self.train_step()
            elapsed = time.perf_counter() - start
            metrics["samples_per_s"] = samples_per_step / elapsed
            metrics["tokens_per_s"] = metrics["samples_per_s"] * self.model.config.num_tokens
            if acc.is_main_process:
                with open(self.output_dir / LOG_NAME, "a") as handle:
                    handle.write(json.dumps({"step": self.step, **metrics}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", gnorm=f"{metrics['grad_norm']:.3f}",
                            sps=f"{metrics['samples_per_s']:.1f}")
            if self.step % cfg.log_every == 0:
                acc.log(metrics, step=self.step)
                if acc.is_main_process and not cfg.progress:
                    logger.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if self.step % cfg.save_every == 0:
                self.save_checkpoint()
                saved_at = self.step
        bar.close()
        if saved_at != self.step:
            self.save_checkpoint()
        acc.end_training()
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-XXXXXXXX`` (through a hidden partial folder renamed when
        complete) and point ``checkpoints/latest`` at it; prune old ones."""
        acc, cfg = self.accelerator, self.cfg
        name = f"step-{self.step:08d}"
        final, partial = self.ckpt_root / name, self.ckpt_root / f".{name}.partial"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        write_safetensors_atomic(_rng_state(), partial / f"rng-{acc.process_index}.safetensors")
        if acc.is_main_process:
            model = self.model
            model.save_pretrained(partial / "model")
            if self.ema is not None:
                with torch.device("meta"):
                    averaged = NitroAR(model.config)
                averaged.load_state_dict(self.ema.state_dict_over(model.state_dict()), assign=True)
                averaged.save_pretrained(partial / "ema")
            _save_optimizer(self.optimizer.optimizer, partial, "optimizer")
            schedulers = {"scheduler": self.scheduler.state_dict()}
            if self.adversarial:
                write_safetensors_atomic(self.discriminator.state_dict(), partial / "discriminator.safetensors")
                _save_optimizer(self.disc_optimizer.optimizer, partial, "disc_optimizer")
                schedulers["disc_scheduler"] = self.disc_scheduler.state_dict()
            state = {
                "step": self.step, "samples_consumed": self.samples_consumed, "global_batch": self.global_batch,
                "num_processes": acc.num_processes, "mode": cfg.mode, "variant": model.config.variant,
                "seed": cfg.seed, **schedulers,
            }
            (partial / STATE_NAME).write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            write_text_atomic(name, self.ckpt_root / LATEST)
            self._prune_checkpoints(keep=final)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self, keep: Path) -> None:
        if self.cfg.keep_checkpoints == 0:
            return
        steps = sorted(p for p in self.ckpt_root.glob("step-*") if p.is_dir())
        for old in [p for p in steps if p != keep][: max(0, len(steps) - self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_training_state(self, resume: Path) -> None:
        acc, cfg = self.accelerator, self.cfg
        state = json.loads((resume / STATE_NAME).read_text())
        if state["mode"] != cfg.mode:
            raise ConfigError(f"{resume} is a {state['mode']} checkpoint; this run is in {cfg.mode} mode")
        if state["global_batch"] != cfg.batch_size * acc.num_processes:
            logger.warning("resuming with global batch %d instead of %d: training continues, but not exactly as "
                           "an uninterrupted run would", cfg.batch_size * acc.num_processes, state["global_batch"])
        self.step, self.samples_consumed = int(state["step"]), int(state["samples_consumed"])
        _load_optimizer(self.optimizer.optimizer, resume, "optimizer")
        self.scheduler.load_state_dict(state["scheduler"])
        if self.adversarial:
            _load_optimizer(self.disc_optimizer.optimizer, resume, "disc_optimizer")
            self.disc_scheduler.load_state_dict(state["disc_scheduler"])
        if self.ema is not None:
            if not (resume / "ema").is_dir():
                raise CheckpointError(f"{resume} has no EMA weights but this run keeps an EMA (pass --ema false)")
            self.ema.load(read_state_dict(resume / "ema" / "model.safetensors"))
        rng = resume / f"rng-{acc.process_index}.safetensors"
        if rng.is_file():
            _set_rng_state(read_state_dict(rng))
        if acc.is_main_process:
            logger.info("resumed from %s at step %d", resume, self.step)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nitro-ar train CONFIG.yaml|--args``; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv)
        Trainer(cfg).train()
    except (ConfigError, DatasetError, CheckpointError) as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
