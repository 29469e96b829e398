"""Triton kernels of nitro-ar, installed as ``nitro_ar.kernels``.

Each kernel file holds its ``@triton.jit`` kernels, host launchers, the
``torch.autograd.Function`` and its per-backend config lists. Importing this package never
requires Triton; kernel modules import it lazily through :mod:`nitro_ar.kernels.backend`.
"""
