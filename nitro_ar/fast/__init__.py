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

from ..kernels.backend import select_backend
from ..mmdit import JointAttention, JointTransformerBlock
from .backbone import FastJointAttention, FastJointTransformerBlock
from .heads import FAST_HEAD_CLASSES

__all__ = ["accelerate", "restore", "is_accelerated", "backend_of", "FAST_CLASSES", "FastJointAttention", "FastJointTransformerBlock"]

# reference class -> accelerated drop-in (a subclass with the same parameters)
FAST_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {
    JointAttention: FastJointAttention,
    JointTransformerBlock: FastJointTransformerBlock,
    **FAST_HEAD_CLASSES,
}
_REFERENCE_OF = {fast: ref for ref, fast in FAST_CLASSES.items()}


def _target(model: nn.Module) -> nn.Module:
    """The network inside a pipeline, or the model itself."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def accelerate(model, *, backend: Optional[str] = None, graphs: bool = True):
    """Swap the accelerated drop-ins into a loaded ``NitroAR`` / ``NitroE`` (or pipeline), in place.

    Args:
        model: a model or a pipeline (its ``.model`` is accelerated).
        backend: "triton" | "interpret" | "torch" | "reference"; default by device (and
            ``NITRO_AR_BACKEND``), announced once in the log.
        graphs: on a GPU, replay the sampling loops from captured CUDA/HIP graphs.
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
    for module in target.modules():
        fast_cls = FAST_CLASSES.get(type(module))
        if fast_cls is not None:
            module.__class__ = fast_cls
            module.prepare_fast(chosen)
    target._nitro_fast_backend = chosen
    if graphs and device.type == "cuda":
        from .graphs import enable_graphs

        enable_graphs(target)
    return model


def restore(model):
    """Undo :func:`accelerate`: the reference classes come back (weights untouched)."""
    target = _target(model)
    for module in target.modules():
        ref_cls = _REFERENCE_OF.get(type(module))
        if ref_cls is not None:
            module.release_fast()
            module.__class__ = ref_cls
    from .graphs import disable_graphs

    disable_graphs(target)
    target.__dict__.pop("_nitro_fast_backend", None)
    return model


def is_accelerated(model) -> bool:
    return backend_of(model) is not None


def backend_of(model) -> Optional[str]:
    """The backend an accelerated model runs on, or None for a reference model."""
    return getattr(_target(model), "_nitro_fast_backend", None)
