"""The error the kernels raise for input they cannot take.

Kernel modules import torch and triton only, so this is a plain ``ValueError`` subclass;
:mod:`nitro_ar.errors` re-exports it, and ``except ValueError`` catches it as before.
"""
from __future__ import annotations

__all__ = ["KernelInputError"]


class KernelInputError(ValueError):
    """A tensor or option a fused op cannot use; the message names the argument, what it got and
    what is accepted."""
