"""nitro-ar: an official-compatible model layer for AMD's Nitro-AR / Nitro-E, with fast Triton kernels.

Quick use::

    from nitro_ar import NitroAR
    model = NitroAR.from_pretrained("path/to/Nitro-AR-512px-GAN.safetensors")
    latents = model.generate(text_emb, uncond_emb)          # (B, 32, 16, 16)
    import nitro_ar.fast; nitro_ar.fast.accelerate(model)   # Triton kernels on GPU
"""
from .checkpoint import CheckpointError
from .config import NitroARConfig, NitroEConfig
from .nitro_ar_model import NitroAR
from .nitro_e_model import NitroE

__version__ = "0.1.0"

__all__ = ["NitroAR", "NitroARConfig", "NitroE", "NitroEConfig", "CheckpointError", "__version__"]


def __getattr__(name):
    # The pipelines import transformers/diffusers: load them only when asked for.
    if name in ("NitroARPipeline", "NitroEPipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'nitro_ar' has no attribute {name!r}")
