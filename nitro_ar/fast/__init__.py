"""``nitro_ar.fast``: accelerated drop-in modules and one-call model acceleration.

    import nitro_ar.fast
    model = nitro_ar.fast.accelerate(NitroAR.from_pretrained(path).to("cuda", torch.bfloat16))
    latents = model.generate(text_emb, uncond_emb)      # same numbers, faster
    nitro_ar.fast.restore(model)                          # back to the eager reference

Backends (see :mod:`nitro_ar.kernels.backend`): ``triton`` on CUDA and ROCm GPUs; on CPU the
``torch`` backend (plain PyTorch with every saving that needs no custom kernel), or the Triton
interpreter when ``TRITON_INTERPRET=1`` / ``NITRO_AR_BACKEND=interpret``; ``reference`` leaves
the model untouched. ``NITRO_AR_BACKEND`` overrides the automatic choice.

The drop-in classes subclass the reference modules: same constructor arguments, parameters and
state-dict keys, so an accelerated model saves the same checkpoint as the reference.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

from torch import nn

from ..errors import invalid
from ..kernels.backend import select_backend
from ..layers import RMSNorm
from ..mmdit import JointAttention, JointTransformerBlock
from ..nitro_ar_model import NitroAR
from ..nitro_e_model import NitroE
from .backbone import FastJointAttention, FastJointTransformerBlock, FastRMSNorm
from .heads import FAST_HEAD_CLASSES

__all__ = ["accelerate", "restore", "is_accelerated", "backend_of", "swap_classes", "FAST_CLASSES",
           "FastJointAttention", "FastJointTransformerBlock", "FastRMSNorm"]

# reference class -> accelerated drop-in (a subclass with the same parameters)
FAST_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {
    RMSNorm: FastRMSNorm,
    JointAttention: FastJointAttention,
    JointTransformerBlock: FastJointTransformerBlock,
    **FAST_HEAD_CLASSES,
}
_REFERENCE_OF = {fast: ref for ref, fast in FAST_CLASSES.items()}


def swap_classes(root: nn.Module, backend: Optional[str]) -> None:
    """The one mechanism of the fast path: every submodule of ``root`` (itself included) whose
    class has a drop-in becomes it (``backend`` given: ``prepare_fast(backend)`` after the
    swap), or, with ``backend=None``, goes back to its reference class (``release_fast()``
    first). Drop-ins subclass their reference, so parameters and buffers stay where they are."""
    for module in list(root.modules()):
        if backend is not None and type(module) in FAST_CLASSES:
            module.__class__ = FAST_CLASSES[type(module)]
            module.prepare_fast(backend)
        elif backend is None and type(module) in _REFERENCE_OF:
            module.release_fast()
            module.__class__ = _REFERENCE_OF[type(module)]


def _target(model) -> nn.Module:
    """The network of a pipeline, or the model itself."""
    from ..pipeline import _Pipeline

    if isinstance(model, _Pipeline):
        return model.model
    if isinstance(model, nn.Module):
        return model
    raise invalid("model", type(model).__name__, "a NitroAR / NitroE model, one of their modules, or a pipeline")


def accelerate(model, *, backend: Optional[str] = None, graphs: bool = True):
    """Swap the accelerated drop-ins into a loaded ``NitroAR`` / ``NitroE`` (or pipeline), in place.

    Args:
        model: a model (or a module of one, e.g. a head) or a pipeline (its ``.model``).
        backend: "triton" | "interpret" | "torch" | "reference"; default by device (and
            ``NITRO_AR_BACKEND``), announced once in the log.
        graphs: on a GPU, replay each sampling step of ``generate`` from a captured CUDA/HIP
            graph (:mod:`nitro_ar.fast.graphs`).
    Returns:
        ``model`` (the same object).
    """
    target = _target(model)
    device = next(target.parameters()).device
    chosen = select_backend(device, backend)
    if is_accelerated(target):
        restore(target)
    if chosen == "reference":
        return model
    swap_classes(target, chosen)
    target._nitro_fast_backend = chosen
    if graphs and device.type == "cuda" and isinstance(target, (NitroAR, NitroE)):
        from .graphs import enable_graphs

        enable_graphs(target)
    return model


def restore(model):
    """Undo :func:`accelerate`: the reference classes come back (weights untouched), graphs freed."""
    from .graphs import disable_graphs

    target = _target(model)
    swap_classes(target, None)
    disable_graphs(target)
    target.__dict__.pop("_nitro_fast_backend", None)
    return model


def is_accelerated(model) -> bool:
    return backend_of(model) is not None


def backend_of(model) -> Optional[str]:
    """The backend an accelerated model runs on, or None for a reference model."""
    return getattr(_target(model), "_nitro_fast_backend", None)
