"""Training on Hugging Face Accelerate for both model families (``model: nitro_ar | nitro_e``).

Nitro-AR: masked AR pre-training and adversarial head fine-tuning (:mod:`nitro_ar.objectives`).
Nitro-E: the official rectified-flow pre-training with REPA and few-step adversarial
distillation (:mod:`nitro_ar.objectives_nitro_e`). What differs between the families lives in
one :class:`ModelFamily` subclass each; the loop, optimizers, EMA, checkpoints and resume are
shared. Data: :mod:`nitro_ar.data`.

Usage::

    nitro-ar train CONFIG.yaml [--key value ...]          # or: python -m nitro_ar.train ...
    accelerate launch --multi_gpu --num_processes 8 -m nitro_ar.train CONFIG.yaml

Every :class:`TrainConfig` field is a YAML key and a ``--flag`` (underscores become dashes);
flags override the file. Data parallelism (DDP) is Accelerate's: each process reads its slice
of every global batch. Checkpoints (``OUTPUT_DIR/checkpoints/step-XXXXXXXX``) hold the model in
the project's layout (``model/``: ``NitroAR`` / ``NitroE.from_pretrained`` loads it), the EMA weights
(``ema/``) when on, the optimizer(s), learning-rate schedule(s), per-process RNG states and
the data position; ``checkpoints/latest`` names the newest. A run resumes from it by default
and continues exactly as if it had not stopped.

Crash safety: a checkpoint is built in a hidden folder (every file atomic and fsync-ed,
``state.json``, the completeness marker, last), swapped in whole (a re-saved step is exchanged
atomically with the old copy), and only then named by ``latest``. When ``latest`` is missing or
names no complete checkpoint, resuming falls back to the newest complete one with a warning.
``train_log.jsonl`` is cut back to the resumed step. A step whose loss is not finite is skipped
(no update); ``max_nonfinite_steps`` such steps in a row stop the run with a TrainingError.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, check_state_dict, infer_config, read_state_dict, resolve_checkpoint
from .config import NitroARConfig, NitroEConfig
from .data import DatasetError, NitroStreamingDataset, make_streams
from .errors import ConfigError, NitroARError, TrainingError
from .io import commit_dir, sweep_stale, write_json_atomic, write_safetensors_atomic, write_text_atomic
from .kernels import atomic_files
from .nitro_ar_model import NitroAR
from .nitro_e_model import NitroE
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
from .shortcut import ShortcutObjective, ShortcutSettings, draw_shortcut_step, enable_shortcut, match_config
from .tensorar import AGE_NOISE, RefineObjective, draw_refine_step, with_refine_window

logger = logging.getLogger("nitro_ar.train")

__all__ = ["TrainConfig", "ConfigError", "TrainingError", "Trainer", "parse_config", "main"]

MODELS = ("nitro_ar", "nitro_e")
ADVERSARIAL_MODES = ("adversarial", "distill")
PRECISIONS = ("auto", "no", "bf16")
LATEST = "latest"
STATE_NAME = "state.json"
LOG_NAME = "train_log.jsonl"
# Checkpoint folders are `step-XXXXXXXX`; one is built as `.step-XXXXXXXX.partial` first.
STEP_RE = re.compile(r"step-(\d+)")
PARTIAL_SUFFIX = ".partial"


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


def _parse_json_list(text) -> list:
    value = json.loads(text) if isinstance(text, str) else text
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON list, got {text!r}")
    return value


def _parse_json_dict(text) -> dict:
    value = json.loads(text) if isinstance(text, str) else text
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


@dataclass
class TrainConfig:
    """Settings of a training run (defaults: the released Nitro-AR ``gan`` config; the Nitro-E
    keys default to the official ``configs/default_config.yaml``)."""

    data_dir: str = _opt("", "MDS dataset: a folder (written by `nitro-ar precompute` or the official precompute) or a URL", str)
    data_streams: List = _opt_factory(list, "instead of data_dir, several MDS streams mixed: JSON list of folders/URLs or "
                                      "{remote, local, split, proportion|repeat|choose}", _parse_json_list)
    data_cache_dir: str = _opt("", "local cache folder of remote streams (default: streaming's temporary folder)", str)
    empty_text: str = _opt("", "empty-prompt embedding file (default: empty_text.safetensors in a local stream folder)", str)
    text_length: int = _opt(128, "tokens per stored text embedding (text_feat is text_length x caption_channels)", int)
    shuffle_algo: str = _opt("py1e", "streaming shuffle algorithm (py1e, py1br, py1b, py1s, py2s, naive)", str)
    num_canonical_nodes: Optional[int] = _opt(None, "streaming canonical nodes: fixes the sample order across node counts "
                                              "(default: 64, or 1 for datasets under 4096 samples)", int)
    verify_shards: bool = _opt(True, "check each shard's checksum (or size) when a process first reads it", _parse_bool)
    output_dir: str = _opt("", "where checkpoints and the log go", str)
    model: str = _opt("nitro_ar", "model family: nitro_ar or nitro_e", str)
    mode: str = _opt("pretrain", "pretrain; adversarial (nitro_ar head fine-tuning); shortcut (nitro_ar FAR shortcut heads: "
                     "from scratch, or from a flow-matching model with init_from); refine (nitro_ar TensorAR-style "
                     "refinement window); distill (nitro_e few-step)", str)
    variant: Optional[str] = _opt(None, "gan or joint_gan for a new model (default gan; init_from fixes it otherwise)", str)
    model_config: Dict = _opt_factory(dict, "JSON object of NitroARConfig / NitroEConfig overrides for a new model", _parse_json_dict)
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
    shortcut: Dict = _opt_factory(dict, "shortcut mode: JSON object of nitro_ar.shortcut.ShortcutSettings "
                                  "(fraction, step_sizes, levels, clip)", _parse_json_dict)
    adv_head_steps: Optional[int] = _opt(None, "adversarial: head Euler steps (default: the model's, 3 gan / 6 joint_gan)", int)
    disc_learning_rate: Optional[float] = _opt(None, "adversarial: discriminator learning rate (default: learning_rate)", float)
    disc_hidden: int = _opt(256, "adversarial: width of the discriminator MLP", int)
    repa_depth: int = _opt(-1, "nitro_e: REPA on when >= 0 (official stage 1: 8; aligned after block group 0, as officially)", int)
    projector_dim: int = _opt(2048, "nitro_e: REPA projector width", int)
    z_dims: List = _opt_factory(lambda: [768], "nitro_e: JSON list of REPA target widths (DINOv2 ViT-B/14: [768])", _parse_json_list)
    proj_coeff: float = _opt(0.5, "nitro_e: weight of the REPA loss", float)
    weighting_scheme: str = _opt("logit_normal", "nitro_e: timestep density / loss weighting (logit_normal, mode, uniform, ...)", str)
    mode_scale: float = _opt(1.29, "nitro_e: mode_scale of the 'mode' timestep density", float)
    student_steps: int = _opt(4, "nitro_e distill: sampler steps of the student", int)
    adv_weight: float = _opt(1.0, "nitro_e distill: weight of the adversarial generator loss", float)
    diffusion_weight: float = _opt(1.0, "nitro_e distill: weight of the rectified-flow loss", float)
    refine_window: int = _opt(4, "refine: window k (tokens of the last k - 1 AR steps are re-predicted)", int)
    refine_noise: str = _opt("sine", "refine: input noise over age: linear, sine, sqrt or exponential", str)
    refine_ar_steps: Optional[int] = _opt(None, "refine: AR steps K of the band schedule (default: the model's)", int)
    num_workers: int = _opt(2, "DataLoader worker processes per training process", int)
    save_every: int = _opt(1000, "checkpoint every N optimizer steps (a final one is always written)", int)
    keep_checkpoints: int = _opt(3, "how many step checkpoints to keep (0: all)", int)
    log_every: int = _opt(10, "tracker / console logging period in steps (the JSONL log has every step)", int)
    resume_from: str = _opt("auto", "auto (latest checkpoint in output_dir, if any), none, or a checkpoint folder", str)
    report_to: str = _opt("none", "Accelerate tracker: none, tensorboard, wandb, ...", str)
    progress: bool = _opt(True, "show a progress bar", _parse_bool)
    max_nonfinite_steps: int = _opt(10, "steps in a row with a non-finite loss (each skipped) before training stops", int)

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        need(bool(self.data_dir) != bool(self.data_streams), "give data_dir or data_streams (one of them)")
        need(bool(self.output_dir), "output_dir is required")
        need(self.model in MODELS, f"model must be one of {MODELS}, got {self.model!r}")
        need(self.mode in FAMILIES[self.model].modes,
             f"mode must be one of {FAMILIES[self.model].modes} for {self.model}, got {self.mode!r}")
        need(self.variant in (None, "gan", "joint_gan"), f"variant must be gan or joint_gan, got {self.variant!r}")
        need(self.model == "nitro_ar" or self.variant is None, "variant applies to nitro_ar models only")
        need(self.mixed_precision in PRECISIONS, f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "save_every", "log_every", "disc_hidden",
                     "text_length", "projector_dim", "student_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep_checkpoints", "num_workers", "weight_decay", "grad_clip"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(0.0 <= self.ema_rate < 1.0, f"ema_rate must be in [0, 1), got {self.ema_rate}")
        need(self.mode != "refine" or self.refine_window >= 2, f"refine_window must be >= 2, got {self.refine_window}")
        need(self.refine_noise in AGE_NOISE, f"refine_noise must be one of {AGE_NOISE}, got {self.refine_noise!r}")
        need(not (self.init_from and self.model_config), "model_config applies to a new model; init_from fixes the architecture")
        need(self.max_nonfinite_steps >= 0, f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            need(not (isinstance(value, float) and not math.isfinite(value)), f"{f.name} must be a finite number, got {value}")
        ShortcutSettings.from_dict(self.shortcut)  # ConfigError naming a bad shortcut setting
        need(self.num_canonical_nodes is None or self.num_canonical_nodes >= 1,
             f"num_canonical_nodes must be >= 1, got {self.num_canonical_nodes}")

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
    parser = argparse.ArgumentParser(prog="nitro-ar train", description="Train Nitro-AR or Nitro-E (see the modes).")
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
    write_json_atomic({"param_groups": state["param_groups"], "scalars": scalars}, directory / f"{name}.json", indent=None)


def _read_json(file: Path) -> dict:
    """A JSON object of a checkpoint; CheckpointError naming the file when missing or unreadable."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file} is missing or unreadable ({err})") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return value


