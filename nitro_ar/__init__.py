"""nitro-ar: an official-compatible model layer for AMD's Nitro-AR / Nitro-E, with fast Triton kernels.

Quick use::

    from nitro_ar import NitroAR, NitroARPipeline
    model = NitroAR.from_pretrained("amd/Nitro-AR", variant="gan")   # Hub repo, file or folder
    latents = model.generate(text_emb, uncond_emb)                    # (B, 32, 16, 16)
    import nitro_ar.fast; nitro_ar.fast.accelerate(model)             # Triton kernels on GPU
    pipe = NitroARPipeline.from_pretrained()                          # model + Llama-3.2-1B + DC-AE
    pipe("a red fox", generator=torch.Generator().manual_seed(0)).images[0]
"""
from .config import NitroARConfig, NitroEConfig
from .errors import CheckpointError, HubError
from .nitro_ar_model import NitroAR
from .nitro_e_model import NitroE

# The one version source: pyproject.toml reads it (setuptools dynamic version), `nitro-ar --version` prints it.
__version__ = "0.1.0"

__all__ = ["NitroAR", "NitroARConfig", "NitroE", "NitroEConfig", "CheckpointError", "HubError", "__version__"]


def __getattr__(name):
    # The pipelines import transformers/diffusers: load them only when asked for.
    if name in ("NitroARPipeline", "NitroEPipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'nitro_ar' has no attribute {name!r}")
