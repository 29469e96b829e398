"""Loading and saving checkpoints: the official safetensors files and the project's own layout.

The project's layout is a directory with ``config.json`` and ``model.safetensors``. Its tensor
names are the official ones (the model's modules are named as the official code names them),
so converting between the two layouts is lossless: only the config travels separately.
Files are only ever read as safetensors (never pickles), and writes are atomic.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .config import NITRO_E_ASA, NitroARConfig, NitroEConfig
from .errors import CheckpointError

__all__ = [
    "CheckpointError",
    "OFFICIAL_FILES",
    "read_state_dict",
    "detect_model_type",
    "infer_config",
    "resolve_checkpoint",
    "check_state_dict",
    "load_model",
    "save_model",
    "write_safetensors_atomic",
    "write_text_atomic",
    "PretrainedMixin",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OFFICIAL_FILES = {
    "gan": "Nitro-AR-512px-GAN.safetensors",
    "joint_gan": "Nitro-AR-512px-Joint-GAN.safetensors",
    "nitro_e": "Nitro-E-512px.safetensors",
}
_MAX_LISTED = 12


PathLike = Union[str, os.PathLike]


def read_state_dict(path: PathLike, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file. Raises CheckpointError for a missing or
    non-safetensors file (the header is validated before any tensor is read)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err


def detect_model_type(keys: Iterable[str]) -> str:
    """"nitro_ar" or "nitro_e" from the tensor names of a checkpoint."""
    keys = set(keys)
    if "adaln_single.linear.weight" in keys or "pos_embed.proj.weight" in keys:
        return "nitro_e"
    if "x_proj.weight" in keys or "mask_token" in keys:
        return "nitro_ar"
    raise CheckpointError("the file holds neither a Nitro-AR nor a Nitro-E checkpoint (no x_proj / adaln_single tensors)")


def _block_groups(keys: Iterable[str]) -> Tuple[int, ...]:
    counts: Dict[int, int] = {}
    for key in keys:
        m = re.match(r"block_groups\.(\d+)\.(\d+)\.", key)
        if m:
            g, i = int(m.group(1)), int(m.group(2))
            counts[g] = max(counts.get(g, 0), i + 1)
    return tuple(counts[g] for g in sorted(counts))


def infer_config(state: Dict[str, torch.Tensor]) -> Union[NitroARConfig, NitroEConfig]:
    """The configuration whose tensor names and shapes match ``state`` (what shapes can tell:
    widths, heads, depths, variant). Not stored in weights: the latent ``sample_size`` (16) and,
    for Nitro-E, whether ASA is on (the 512 px default, on)."""
    keys = set(state)
    kind = detect_model_type(keys)
    qk = "block_groups.0.0.attn.norm_q.weight"
    common = dict(
        qk_norm="rms_norm" if qk in keys else None,
        block_groups=_block_groups(keys) or (4, 16, 4),
        caption_channels=state["context_embedder.weight"].shape[1],
    )
    if kind == "nitro_ar":
        dim, in_ch = state["x_proj.weight"].shape
        head_dim = state[qk].shape[0] if qk in keys else 32
        joint = "diffloss.net.t_norm.weight" in keys
        depth = len({k.split(".")[3] for k in keys if k.startswith("diffloss.net.res_blocks.")})
        return NitroARConfig.for_variant(
            "joint_gan" if joint else "gan",
            in_channels=in_ch,
            out_channels=state["diffloss.net.final_layer.linear.weight"].shape[0],
            num_attention_heads=dim // head_dim,
            attention_head_dim=head_dim,
            caption_projection_dim=dim,
            diffloss_w=state["diffloss.net.input_proj.weight"].shape[0],
            diffloss_d=depth,
            global_head=any(k.startswith("diffloss_global.") for k in keys),
            **common,
        )
    dim, in_ch, patch, _ = state["pos_embed.proj.weight"].shape
    head_dim = state[qk].shape[0] if qk in keys else 32
    max_size = int(round(state["pos_embed.pos_embed"].shape[1] ** 0.5)) if "pos_embed.pos_embed" in keys else 96
    return NitroEConfig(
        in_channels=in_ch,
        out_channels=state["proj_out.weight"].shape[0] // (patch * patch),
        patch_size=patch,
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        caption_projection_dim=dim,
        pos_embed_max_size=max_size,
        asa_pattern=NITRO_E_ASA,
        **common,
    )


def resolve_checkpoint(path: PathLike, model_type: str, variant: Optional[str] = None) -> Tuple[Path, Optional[dict]]:
    """Find the weights file behind ``path`` and the saved config, if any.

    ``path`` may be a ``.safetensors`` file (official or saved), a directory saved by
    ``save_pretrained`` (``config.json`` + ``model.safetensors``), or a directory of official
    files (e.g. a download of ``amd/Nitro-AR``, holding both variants: ``variant`` picks one).
    """
    path = Path(path)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    if (path / CONFIG_NAME).is_file():
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON ({err})") from err
        return path / WEIGHTS_NAME, config
    files = sorted(path.glob("*.safetensors"))
    wanted = OFFICIAL_FILES.get(variant or model_type)
    if wanted and (path / wanted).is_file():
        return path / wanted, None
    if len(files) == 1:
        return files[0], None
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors file")
    names = ", ".join(f.name for f in files)
    raise CheckpointError(f"{path} holds several checkpoints ({names}); pass the file, or variant=...")


def _listing(title: str, items: List[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {title}: {shown}{more}"


def check_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped tensor, with the
    configuration that would fit the checkpoint when it can be inferred."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    not_float = sorted(k for k, v in state.items() if not v.is_floating_point())
    if not (missing or unexpected or mismatched or not_float):
        return
    parts = [f"{source} does not fit {type(model).__name__}"]
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if mismatched:
        parts.append(_listing("shape mismatches", mismatched))
    if not_float:
        parts.append(_listing("non-floating-point tensors", not_float))
    try:
        fitting = infer_config(state)
        parts.append(f"a config that fits this checkpoint: {type(fitting).__name__}.from_dict({json.dumps(fitting.to_dict(), sort_keys=True)})")
    except (CheckpointError, KeyError, ValueError, IndexError):
        pass
    raise CheckpointError("; ".join(parts))


def _materialise_buffers(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Rebuild non-persistent buffers (position tables) after a meta-device construction."""
    for module in model.modules():
        build = getattr(module, "build_buffers", None)
        if build is not None:
            build(device, dtype)


