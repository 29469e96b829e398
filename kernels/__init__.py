"""Triton kernels of nitro-ar, installed as ``nitro_ar.kernels``.

- One file per fused op (``modulated_norm``, ``joint_attention``, ``flow_step``,
  ``fused_linear``), read top-down: ``@triton.jit`` kernels, launch configs
  (:class:`~nitro_ar.kernels.launch.ConfigTable`, CUDA and HIP side by side) and host launchers,
  the ``torch.autograd.Function`` (``fused_linear`` has none: under autograd it runs its library
  path), validation, the public function.
- :mod:`~nitro_ar.kernels.reference`: the one eager (plain torch) definition of every op, used by
  the torch backend, every fallback, the model layer, the tests and the benchmarks.
- :mod:`~nitro_ar.kernels.backend`: which implementation runs (chosen in one place).
- :mod:`~nitro_ar.kernels.launch` / :mod:`~nitro_ar.kernels.offsets`: launch planning (index
  width from sizes and strides) and the device-side index widening.
- :mod:`~nitro_ar.kernels.tuning` / :mod:`~nitro_ar.kernels.tuning_problems`: persisted tuned
  configs, and the problems and benchmarks the tuner times.
- :mod:`~nitro_ar.kernels.errors`: :class:`KernelInputError` (a ``ValueError``).

Kernel files import torch and triton only. Importing this package never requires Triton;
``reference``, ``backend``, ``launch`` and ``errors`` never import it.
"""
