"""Small helpers shared by the model classes."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import InvalidArgumentError

__all__ = ["check_tensor"]


def check_tensor(name: str, x: torch.Tensor, ndim: int, last: Optional[int] = None) -> None:
    """Raise InvalidArgumentError (a ValueError) unless ``x`` is a floating tensor of ``ndim``
    dims (and last dim ``last``)."""
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != ndim or (last is not None and x.shape[-1] != last):
        want = f"{ndim} dims" + (f" with last dim {last}" if last is not None else "")
        raise InvalidArgumentError(f"{name} has shape {tuple(x.shape)}; expected {want}")
    if not x.is_floating_point():
        raise InvalidArgumentError(f"{name} must be floating point, got {x.dtype}")