def _checkpoint_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete training checkpoint, or None. Complete: ``state.json`` (the
    last file written) is present, readable, and records the step."""
    if not path.is_dir():
        return "no such folder"
    try:
        state = _read_json(path / STATE_NAME)
    except CheckpointError as err:
        return str(err)
    if not isinstance(state.get("step"), int):
        return f"{path / STATE_NAME} records no step"
    return None


def _load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, name: str) -> None:
    meta = _read_json(directory / f"{name}.json")
    if not isinstance(meta.get("scalars"), dict) or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError(f"{directory / f'{name}.json'} lacks 'scalars' / 'param_groups': not an optimizer state")
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


def _apply_fast(model: nn.Module, enabled: bool) -> Tuple[nn.Module, bool]:
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
# model families: what differs between Nitro-AR and Nitro-E training
# --------------------------------------------------------------------------------------------
class ModelFamily:
    """One model family's side of training; the :class:`Trainer` holds one instance.

    The Trainer calls, in order: :meth:`build_model`, :meth:`data_fields`, (device, fast path),
    :meth:`trainable`, then :meth:`objective` (pre-training) or :meth:`adversarial_units`
    (adversarial modes); per micro-batch :meth:`draws` and :meth:`losses` or
    :meth:`generate` / :meth:`score` / :meth:`score_pair`. :meth:`extra_modules` are saved in
    each checkpoint as ``{name}.safetensors`` and loaded on resume.
    """

    name = ""
    model_class: type = nn.Module
    modes: Tuple[str, ...] = ("pretrain",)
    adv_weight = 1.0

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # construction
    def new_model(self) -> nn.Module:
        raise NotImplementedError

    def check_model(self, model: nn.Module, source: Path) -> None:
        """Raise ConfigError when a loaded model contradicts the run's settings."""

    def load_state(self, source: Path) -> nn.Module:
        return self.model_class.from_pretrained(source, dtype=torch.float32)

    def build_model(self, resume: Optional[Path]) -> nn.Module:
        cfg = self.cfg
        if cfg.mode in ADVERSARIAL_MODES and not cfg.init_from and resume is None:
            raise ConfigError(f"{cfg.mode} mode fine-tunes a trained model: pass init_from")
        if resume is not None or cfg.init_from:
            source = resume / "model" if resume is not None else Path(cfg.init_from)
            model = self.load_state(source)
            self.check_model(model, source)
            return model
        return self.new_model()

    def data_fields(self, model: nn.Module) -> Tuple[str, ...]:
        """The dataset fields a batch needs (:data:`nitro_ar.data.FIELDS`); the dataset checks
        that its columns hold them."""
        return ("latents", "text")

    def default_ema(self, model: nn.Module) -> bool:
        return False

    def trainable(self, model: nn.Module) -> List[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def objective(self, model: nn.Module, empty: torch.Tensor, resume: Optional[Path]) -> nn.Module:
        raise NotImplementedError

    def objective_params(self) -> List[nn.Parameter]:
        """Trainable parameters of the objective besides the model's (REPA projectors)."""
        return []

    def adversarial_units(self, model: nn.Module, empty: torch.Tensor, resume: Optional[Path]) -> Tuple[nn.Module, nn.Module]:
        """(generator, discriminator) of an adversarial mode; the discriminator is restored by
        the Trainer on resume."""
        raise NotImplementedError

    def extra_modules(self) -> Dict[str, nn.Module]:
        return {}

    # steps
    def draws(self, model: nn.Module, step: int, positions: Sequence[int]):
        raise NotImplementedError

    def losses(self, objective: nn.Module, batch: Dict[str, torch.Tensor], draws) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def generate(self, generator: nn.Module, batch: Dict[str, torch.Tensor], draws):
        """(fake, real, condition, extra generator losses {name: weighted loss})."""
        raise NotImplementedError

    def score(self, disc: nn.Module, fake: torch.Tensor, cond, draws) -> torch.Tensor:
        raise NotImplementedError

    def score_pair(self, disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, cond, draws):
        """(real logits, fake logits) from one discriminator forward."""
        raise NotImplementedError

    def describe(self, model: nn.Module) -> str:
        return self.name


class NitroARFamily(ModelFamily):
    """Nitro-AR: masked AR pre-training, adversarial head fine-tuning and FAR shortcut heads."""

    name = "nitro_ar"
    model_class = NitroAR
    modes = ("pretrain", "adversarial", "shortcut", "refine")

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.settings: Optional[ObjectiveSettings] = None

    def _config(self) -> NitroARConfig:
        try:
            return NitroARConfig.for_variant(self.cfg.variant or "gan", **self.cfg.model_config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad model_config {self.cfg.model_config}: {err}") from err

    def new_model(self) -> NitroAR:
        config = self._config()
        torch.manual_seed(self.cfg.seed)
        model = NitroAR(config)
        official_head_init(model)
        return model

    def build_model(self, resume: Optional[Path]) -> NitroAR:
        model = super().build_model(resume)
        if self.cfg.mode == "shortcut":  # zero step embeddings (FMSC when init_from is a flow-matching model)
            return enable_shortcut(model)
        if self.cfg.mode == "refine":  # released or pre-trained weights + a zero age embedding
            return with_refine_window(model, self.cfg.refine_window)
        return model

    def check_model(self, model: NitroAR, source: Path) -> None:
        cfg = self.cfg
        if cfg.variant is not None and model.config.variant != cfg.variant:
            raise ConfigError(f"variant {cfg.variant!r} asked for, but {source} holds a {model.config.variant!r} model")
        if not cfg.init_from and cfg.mode == "pretrain" and model.config != self._config():
            raise ConfigError(f"{source} holds a model of another configuration than variant/model_config ask for")

    def data_fields(self, model: NitroAR) -> Tuple[str, ...]:
        return ("latents", "text", "thumbnail") if model.is_joint else ("latents", "text")

    def default_ema(self, model: NitroAR) -> bool:
        # Shortcut mode: the EMA is the self-consistency teacher.
        return self.cfg.mode == "shortcut" or (self.cfg.mode == "pretrain" and not model.is_joint)

    def trainable(self, model: NitroAR) -> List[nn.Parameter]:
        self.settings = self.cfg.objective_settings(model.is_joint)
        return freeze_all_but_head(model) if self.cfg.mode == "adversarial" else super().trainable(model)

    def objective(self, model: NitroAR, empty: torch.Tensor, resume: Optional[Path]) -> nn.Module:
        cfg = self.cfg
        if cfg.mode == "shortcut":
            return ShortcutObjective(model, empty, self.settings, ShortcutSettings.from_dict(cfg.shortcut))
        if cfg.mode == "refine":
            return RefineObjective(model, empty, self.settings, noise=cfg.refine_noise, ar_steps=cfg.refine_ar_steps)
        return MaskedARObjective(model, empty, self.settings)

    def adversarial_units(self, model: NitroAR, empty: torch.Tensor, resume: Optional[Path]):
        head_steps = self.cfg.adv_head_steps or model.config.head_steps
        torch.manual_seed(mix_seed(self.cfg.seed, 1))
        discriminator = TokenDiscriminator(model, self.cfg.disc_hidden)
        return HeadGenerator(model, empty, self.settings, head_steps), discriminator

    def draws(self, model: NitroAR, step: int, positions: Sequence[int]):
        draw = {"shortcut": draw_shortcut_step, "refine": draw_refine_step}.get(self.cfg.mode, draw_step)
        return draw(model, self.settings, seed=self.cfg.seed, step=step, positions=positions)

    def losses(self, objective, batch, draws):
        return objective(batch["latents"], batch["text"], draws, batch.get("thumbnail"))

    def generate(self, generator, batch, draws):
        fake, real, text, mask = generator(batch["latents"], batch["text"], draws, batch.get("thumbnail"))
        return fake, real, (text, mask), {}

    def score(self, disc, fake, cond, draws):
        return disc(fake, *cond)

    def score_pair(self, disc, real, fake, cond, draws):
        text, mask = cond
        return disc(torch.cat([real, fake]), torch.cat([text, text]), torch.cat([mask, mask])).chunk(2)

    def describe(self, model: NitroAR) -> str:
        return model.config.variant


class NitroEFamily(ModelFamily):
    """Nitro-E: the official rectified-flow pre-training with REPA, and few-step distillation
    (see :mod:`nitro_ar.objectives_nitro_e`)."""

    name = "nitro_e"
    model_class = NitroE
    modes = ("pretrain", "distill")

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        from .objectives_nitro_e import NitroESettings

        try:
            self.settings = NitroESettings(
                text_dropout=cfg.text_dropout, weighting_scheme=cfg.weighting_scheme, logit_mean=cfg.logit_mean,
                logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, proj_coeff=cfg.proj_coeff,
                student_steps=cfg.student_steps, adv_weight=cfg.adv_weight, diffusion_weight=cfg.diffusion_weight,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.adv_weight = cfg.adv_weight
        self.repa = cfg.repa_depth >= 0 and cfg.mode == "pretrain"
        self.projectors: Optional[nn.ModuleList] = None
        self._loaded_projectors: Dict[str, torch.Tensor] = {}
        self.generator = None

    def _config(self) -> NitroEConfig:
        try:
            return NitroEConfig(**self.cfg.model_config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad model_config {self.cfg.model_config}: {err}") from err

    def new_model(self) -> NitroE:
        config = self._config()
        torch.manual_seed(self.cfg.seed)
        return NitroE(config)  # PyTorch's default initialisation, as the official model

    def load_state(self, source: Path) -> NitroE:
        """A saved model, or an official file; an official stage-1 file's ``projectors.*``
        are kept for REPA (and dropped without it, as the official stage 2 does)."""
        from .objectives_nitro_e import split_projector_state

        file, saved = resolve_checkpoint(source, "nitro_e")
        state, self._loaded_projectors = split_projector_state(read_state_dict(file))
        config = NitroEConfig.from_dict(saved) if saved is not None else infer_config(state)
        with torch.device("meta"):
            model = NitroE(config)
        check_state_dict(model, state, source=str(file))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        model.build_buffers(torch.device("cpu"), torch.float32)
        return model

    def check_model(self, model: NitroE, source: Path) -> None:
        if self.cfg.model_config and not self.cfg.init_from and model.config != self._config():
            raise ConfigError(f"{source} holds a model of another configuration than model_config asks for")

    def data_fields(self, model: NitroE) -> Tuple[str, ...]:
        # REPA reads the precomputed DINOv2 features (the dino_feat column, see nitro_ar.dino)
        return ("latents", "text", "dino") if self.repa else ("latents", "text")

    def default_ema(self, model: NitroE) -> bool:
        return False  # official default (stage 2 turns it on)

    def objective(self, model: NitroE, empty: torch.Tensor, resume: Optional[Path]) -> nn.Module:
        from .objectives_nitro_e import NitroEObjective, build_projectors

        if self.repa:
            torch.manual_seed(mix_seed(self.cfg.seed, 2))
            self.projectors = build_projectors(model.config.inner_dim, self.cfg.projector_dim, self.cfg.z_dims)
            if self._loaded_projectors and resume is None:
                self.projectors.load_state_dict(self._loaded_projectors)
            self.projectors.to(model.device)
        return NitroEObjective(model, empty, self.settings, self.projectors)

    def objective_params(self) -> List[nn.Parameter]:
        return list(self.projectors.parameters()) if self.projectors is not None else []

    def adversarial_units(self, model: NitroE, empty: torch.Tensor, resume: Optional[Path]):
        from .objectives_nitro_e import FeatureDiscriminator, StudentGenerator

        if not self.cfg.init_from:
            raise ConfigError("distill mode needs init_from (the teacher), also when resuming")
        teacher = self.load_state(Path(self.cfg.init_from)).to(model.device)
        teacher, _ = _apply_fast(teacher, self.cfg.fast if self.cfg.fast is not None else torch.cuda.is_available())
        torch.manual_seed(mix_seed(self.cfg.seed, 1))
        discriminator = FeatureDiscriminator(teacher, self.cfg.disc_hidden).to(model.device)
        self.generator = StudentGenerator(model, empty, self.settings).to(model.device)
        return self.generator, discriminator

    def extra_modules(self) -> Dict[str, nn.Module]:
        return {"projectors": self.projectors} if self.projectors is not None else {}

    def draws(self, model: NitroE, step: int, positions: Sequence[int]):
        from .objectives_nitro_e import draw_flow_step

        return draw_flow_step(model, self.settings, seed=self.cfg.seed, step=step, positions=positions,
                              distill=self.cfg.mode == "distill")

    def losses(self, objective, batch, draws):
        return objective(batch["latents"], batch["text"], draws, batch.get("dino"))

    def generate(self, generator, batch, draws):
        fake, diff, text = generator(batch["latents"], batch["text"], draws)
        return fake, batch["latents"], text, {"diff_loss": (self.cfg.diffusion_weight, diff)}

    def _disc_input(self, x, draws):
        return self.generator.renoise(x, draws)

    def score(self, disc, fake, cond, draws):
        noisy, timestep = self._disc_input(fake, draws)
        return disc(noisy, cond, timestep)

    def score_pair(self, disc, real, fake, cond, draws):
        noisy, timestep = self._disc_input(torch.cat([real, fake]), _repeat_draws(draws))
        return disc(noisy, torch.cat([cond, cond]), timestep).chunk(2)


def _repeat_draws(draws):
    """Nitro-E draws for a batch of [real, fake]: the same discriminator noise for both halves."""
    from .objectives_nitro_e import FlowDraws

    return FlowDraws(draws.noise, draws.t_index, draws.text_drop, torch.cat([draws.disc_noise] * 2),
                     torch.cat([draws.disc_t_index] * 2))


FAMILIES = {"nitro_ar": NitroARFamily, "nitro_e": NitroEFamily}


def _strip_prefix(state: Dict[str, torch.Tensor], name: str) -> Dict[str, torch.Tensor]:
    """``{name}.key`` -> ``key`` (extra modules are saved under their official prefix)."""
    prefix = name + "."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


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

        self.family = family = FAMILIES[cfg.model](cfg)
        resume = self._find_resume()
        self.model = family.build_model(resume)
        self.shortcut = cfg.mode == "shortcut"
        self._build_data()
        self.adversarial = cfg.mode in ADVERSARIAL_MODES

        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        # On the training device first: the fast path picks its backend from the weights' device.
        self.model.to(acc.device)
        fast = cfg.fast if cfg.fast is not None else torch.cuda.is_available()
        self.model, self.fast_active = _apply_fast(self.model, fast)
        trainable = family.trainable(self.model)
        ids = {id(p) for p in trainable}
        self.model.train()

        empty = self.dataset.empty_text(cfg.empty_text or None)["text"]
        if self.adversarial:
            generator, self.discriminator = family.adversarial_units(self.model, empty, resume)
            if resume is not None:
                self.discriminator.load_state_dict(read_state_dict(resume / "discriminator.safetensors"))
            self.optimizer = self._adamw(trainable, cfg.learning_rate)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupConstant(cfg.warmup_steps))
            self.disc_optimizer = self._adamw(list(self.discriminator.parameters()), cfg.disc_learning_rate or cfg.learning_rate)
            self.disc_scheduler = torch.optim.lr_scheduler.LambdaLR(self.disc_optimizer, WarmupConstant(cfg.warmup_steps))
            self.train_module, self.optimizer, self.discriminator_ddp, self.disc_optimizer = acc.prepare(
                generator, self.optimizer, self.discriminator, self.disc_optimizer
            )
        else:
            objective = family.objective(self.model, empty, resume)
            trainable = trainable + family.objective_params()
            self.optimizer = self._adamw(trainable, cfg.learning_rate)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupConstant(cfg.warmup_steps))
            self.train_module, self.optimizer = acc.prepare(objective, self.optimizer)
        for name, module in family.extra_modules().items():
            if resume is not None:
                module.load_state_dict(_strip_prefix(read_state_dict(resume / f"{name}.safetensors"), name))
        self.trainable = trainable
        # After prepare: the shadow lives on the training device.
        use_ema = cfg.ema if cfg.ema is not None else family.default_ema(self.model)
        self.ema = EMA([(n, p) for n, p in self.model.named_parameters() if id(p) in ids], cfg.ema_rate) if use_ema else None
        if self.shortcut:
            objective.set_teacher(self.ema)  # self-consistency targets from the EMA head

        self.step = 0
        self.samples_consumed = 0
        self.nonfinite_in_a_row = 0
        self.global_batch = cfg.batch_size * acc.num_processes
        if resume is not None:
            self._load_training_state(resume)
        if acc.is_main_process:
            logger.info("training %s %s (%s, %.1fM trainable parameters) on %d process(es), global batch %d x %d "
                        "accumulation, precision %s, %s path; %d samples in %s",
                        cfg.model, family.describe(self.model), cfg.mode, sum(p.numel() for p in trainable) / 1e6,
                        acc.num_processes, self.global_batch, cfg.gradient_accumulation_steps, precision,
                        "fast" if self.fast_active else "eager", self.dataset.epoch_size,
                        cfg.data_dir or f"{len(cfg.data_streams)} streams")
        if resume is not None:
            # Last: restoring the RNG after everything that may draw from it while being built.
            self._restore_rng(resume)

    # ------------------------------------------------------------------ construction
    def _adamw(self, params: List[nn.Parameter], lr: float) -> torch.optim.AdamW:
        cfg = self.cfg
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay)

    def _find_resume(self) -> Optional[Path]:
        """The checkpoint to resume from: ``resume_from`` when it is a folder; for ``auto`` the
        one ``latest`` names, else (with a warning) the newest complete one."""
        choice = self.cfg.resume_from
        if choice == "none":
            return None
        if choice != "auto":
            path = Path(choice)
            problem = _checkpoint_problem(path)
            if problem is not None:
                raise CheckpointError(f"cannot resume from {path}: not a complete training checkpoint ({problem})")
            return path
        if self.accelerator.is_main_process:
            self._sweep_partial_checkpoints()
        latest = self.ckpt_root / LATEST
        if not latest.exists():
            reason = f"{latest} is missing"
        else:
            try:
                name = latest.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                name, reason = "", f"{latest} is unreadable ({err})"
            else:
                reason = f"{latest} is empty"
            if STEP_RE.fullmatch(name):
                reason = _checkpoint_problem(self.ckpt_root / name)
                if reason is None:
                    return self.ckpt_root / name
                reason = f"{latest} names {name}, which is not complete ({reason})"
            elif name:
                reason = f"{latest} holds {name[:64]!r}, not a checkpoint name"
        complete = self._complete_checkpoints()
        if not complete:
            if latest.exists():
                raise CheckpointError(f"cannot resume: {reason} and {self.ckpt_root} holds no complete checkpoint; "
                                      "pass --resume-from none to start afresh")
            return None
        logger.warning("%s; resuming from the newest complete checkpoint, %s", reason, complete[-1])
        return complete[-1]

    def _step_folders(self) -> List[Path]:
        """Every ``step-XXXXXXXX`` folder, by step."""
        if not self.ckpt_root.is_dir():
            return []
        folders = [p for p in self.ckpt_root.iterdir() if STEP_RE.fullmatch(p.name) and p.is_dir()]
        return sorted(folders, key=lambda p: int(p.name[len("step-"):]))

    def _complete_checkpoints(self) -> List[Path]:
        """The complete checkpoints, by step."""
        return [p for p in self._step_folders() if _checkpoint_problem(p) is None]

    def _sweep_partial_checkpoints(self) -> None:
        """Clear what a killed save left: a complete partial folder whose step folder is gone
        (killed between the two renames of the portable swap) is put in place; other partial
        folders and temporary files are removed."""
        for path in self.ckpt_root.glob(".step-*" + PARTIAL_SUFFIX):
            final = self.ckpt_root / path.name[1 : -len(PARTIAL_SUFFIX)]
            if not final.exists() and STEP_RE.fullmatch(final.name) and _checkpoint_problem(path) is None:
                logger.warning("completing the interrupted save of %s", final)
                commit_dir(path, final)
            else:
                logger.warning("removing %s, left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)
        sweep_stale(self.ckpt_root)

    # ------------------------------------------------------------------ data
    def _build_data(self) -> None:
        """The MDS dataset (fields and layout from the model) and this process's loader.

        Streaming orders each epoch's samples as one global sequence (from the shuffle seed,
        the canonical nodes and the epoch only) and deals it out: sample j of the sequence goes
        to node j % N, and within a node to rank (j // N) % R; each rank batches its share in
        order. So global batch k is sequence positions [k G, (k + 1) G) whatever the number of
        processes, and a local sample's position (used to seed its random draws) follows from
        its rank (see ``_draws``). An epoch ends with the last full batch of every rank.
        """
        from streaming.base.world import World

        cfg, acc, mcfg = self.cfg, self.accelerator, self.model.config
        streams = make_streams(cfg.data_streams or cfg.data_dir, cache_dir=cfg.data_cache_dir or None)
        fields = self.family.data_fields(self.model)
        self.dataset = NitroStreamingDataset(
            streams, batch_size=cfg.batch_size, resolution=32 * mcfg.sample_size, fields=fields,
            text_length=cfg.text_length, text_channels=mcfg.caption_channels, latent_channels=mcfg.in_channels,
            shuffle=True, shuffle_seed=mix_seed(cfg.seed, -2) & 0x7FFFFFFF, shuffle_algo=cfg.shuffle_algo,
            num_canonical_nodes=cfg.num_canonical_nodes, verify=cfg.verify_shards,
        )
        if self.dataset.num_canonical_nodes is None:
            self.dataset.num_canonical_nodes = 64 if self.dataset.epoch_size >= 4096 else 1
        world = World.detect()
        self._ranks_per_node, self._num_nodes = world.ranks_per_node, world.num_nodes
        # A generator of its own: each new epoch's iterator draws a worker base seed, which must
        # not come from the global RNG (a resumed run would then draw it at another point).
        loader_rng = torch.Generator().manual_seed(mix_seed(cfg.seed, -3) & 0x7FFFFFFF)
        self.loader = DataLoader(self.dataset, batch_size=cfg.batch_size, drop_last=True, num_workers=cfg.num_workers,
                                 generator=loader_rng,
                                 pin_memory=acc.device.type == "cuda", persistent_workers=cfg.num_workers > 0)
        self._batches: Optional[Iterator] = None
        self.data_epoch, self.data_batches_in_epoch, self._epoch_start = 0, 0, 0

    def _data_state(self) -> dict:
        """The data position for a checkpoint: streaming's resumption state (epoch and global
        samples consumed in it) and what the sample order depends on."""
        state = self.dataset.state_dict(self._epoch_start + self.data_batches_in_epoch * self.global_batch,
                                        from_beginning=True)
        state["epoch"] = self.data_epoch
        return {"streaming": state, "batch_size": self.cfg.batch_size}

    def _restore_data_state(self, state: Optional[dict]) -> None:
        """Continue from a checkpoint's data position (before the first batch is drawn)."""
        if not state:
            raise CheckpointError("the checkpoint has no data position (written by an older nitro-ar?)")
        if state["batch_size"] != self.cfg.batch_size:
            logger.warning("resuming with batch %d per process instead of %d: streaming deals samples out by it, so "
                           "the sample order differs from the uninterrupted run's", self.cfg.batch_size, state["batch_size"])
        streaming = state["streaming"]
        self.dataset.load_state_dict(streaming)
        self.data_epoch, self._epoch_start, self.data_batches_in_epoch = int(streaming["epoch"]), int(streaming["sample_in_epoch"]), 0

    def _next_batch(self) -> Dict[str, torch.Tensor]:
        started_empty = False
        while True:
            if self._batches is None:
                self._batches = iter(self.loader)
                started_empty = self._epoch_start == 0
            try:
                batch = next(self._batches)
                break
            except StopIteration:
                if started_empty and self.data_batches_in_epoch == 0:
                    raise DatasetError(f"an epoch of {self.dataset.epoch_size} samples holds no full batch of "
                                       f"{self.cfg.batch_size} per process") from None
                self._batches = None
                self.data_epoch, self.data_batches_in_epoch, self._epoch_start = self.data_epoch + 1, 0, 0
        self.data_batches_in_epoch += 1
        return {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}

    # ------------------------------------------------------------------ steps
    def _draws(self, micro: int):
        acc, cfg = self.accelerator, self.cfg
        # Global sequence position of local sample i (see _build_data): (i R + r) N + n.
        node, rank = divmod(acc.process_index, self._ranks_per_node)
        positions = [micro * self.global_batch + (i * self._ranks_per_node + rank) * self._num_nodes + node
                     for i in range(cfg.batch_size)]
        return self.family.draws(self.model, self.step, positions).to(acc.device)

    def _micro_batches(self, module: nn.Module) -> Iterator[Tuple[Dict[str, torch.Tensor], object, contextlib.AbstractContextManager]]:
        """(batch, draws, gradient-sync context) for each micro-batch of this step; gradients
        are only all-reduced on the last one."""
        accum = self.cfg.gradient_accumulation_steps
        for micro in range(accum):
            batch, draws = self._next_batch(), self._draws(micro)
            self.samples_consumed += self.global_batch
            sync = self.accelerator.no_sync(module) if micro < accum - 1 else contextlib.nullcontext()
            yield batch, draws, sync

    def _clip_and_step(self, params, optimizer, scheduler, loss: float) -> Tuple[float, bool]:
        """Clip, step, zero; returns (gradient norm, whether the weights were updated). The update
        is skipped, with a warning, when the (process-averaged) loss or the gradient norm is not
        finite; the schedule advances either way."""
        acc = self.accelerator
        if self.cfg.grad_clip > 0:
            norm = acc.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norm = float(norm)
        update = math.isfinite(loss) and math.isfinite(norm)
        if update:
            optimizer.step()
        else:
            logger.warning("step %d: non-finite %s (loss %s, gradient norm %s); update skipped", self.step + 1,
                           "loss" if not math.isfinite(loss) else "gradient norm", loss, norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, update

    def _pretrain_step(self) -> Dict[str, float]:
        acc, accum = self.accelerator, self.cfg.gradient_accumulation_steps
        totals: Dict[str, torch.Tensor] = {}
        for batch, draws, sync in self._micro_batches(self.train_module):
            with sync, acc.autocast():
                losses = self.family.losses(self.train_module, batch, draws)
                acc.backward(losses["loss"] / accum)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / accum
        metrics = {k: float(acc.reduce(v, "mean")) for k, v in totals.items()}
        metrics["grad_norm"], updated = self._clip_and_step(self.trainable, self.optimizer, self.scheduler, metrics["loss"])
        if self.ema is not None and updated:
            self.ema.update()
        return metrics

    def _adversarial_step(self) -> Dict[str, float]:
        acc, accum, family = self.accelerator, self.cfg.gradient_accumulation_steps, self.family
        disc = self.discriminator
        disc_params = list(disc.parameters())
        totals: Dict[str, torch.Tensor] = {}

        def add(key: str, value: torch.Tensor) -> None:
            totals[key] = totals.get(key, 0.0) + value.detach().float() / accum

        generated = []
        # Generator update: the discriminator scores the generated samples, its weights held.
        for param in disc_params:
            param.requires_grad_(False)
        for batch, draws, sync in self._micro_batches(self.train_module):
            with sync, acc.autocast():
                fake, real, cond, extra = family.generate(self.train_module, batch, draws)
                g_loss = generator_loss(family.score(disc, fake, cond, draws))
                loss = family.adv_weight * g_loss + sum(weight * value for weight, value in extra.values())
                acc.backward(loss / accum)
            add("g_loss", g_loss)
            add("loss", loss)
            for key, (_, value) in extra.items():
                add(key, value)
            generated.append((fake.detach(), real, cond, draws))
        for param in disc_params:
            param.requires_grad_(True)
        g_mean = float(acc.reduce(totals["loss"], "mean"))
        g_norm, updated = self._clip_and_step(self.trainable, self.optimizer, self.scheduler, g_mean)
        if self.ema is not None and updated:
            self.ema.update()
        # Discriminator update on the same samples: real and generated in one forward.
        for micro, (fake, real, cond, draws) in enumerate(generated):
            sync = acc.no_sync(self.discriminator_ddp) if micro < accum - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                real_logits, fake_logits = family.score_pair(self.discriminator_ddp, real, fake, cond, draws)
                d_loss = discriminator_loss(real_logits, fake_logits)
                acc.backward(d_loss / accum)
            add("d_loss", d_loss)
            add("d_real", torch.sigmoid(real_logits.detach()).mean())
            add("d_fake", torch.sigmoid(fake_logits.detach()).mean())
        reduced = {k: float(acc.reduce(v, "mean")) for k, v in totals.items()}
        d_norm, _ = self._clip_and_step(disc_params, self.disc_optimizer, self.disc_scheduler, reduced["d_loss"])
        return {**reduced, "grad_norm": g_norm, "d_grad_norm": d_norm}

    def train_step(self) -> Dict[str, float]:
        """One optimizer step (of the generator and the discriminator in adversarial modes)."""
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
            write_json_atomic(dataclasses.asdict(cfg), self.output_dir / "train_config.json")
            self._truncate_log()
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
                    # Strict JSON: a non-finite value (a skipped step's loss) is written as null.
                    row = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
                    handle.write(json.dumps({"step": self.step, **row}, allow_nan=False) + "\n")
            self._check_loss(metrics["loss"])
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

    def _check_loss(self, loss: float) -> None:
        """Count steps in a row whose loss was not finite (their update was skipped); raise
        TrainingError once there are more than ``max_nonfinite_steps``."""
        if math.isfinite(loss):
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row > self.cfg.max_nonfinite_steps:
            raise TrainingError(
                f"the loss was not finite ({loss}) for {self.nonfinite_in_a_row} steps in a row, up to step {self.step}; "
                f"training stopped (max_nonfinite_steps={self.cfg.max_nonfinite_steps}). Lower the learning rate, "
                "check the data for NaN / Inf, or resume from an earlier checkpoint")

    def _truncate_log(self) -> None:
        """Cut ``train_log.jsonl`` back to the rows of steps up to the current one (a resumed run
        rewrites the later ones; a torn last line of a killed run goes too)."""
        log = self.output_dir / LOG_NAME
        if not log.is_file():
            return
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.step:
                kept.append(line)
        if len(kept) != len(lines):
            write_text_atomic("".join(line + "\n" for line in kept), log)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-XXXXXXXX`` and point ``checkpoints/latest`` at it; prune old ones.

        Crash-safe: built in ``.step-XXXXXXXX.partial`` (each file atomic, ``state.json`` last),
        swapped in whole (an existing folder of this step is exchanged atomically, keeping a
        complete copy under the name throughout), then ``latest`` is replaced, then old
        checkpoints are pruned. A kill at any point leaves ``latest`` naming a complete checkpoint.
        """
        acc, cfg = self.accelerator, self.cfg
        name = f"step-{self.step:08d}"
        final, partial = self.ckpt_root / name, self.ckpt_root / f".{name}{PARTIAL_SUFFIX}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        write_safetensors_atomic(_rng_state(), partial / f"rng-{acc.process_index}.safetensors")
        acc.wait_for_everyone()  # every process's RNG file is in before the folder is committed
        if acc.is_main_process:
            model = self.model
            model.save_pretrained(partial / "model")
            if self.ema is not None:
                with torch.device("meta"):
                    averaged = match_config(type(model)(model.config))
                averaged.load_state_dict(self.ema.state_dict_over(model.state_dict()), assign=True)
                averaged.save_pretrained(partial / "ema")
            _save_optimizer(self.optimizer.optimizer, partial, "optimizer")
            schedulers = {"scheduler": self.scheduler.state_dict()}
            if self.adversarial:
                write_safetensors_atomic(self.discriminator.state_dict(), partial / "discriminator.safetensors")
                _save_optimizer(self.disc_optimizer.optimizer, partial, "disc_optimizer")
                schedulers["disc_scheduler"] = self.disc_scheduler.state_dict()
            for extra, module in self.family.extra_modules().items():
                write_safetensors_atomic({f"{extra}.{k}": v for k, v in module.state_dict().items()},
                                         partial / f"{extra}.safetensors")
            state = {
                "step": self.step, "samples_consumed": self.samples_consumed, "global_batch": self.global_batch,
                "num_processes": acc.num_processes, "model": cfg.model, "mode": cfg.mode,
                "variant": getattr(model.config, "variant", None),
                "seed": cfg.seed, **schedulers,
                "data": self._data_state(),
            }
            write_json_atomic(state, partial / STATE_NAME)  # the completeness marker: last
            commit_dir(partial, final)
            atomic_files.crash_point("checkpoint-committed")
            write_text_atomic(name, self.ckpt_root / LATEST)
            atomic_files.crash_point("latest-written")
            self._prune_checkpoints(keep=final)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self, keep: Path) -> None:
        """Delete the oldest step folders beyond ``keep_checkpoints`` (never ``keep``, the one
        just written and named by ``latest``)."""
        if self.cfg.keep_checkpoints == 0:
            return
        steps = self._step_folders()
        for old in [p for p in steps if p != keep][: max(0, len(steps) - self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_training_state(self, resume: Path) -> None:
        acc, cfg = self.accelerator, self.cfg
        state = _read_json(resume / STATE_NAME)
        missing = [k for k in ("mode", "global_batch", "step", "samples_consumed", "scheduler") if k not in state]
        if self.adversarial:
            missing += [k for k in ("disc_scheduler",) if k not in state]
        if missing:
            raise CheckpointError(f"{resume / STATE_NAME} lacks {missing}: not a checkpoint of this trainer")
        if state.get("model", "nitro_ar") != cfg.model:
            raise ConfigError(f"{resume} is a {state.get('model', 'nitro_ar')} checkpoint; this run trains {cfg.model}")
        if state["mode"] != cfg.mode:
            raise ConfigError(f"{resume} is a {state['mode']} checkpoint; this run is in {cfg.mode} mode")
        if state["global_batch"] != cfg.batch_size * acc.num_processes:
            logger.warning("resuming with global batch %d instead of %d: training continues, but not exactly as "
                           "an uninterrupted run would", cfg.batch_size * acc.num_processes, state["global_batch"])
        self.step, self.samples_consumed = int(state["step"]), int(state["samples_consumed"])
        self._restore_data_state(state.get("data"))
        _load_optimizer(self.optimizer.optimizer, resume, "optimizer")
        self.scheduler.load_state_dict(state["scheduler"])
        if self.adversarial:
            _load_optimizer(self.disc_optimizer.optimizer, resume, "disc_optimizer")
            self.disc_scheduler.load_state_dict(state["disc_scheduler"])
        if self.ema is not None:
            if not (resume / "ema").is_dir():
                raise CheckpointError(f"{resume} has no EMA weights but this run keeps an EMA (pass --ema false)")
            self.ema.load(read_state_dict(resume / "ema" / "model.safetensors"))
        if acc.is_main_process:
            logger.info("resumed from %s at step %d", resume, self.step)

    def _restore_rng(self, resume: Path) -> None:
        rng = resume / f"rng-{self.accelerator.process_index}.safetensors"
        if rng.is_file():
            _set_rng_state(read_state_dict(rng))
        else:
            logger.warning("%s has no RNG state for process %d: random draws will differ from the uninterrupted run",
                           resume, self.accelerator.process_index)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nitro-ar train CONFIG.yaml|--args``; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv)
        Trainer(cfg).train()
    except NitroARError as err:  # ConfigError, DatasetError, CheckpointError: bad input; TrainingError
        logger.error("nitro-ar: error: %s", err)
        return 1 if isinstance(err, TrainingError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
