"""The text encoder (Llama-3.2-1B, base model) and the DC-AE latent codec around the models.

Both load from local folders only (``local_files_only``): nothing is downloaded at run time.
``transformers`` is a base dependency; the DC-AE needs the ``pipeline`` extra (diffusers).
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence, Union

import torch

logger = logging.getLogger("nitro_ar")

__all__ = ["TextEncoder", "LatentCodec"]

TEXT_MAX_LENGTH = 128
SCALING_FACTOR = 0.41407


class TextEncoder:
    """Prompt -> (B, 128, C_text) last hidden state of the base language model.

    As the official code: padded to ``max_length`` (pad token = eos when the tokenizer has
    none), truncated, no attention mask passed on to the image model. The language-model head
    is never run (the base model is loaded). The empty-prompt embedding is computed once.
    """

    def __init__(self, tokenizer, model, max_length: int = TEXT_MAX_LENGTH):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer, self.model, self.max_length = tokenizer, model.eval(), max_length
        self._empty: Optional[torch.Tensor] = None

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, dtype=torch.float32, device=None, max_length: int = TEXT_MAX_LENGTH):
        """Load tokenizer and base model (e.g. ``meta-llama/Llama-3.2-1B`` downloaded to ``path``)."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # Loading the base model from a causal-LM checkpoint reports the unused LM head.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        model.requires_grad_(False)
        if device is not None:
            model.to(device)
        return cls(tokenizer, model, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Prompts -> (B, max_length, hidden) in the encoder's dtype. Longer prompts are
        truncated, with a warning naming them."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        for prompt, n in zip(prompts, lengths):
            if n > self.max_length:
                logger.warning("prompt of %d tokens truncated to %d: %.60r...", n, self.max_length, prompt)
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding="max_length", max_length=self.max_length, truncation=True
        ).to(self.device)
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
        return out.hidden_states[-1]

    def empty_embedding(self) -> torch.Tensor:
        """(1, max_length, hidden): the unconditional (empty prompt) embedding, cached."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty


class LatentCodec:
    """DC-AE f32c32 (diffusers ``AutoencoderDC``): images <-> scaled latents (x 0.41407)."""

    def __init__(self, vae, scaling_factor: float = SCALING_FACTOR):
        self.vae, self.scaling_factor = vae.eval(), scaling_factor

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, dtype=torch.float32, device=None, scaling_factor: float = SCALING_FACTOR):
        try:
            from diffusers import AutoencoderDC
        except ImportError as err:  # the `pipeline` extra
            raise ImportError("the DC-AE needs diffusers: pip install 'nitro-ar[pipeline]'") from err
        vae = AutoencoderDC.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        vae.requires_grad_(False)
        if device is not None:
            vae.to(device)
        return cls(vae, scaling_factor)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 32, h, w) -> images (B, 3, 32h, 32w) float32 in [0, 1]."""
        y = self.vae.decode(latents.to(self.device, self.dtype) / self.scaling_factor).sample
        return torch.clamp(y.float() * 0.5 + 0.5, 0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, 32, H/32, W/32) float32."""
        latent = self.vae.encode(images.to(self.device, self.dtype) * 2 - 1).latent
        return latent.float() * self.scaling_factor

    @staticmethod
    def to_pil(images: torch.Tensor) -> List:
        """(B, 3, H, W) in [0, 1] -> list of PIL images."""
        from PIL import Image

        arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arrays]
