"""Loading and saving checkpoints: the official safetensors files and the project's own layout.

The project's layout is a directory with ``config.json`` and ``model.safetensors``. Its tensor
names are the official ones (the model's modules are named as the official code names them),
so converting between the two layouts is lossless: only the config travels separately.
Files are only ever read as safetensors (never pickles), every tensor name, shape and value
is checked before a model is built (a checkpoint with NaN / Inf weights is refused unless asked
for), and writes go through :mod:`nitro_ar.io` (atomic, fsync-ed, umask-respecting).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .config import NITRO_E_ASA, NitroARConfig, NitroEConfig
from .errors import CheckpointError, ConfigError, invalid
from .io import write_safetensors_atomic, write_text_atomic

__all__ = [
    "CheckpointError",
    "OFFICIAL_FILES",
    "read_state_dict",
    "detect_model_type",
    "infer_config",
    "resolve_checkpoint",
    "check_state_dict",
    "check_finite",
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


# safetensors' dtype names of the floating-point dtypes a checkpoint may be cast to.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def read_state_dict(
    path: PathLike, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None
) -> Dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file. Raises CheckpointError for a missing or
    non-safetensors file (the header is validated before any tensor is read).

    Floating-point tensors are cast to ``dtype`` (``None``: as stored) and moved to ``device``.
    Without a cast or a move the tensors stay memory-mapped (read lazily, as safetensors does);
    with one, tensors are read, converted and released one at a time, each through its own
    short-lived mapping, so host memory peaks at about the converted model plus one tensor,
    never the file and the model together.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    device = torch.device(device)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            stored = {key: handle.get_slice(key).get_dtype() for key in keys}
            target = _SAFETENSORS_DTYPES.get(dtype, "?") if dtype is not None else None
            convert = device.type != "cpu" or (target is not None and any(
                name != target for name in stored.values() if name.startswith(("F", "BF"))))
            if not convert:
                return {key: handle.get_tensor(key) for key in keys}
        state = {}
        for key in keys:
            # A mapping per tensor: the pages read are released with it (one mapping for the
            # whole loop would keep every page of the file resident until the end).
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(key)
            cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            state[key] = tensor.to(device=device, dtype=cast, copy=True)
            del tensor
        return state
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


def _shape(state: Dict[str, torch.Tensor], key: str, ndim: int) -> Tuple[int, ...]:
    """The shape of tensor ``key``: present, ``ndim`` dims, no empty dim; else CheckpointError."""
    if key not in state:
        raise CheckpointError(f"cannot infer the model configuration: the checkpoint has no tensor {key}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"cannot infer the model configuration: {key} has shape {shape}, "
                              f"expected {ndim} non-empty dims")
    return shape


def infer_config(state: Dict[str, torch.Tensor]) -> Union[NitroARConfig, NitroEConfig]:
    """The configuration whose tensor names and shapes match ``state`` (what shapes can tell:
    widths, heads, depths, variant). Not stored in weights: the latent ``sample_size`` (16) and,
    for Nitro-E, whether ASA is on (the 512 px default, on).

    Raises:
        CheckpointError: a tensor the inference reads is missing or mis-shaped, or the shapes
            give no valid configuration (named in the message).
    """
    keys = set(state)
    kind = detect_model_type(keys)
    qk = "block_groups.0.0.attn.norm_q.weight"
    head_dim = _shape(state, qk, 1)[0] if qk in keys else 32
    common = dict(
        qk_norm="rms_norm" if qk in keys else None,
        block_groups=_block_groups(keys) or (4, 16, 4),
        caption_channels=_shape(state, "context_embedder.weight", 2)[1],
    )
    try:
        if kind == "nitro_ar":
            dim, in_ch = _shape(state, "x_proj.weight", 2)
            joint = "diffloss.net.t_norm.weight" in keys
            depth = len({k.split(".")[3] for k in keys if k.startswith("diffloss.net.res_blocks.")})
            return NitroARConfig.for_variant(
                "joint_gan" if joint else "gan",
                in_channels=in_ch,
                out_channels=_shape(state, "diffloss.net.final_layer.linear.weight", 2)[0],
                num_attention_heads=dim // head_dim,
                attention_head_dim=head_dim,
                caption_projection_dim=dim,
                diffloss_w=_shape(state, "diffloss.net.input_proj.weight", 2)[0],
                diffloss_d=depth,
                global_head=any(k.startswith("diffloss_global.") for k in keys),
                shortcut="diffloss.net.step_embed.mlp.0.weight" in keys,
                **common,
            )
        dim, in_ch, patch, _ = _shape(state, "pos_embed.proj.weight", 4)
        table = _shape(state, "pos_embed.pos_embed", 3)[1] if "pos_embed.pos_embed" in keys else 96**2
        return NitroEConfig(
            in_channels=in_ch,
            out_channels=_shape(state, "proj_out.weight", 2)[0] // (patch * patch),
            patch_size=patch,
            num_attention_heads=dim // head_dim,
            attention_head_dim=head_dim,
            caption_projection_dim=dim,
            pos_embed_max_size=int(round(table**0.5)),
            asa_pattern=NITRO_E_ASA,
            **common,
        )
    except ConfigError as err:
        raise CheckpointError(f"the checkpoint's shapes give no valid configuration: {err}") from err


def resolve_checkpoint(
    path: PathLike,
    model_type: Optional[str],
    variant: Optional[str] = None,
    *,
    filename: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
) -> Tuple[Path, Optional[dict]]:
    """Find the weights file behind ``path`` and the saved config, if any.

    ``path`` may be a ``.safetensors`` file (official or saved), a directory saved by
    ``save_pretrained`` (``config.json`` + ``model.safetensors``), a directory of official
    files (e.g. a download of ``amd/Nitro-AR``, holding both variants: ``variant`` picks one),
    or a Hub repository id (``"amd/Nitro-AR"``): then only the weights wanted are fetched
    (``filename``, else the official file of ``variant`` / ``model_type``, default ``gan``; or a
    saved ``config.json`` + ``model.safetensors``) through :func:`nitro_ar.hub.resolve`.
    ``model_type`` None accepts either family (the official file of both is looked for).
    ``filename`` names the weights file inside a folder or repository.
    """
    from .hub import is_repo_id, resolve

    local = Path(path).expanduser()
    if not local.exists() and is_repo_id(path):
        if variant not in (None, "gan", "joint_gan"):
            raise invalid("variant", variant, '"gan" or "joint_gan"')
        ar_file, e_file = OFFICIAL_FILES[variant or "gan"], OFFICIAL_FILES["nitro_e"]
        if filename is not None:
            wanted = [filename]
        else:
            wanted = {"nitro_ar": [ar_file], "nitro_e": [e_file]}.get(model_type, [ar_file, e_file])
        local = resolve(path, files=wanted + [CONFIG_NAME, WEIGHTS_NAME], required=[tuple(wanted + [WEIGHTS_NAME])],
                        revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        # An official file wins over a config.json the repository may carry for other tools.
        filename = filename or next((name for name in wanted if (local / name).is_file()), None)
    path = local
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    if filename is not None:
        if not (path / filename).is_file():
            raise CheckpointError(f"{path} holds no {filename}")
        return path / filename, None
    if (path / CONFIG_NAME).is_file():
        try:
            config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON ({err})") from err
        if not isinstance(config, dict):
            raise ConfigError(f"{path / CONFIG_NAME}: expected a JSON object of config fields, got {type(config).__name__}")
        return path / WEIGHTS_NAME, config
    files = sorted(path.glob("*.safetensors"))
    wanted = OFFICIAL_FILES.get(variant or model_type or "")
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
        fitting_json = json.dumps(fitting.to_dict(), sort_keys=True)
        parts.append(f"a config that fits this checkpoint: {type(fitting).__name__}.from_dict({fitting_json})")
    except (CheckpointError, KeyError, ValueError, IndexError):
        pass
    raise CheckpointError("; ".join(parts))


def check_finite(state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming every floating-point tensor of ``state`` holding NaN or Inf."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"{source} holds non-finite weights (NaN or Inf): {_listing('tensors', bad)}; "
                              "pass allow_nonfinite=True to load it anyway")


def _saved_config(cls, saved: dict, path: PathLike):
    """The config of a saved ``config.json``; ConfigError naming the file, the key and the value."""
    try:
        return cls.config_class.from_dict(saved)
    except ConfigError as err:
        raise ConfigError(f"{Path(path)}: {err}") from err


def _materialise_buffers(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Rebuild non-persistent buffers (position tables) after a meta-device construction."""
    for module in model.modules():
        build = getattr(module, "build_buffers", None)
        if build is not None:
            build(device, dtype)


