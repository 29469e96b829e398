"""The text encoder (Llama-3.2-1B, base model) and the DC-AE latent codec around the models.

Both load from a local folder or a Hugging Face Hub repository (:func:`nitro_ar.hub.resolve`:
only the config, tokenizer and safetensors weights are fetched, never pickled weights;
``HF_HUB_OFFLINE=1`` / ``local_files_only=True`` read the cache only). The folder is checked
before anything is loaded. ``transformers`` is a base dependency; the DC-AE needs the
``pipeline`` extra (diffusers).
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence, Union

import torch

from .errors import CheckpointError
from .hub import TEXT_ENCODER_FILES, TEXT_ENCODER_REQUIRED, VAE_FILES, VAE_REQUIRED, resolve

logger = logging.getLogger("nitro_ar")

__all__ = ["TextEncoder", "LatentCodec", "TEXT_ENCODER_REPO", "VAE_REPO"]

TEXT_MAX_LENGTH = 128
SCALING_FACTOR = 0.41407
TEXT_ENCODER_REPO = "meta-llama/Llama-3.2-1B"
VAE_REPO = "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"
PathLike = Union[str, os.PathLike]


def _load(what: str, folder, load):
    """``load()``, with a library's error on a malformed folder turned into one CheckpointError."""
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError) as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"the {what} at {folder} cannot be loaded ({type(err).__name__}: {first_line})") from err


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
    def from_pretrained(
        cls,
        path: PathLike = TEXT_ENCODER_REPO,
        *,
        dtype=torch.float32,
        device=None,
        max_length: int = TEXT_MAX_LENGTH,
        revision: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        token: Union[str, bool, None] = None,
        local_files_only: bool = False,
    ):
        """Load tokenizer and base model from a local folder or a Hub repository (default
        ``meta-llama/Llama-3.2-1B``: gated, accept its licence on the Hub and log in first).
        ``revision``, ``cache_dir``, ``token``, ``local_files_only``: as in huggingface_hub."""
        folder = resolve(path, files=TEXT_ENCODER_FILES, required=TEXT_ENCODER_REQUIRED, revision=revision,
                         cache_dir=cache_dir, token=token, local_files_only=local_files_only, what="text encoder")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        tokenizer = _load("text encoder", folder, lambda: AutoTokenizer.from_pretrained(folder, local_files_only=True))
        # Loading the base model from a causal-LM checkpoint reports the unused LM head.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = _load("text encoder", folder, lambda: AutoModel.from_pretrained(
                folder, dtype=dtype, local_files_only=True, use_safetensors=True))
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
    def from_pretrained(
        cls,
        path: PathLike = VAE_REPO,
        *,
        dtype=torch.float32,
        device=None,
        scaling_factor: float = SCALING_FACTOR,
        revision: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        token: Union[str, bool, None] = None,
        local_files_only: bool = False,
    ):
        """Load the DC-AE (diffusers format) from a local folder or a Hub repository (default
        ``mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers``); hub arguments as in huggingface_hub."""
        try:
            from diffusers import AutoencoderDC
        except ImportError as err:  # the `pipeline` extra
            raise ImportError("the DC-AE needs diffusers: pip install 'nitro-ar[pipeline]'") from err
        folder = resolve(path, files=VAE_FILES, required=VAE_REQUIRED, revision=revision, cache_dir=cache_dir,
                         token=token, local_files_only=local_files_only, what="DC-AE")
        vae = _load("DC-AE", folder, lambda: AutoencoderDC.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True, use_safetensors=True))
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