def load_model(cls, path: PathLike, config=None, *, dtype=None, device=None, variant: Optional[str] = None):
    """Build ``cls`` from a checkpoint without a second copy of the weights in memory.

    The model is constructed on the meta device, then the checkpoint's tensors (cast to
    ``dtype``, moved to ``device``) are assigned to it. ``config`` overrides the saved or
    inferred configuration (it is required to be consistent with the tensors).
    """
    model_type = cls.config_class.model_type
    file, saved = resolve_checkpoint(path, model_type, variant or getattr(config, "variant", None))
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = read_state_dict(file, device="cpu")
    kind = detect_model_type(state)
    if kind != model_type:
        other = "NitroE" if kind == "nitro_e" else "NitroAR"
        raise CheckpointError(f"{file} is a {kind} checkpoint; load it with {other}.from_pretrained")
    if config is None:
        config = cls.config_class.from_dict(saved) if saved is not None else infer_config(state)
    elif not isinstance(config, cls.config_class):
        raise TypeError(f"config must be a {cls.config_class.__name__}, got {type(config).__name__}")
    if variant is not None and getattr(config, "variant", variant) != variant:
        raise CheckpointError(f"variant {variant!r} requested but the config is for {config.variant!r}")
    with torch.device("meta"):
        model = cls(config)
    if model_type == "nitro_ar":  # a refinement-window model takes official files: zero age embedding
        from .tensorar import complete_age_embedding

        state = complete_age_embedding(model, state)
    check_state_dict(model, state, source=str(file))
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(model, device, dtype)
    return model.eval()


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its storage (safetensors refuses views into shared storage,
    e.g. the fused q/k/v weights of an accelerated model)."""
    tensor = tensor.detach().cpu()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def write_safetensors_atomic(tensors: Dict[str, torch.Tensor], file: PathLike, metadata: Optional[dict] = None) -> None:
    """Write a safetensors file through a temporary file in the same directory and an atomic
    rename, so an interrupted write never leaves a truncated checkpoint behind."""
    from safetensors.torch import save_file

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    os.close(fd)
    try:
        save_file({k: _standalone(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(text: str, file: PathLike) -> None:
    """Write a text file through a temporary file in the same directory and an atomic rename."""
    file = Path(file)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, file)


def save_model(model: nn.Module, directory: PathLike, *, official_file: Optional[PathLike] = None) -> Path:
    """Save in the project's layout (``config.json`` + ``model.safetensors``), or, with
    ``official_file``, as one official-layout safetensors file. Returns the path written."""
    state = model.state_dict()
    if official_file is not None:
        if model.config.model_type == "nitro_ar":  # the official layout has no age embedding
            from .tensorar import official_age_state

            state = official_age_state(state)
        write_safetensors_atomic(state, official_file)
        return Path(official_file)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "nitro_ar": model.config.model_type})
    write_text_atomic(model.config.to_json(), directory / CONFIG_NAME)
    return directory


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for the model classes (set ``config_class``)."""

    config_class = None

    @classmethod
    def from_pretrained(cls, path: PathLike, config=None, *, dtype=None, device=None, variant: Optional[str] = None):
        """Load an official safetensors file, a directory of official files, or a directory
        written by :meth:`save_pretrained`.

        Args:
            path: file or directory.
            config: the model configuration; default: the saved one, else inferred from shapes.
            dtype: parameter dtype (default: the file's); device: where to put it (default CPU).
            variant: for a directory of official Nitro-AR files, "gan" or "joint_gan".
        Raises:
            CheckpointError (a ValueError) naming missing, unexpected or mis-shaped tensors, a
            file that is not safetensors, or a checkpoint of the other model family.
        """
        return load_model(cls, path, config, dtype=dtype, device=device, variant=variant)

    def save_pretrained(self, directory: PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (official tensor names) atomically."""
        return save_model(self, directory)

    def save_official(self, file: PathLike) -> Path:
        """Write one safetensors file in the official layout (loadable by the official code)."""
        return save_model(self, None, official_file=file)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