def load_model(
    cls,
    path: PathLike,
    config=None,
    *,
    dtype=None,
    device=None,
    variant: Optional[str] = None,
    filename: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
    allow_nonfinite: bool = False,
):
    """Build ``cls`` from a checkpoint (local path or Hub repository id, see
    :func:`resolve_checkpoint`) without a second copy of the weights in memory.

    The model is constructed on the meta device; the checkpoint's tensors are read one by one,
    each cast to ``dtype`` and moved to ``device`` as it is read, and assigned to it. ``config``
    overrides the saved or inferred configuration (it is required to be consistent with the
    tensors). Checked first: the file (safetensors), the model family, the saved config
    (ConfigError naming the key), tensor names / shapes / dtypes, and, unless
    ``allow_nonfinite``, that no weight is NaN or Inf.
    """
    model_type = cls.config_class.model_type
    file, saved = resolve_checkpoint(
        path, model_type, variant or getattr(config, "variant", None), filename=filename, revision=revision,
        cache_dir=cache_dir, token=token, local_files_only=local_files_only,
    )
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = read_state_dict(file, device=device, dtype=dtype)
    kind = detect_model_type(state)
    if kind != model_type:
        other = "NitroE" if kind == "nitro_e" else "NitroAR"
        raise CheckpointError(f"{file} is a {kind} checkpoint; load it with {other}.from_pretrained")
    if not allow_nonfinite:
        check_finite(state, source=str(file))
    if config is None:
        config = _saved_config(cls, saved, Path(path) / CONFIG_NAME) if saved is not None else infer_config(state)
    elif not isinstance(config, cls.config_class):
        raise TypeError(f"config must be a {cls.config_class.__name__}, got {type(config).__name__}")
    if variant is not None and getattr(config, "variant", variant) != variant:
        raise CheckpointError(f"variant {variant!r} requested but the config is for {config.variant!r}")
    from .shortcut import complete_step_embeddings, match_config

    with torch.device("meta"):
        model = cls(config)
        if model_type == "nitro_ar":
            match_config(model)
    # A shortcut model takes a flow-matching (official) checkpoint: zero step embeddings.
    state = complete_step_embeddings(model, state) if model_type == "nitro_ar" else state
    if model_type == "nitro_ar":  # a refinement-window model takes official files: zero age embedding
        from .tensorar import complete_age_embedding

        state = complete_age_embedding(model, state)
    check_state_dict(model, state, source=str(file))
    if dtype is None:
        dtype = next(iter(state.values())).dtype
        for key in list(state):  # a file of mixed dtypes: one dtype, converted in place
            state[key] = state[key].to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(model, device, dtype)
    return model.eval()


