"""Every file nitro-ar writes goes through here: atomic, durable, umask-respecting.

The mechanics (temporary file in the target's folder, fsync of the file, rename, fsync of the
folder, mode ``0o666 & ~umask``, stale temporaries swept) live in the standard-library-only
:mod:`nitro_ar.kernels.atomic_files`, shared with the kernels' tuning cache; this module adds
the writers that need torch or JSON rules.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .errors import InvalidArgumentError
from .kernels.atomic_files import (
    atomic_path,
    building_dir,
    commit_dir,
    current_umask,
    dir_mode,
    file_mode,
    fsync_dir,
    is_temp,
    sweep_stale,
    write_bytes_atomic,
    write_text_atomic,
)

__all__ = [
    "atomic_path",
    "building_dir",
    "commit_dir",
    "current_umask",
    "dir_mode",
    "file_mode",
    "fsync_dir",
    "is_temp",
    "sweep_stale",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "write_safetensors_atomic",
]

PathLike = Union[str, os.PathLike]


def _non_finite_paths(value: Any, where: str = "") -> list:
    if isinstance(value, float) and not math.isfinite(value):
        return [where or "<root>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_finite_paths(v, f"{where}[{i}]")]
    return []


def write_json_atomic(data: Any, file: PathLike, *, indent: Optional[int] = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as strict JSON (no bare NaN / Infinity) atomically.

    Raises:
        InvalidArgumentError: ``data`` holds a non-finite float (its key path is named) or a
            value JSON cannot represent; nothing is written.
    """
    bad = _non_finite_paths(data)
    if bad:
        raise InvalidArgumentError(f"cannot write {file} as JSON: non-finite numbers at {', '.join(bad[:8])}")
    try:
        text = json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"cannot write {file} as JSON: {err}") from err
    return write_text_atomic(text, file)


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its storage (safetensors refuses views into shared storage,
    e.g. the fused q/k/v weights of an accelerated model)."""
    tensor = tensor.detach().cpu()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def write_safetensors_atomic(tensors: Dict[str, torch.Tensor], file: PathLike, metadata: Optional[dict] = None) -> Path:
    """Write a safetensors file atomically (see :func:`atomic_path`); returns ``file``.

    Args:
        tensors: name -> tensor, any device and dtype (copied to CPU as needed).
        metadata: optional str -> str header metadata.
    Raises:
        InvalidArgumentError: an entry is not a str -> tensor pair; nothing is written.
    """
    from safetensors.torch import save_file

    bad = [repr(k) for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InvalidArgumentError(f"cannot write {file}: entries {', '.join(bad[:8])} are not str -> tensor")
    with atomic_path(file) as tmp:
        save_file({k: _standalone(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(file)
