"""Text-to-image pipelines: prompt -> text encoder -> Nitro-AR / Nitro-E -> DC-AE -> PIL images."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from .encoders import LatentCodec, TextEncoder
from .nitro_ar_model import NitroAR
from .nitro_e_model import NitroE

__all__ = ["PipelineOutput", "NitroARPipeline", "NitroEPipeline"]

PathLike = Union[str, os.PathLike]


@dataclass
class PipelineOutput:
    """``images``: PIL images; ``latents``: (B, 32, 16, 16) scaled latents when asked for."""

    images: List
    latents: Optional[torch.Tensor] = None


class _Pipeline:
    model_class = None

    def __init__(self, model, text_encoder: TextEncoder, codec: Optional[LatentCodec]):
        self.model, self.text_encoder, self.codec = model, text_encoder, codec

    @classmethod
    def from_pretrained(
        cls,
        model_path: PathLike,
        text_encoder_path: PathLike,
        vae_path: Optional[PathLike] = None,
        *,
        dtype: torch.dtype = torch.float32,
        device=None,
        **model_kwargs,
    ):
        """Load the model (official file or saved directory), the Llama text encoder and the
        DC-AE from local folders. ``vae_path=None`` gives a pipeline that returns latents only."""
        model = cls.model_class.from_pretrained(model_path, dtype=dtype, device=device, **model_kwargs)
        text_encoder = TextEncoder.from_pretrained(text_encoder_path, dtype=dtype, device=device)
        codec = LatentCodec.from_pretrained(vae_path, dtype=dtype, device=device) if vae_path is not None else None
        return cls(model, text_encoder, codec)

    def _embed(self, prompts: Sequence[str]):
        dtype = self.model.dtype
        text = self.text_encoder.encode(prompts).to(self.model.device, dtype)
        return text, self.text_encoder.empty_embedding().to(self.model.device, dtype)

    def _finish(self, latents: torch.Tensor, output_type: str) -> PipelineOutput:
        if output_type == "latent":
            return PipelineOutput(images=[], latents=latents)
        if self.codec is None:
            raise ValueError("this pipeline has no VAE (vae_path=None): use output_type='latent'")
        images = self.codec.decode(latents)
        return PipelineOutput(images=LatentCodec.to_pil(images), latents=latents)

    @torch.no_grad()
    def __call__(
        self, prompt: Union[str, Sequence[str]], *, seed: Optional[int] = None, output_type: str = "pil", **generate_kwargs
    ) -> PipelineOutput:
        """Generate one image per prompt.

        Args:
            prompt: a prompt or a list of prompts (longer than 128 tokens: truncated, warned).
            seed: seeds a CPU generator for every random draw (same seed: same image on any device).
            output_type: "pil" (decoded images, latents too) or "latent" (no decoding).
            generate_kwargs: passed to the model's ``generate``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        text, uncond = self._embed(prompts)
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        latents = self.model.generate(text, uncond, generator=generator, **generate_kwargs)
        return self._finish(latents, output_type)


class NitroARPipeline(_Pipeline):
    """Nitro-AR text-to-image: ``pipe("a red fox", seed=0).images[0]``. Keyword arguments of a
    call go to :meth:`NitroAR.generate` (``ar_steps``, ``head_steps``, ``cfg``, DiSA options, ...)."""

    model_class = NitroAR


class NitroEPipeline(_Pipeline):
    """Nitro-E text-to-image (20 steps, CFG 4.5; the distilled checkpoint: ``steps=4, cfg=1``)."""

    model_class = NitroE