def save_model(model: nn.Module, directory: PathLike, *, official_file: Optional[PathLike] = None) -> Path:
    """Save in the project's layout (``config.json`` + ``model.safetensors``), or, with
    ``official_file``, as one official-layout safetensors file. Returns the path written."""
    state = model.state_dict()
    if official_file is not None:
        if model.config.model_type == "nitro_ar":
            from .shortcut import official_state_dict
            from .tensorar import official_age_state

            # Neither layer exists in the official layout: a trained one is refused.
            state = official_age_state(official_state_dict(model, state))
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
    def from_pretrained(
        cls,
        path: PathLike,
        config=None,
        *,
        dtype=None,
        device=None,
        variant: Optional[str] = None,
        filename: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        token: Union[str, bool, None] = None,
        local_files_only: bool = False,
        allow_nonfinite: bool = False,
    ):
        """Load an official safetensors file, a directory of official files, a directory
        written by :meth:`save_pretrained`, or a Hugging Face Hub repository.

        Args:
            path: file, directory, or Hub repository id (``"amd/Nitro-AR"``, ``"amd/Nitro-E"``):
                only the weights needed are downloaded (see ``variant`` / ``filename``).
            config: the model configuration; default: the saved one, else inferred from shapes.
            dtype: parameter dtype (default: the file's); device: where to put it (default CPU).
                Tensors are converted one by one as they are read (peak memory about one model).
            variant: for official Nitro-AR files (a directory or ``amd/Nitro-AR``), "gan"
                (default on the Hub) or "joint_gan".
            filename: the weights file inside the directory or repository, e.g.
                ``"Nitro-E-512px-dist.safetensors"``.
            revision, cache_dir, token, local_files_only: as in ``huggingface_hub``
                (``HF_HUB_OFFLINE=1`` is honoured).
            allow_nonfinite: load weights holding NaN / Inf instead of refusing them.
        Raises:
            CheckpointError (a ValueError) naming missing, unexpected or mis-shaped tensors,
            tensors holding NaN / Inf, a file that is not safetensors, or a checkpoint of the
            other model family. ConfigError (a ValueError) naming a bad ``config.json`` key.
            HubError (an OSError) when a repository cannot be fetched or is not cached.
        """
        return load_model(cls, path, config, dtype=dtype, device=device, variant=variant, filename=filename,
                          revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                          allow_nonfinite=allow_nonfinite)

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
