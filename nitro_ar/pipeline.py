"""Text-to-image pipelines: prompt -> text encoder -> Nitro-AR / Nitro-E -> DC-AE -> images.

Loading and calling follow diffusers' conventions::

    pipe = NitroARPipeline.from_pretrained(dtype=torch.bfloat16, device="cuda")   # amd/Nitro-AR, gan
    out = pipe(["a red fox", "an owl"], negative_prompt="blurry", num_images_per_prompt=4,
               generator=torch.Generator().manual_seed(0), output_type="pil")
    out.images[0].save("fox.png")

Where the official code names a setting differently from diffusers, the official (model-level)
name is kept: ``cfg`` (diffusers' ``guidance_scale``), ``ar_steps`` / ``head_steps`` (Nitro-AR)
and ``steps`` (Nitro-E) (diffusers' ``num_inference_steps``); any other keyword goes to the
model's ``generate``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import resolve_checkpoint
from .encoders import TEXT_ENCODER_REPO, VAE_REPO, LatentCodec, TextEncoder
from .errors import InvalidArgumentError, invalid
from .hub import TEXT_ENCODER_FILES, TEXT_ENCODER_REQUIRED, VAE_FILES, VAE_REQUIRED, resolve
from .nitro_ar_model import NitroAR
from .nitro_e_model import NitroE

__all__ = ["PipelineOutput", "NitroARPipeline", "NitroEPipeline", "OUTPUT_TYPES"]

PathLike = Union[str, os.PathLike]
GeneratorArg = Union[torch.Generator, Sequence[torch.Generator], None]
OUTPUT_TYPES = ("pil", "pt", "np", "latent")


@dataclass
class PipelineOutput:
    """``images``: PIL images (``"pil"``), a (B, 3, H, W) float tensor in [0, 1] (``"pt"``), a
    (B, H, W, 3) float32 array in [0, 1] (``"np"``), or the latents (``"latent"``);
    ``latents``: the (B, 32, 16, 16) scaled latents, whatever the output type."""

    images: Any
    latents: Optional[torch.Tensor] = None


def _as_prompts(name: str, value: Union[str, Sequence[str]]) -> List[str]:
    prompts = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise invalid(name, value, "a string or a non-empty list of strings")
    return prompts


class _Pipeline:
    model_class = None
    default_repo: str = ""
    # Whether a list of per-image generators still runs as one batch (else one call per image).
    per_image_generators_batched = False

    def __init__(self, model, text_encoder: TextEncoder, codec: Optional[LatentCodec] = None):
        self.model, self.text_encoder, self.codec = model, text_encoder, codec
        self._progress_bar_config: Dict[str, Any] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_path: PathLike = None,
        text_encoder_path: Union[PathLike, TextEncoder] = TEXT_ENCODER_REPO,
        vae_path: Union[PathLike, LatentCodec, None] = VAE_REPO,
        *,
        dtype: torch.dtype = torch.float32,
        device=None,
        revision: Optional[str] = None,
        text_encoder_revision: Optional[str] = None,
        vae_revision: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        token: Union[str, bool, None] = None,
        local_files_only: bool = False,
        **model_kwargs,
    ):
        """Load the model, the Llama text encoder and the DC-AE, each from a local path or a Hub
        repository (defaults: ``amd/Nitro-AR`` (variant ``gan``) or ``amd/Nitro-E``,
        ``meta-llama/Llama-3.2-1B``, ``mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers``).

        Args:
            model_path, text_encoder_path, vae_path: local file / folder or repository id. A loaded
                :class:`TextEncoder` / :class:`LatentCodec` is used as is (shared between
                pipelines). ``vae_path=None`` gives a pipeline that returns latents only.
            dtype, device: where every component lands.
            revision: of the model repository; ``text_encoder_revision``, ``vae_revision``: of theirs.
            cache_dir, token, local_files_only: as in huggingface_hub (``HF_HUB_OFFLINE=1`` honoured).
            model_kwargs: to the model's ``from_pretrained`` (``variant``, ``filename``, ``config``).
        Every component is located (and downloaded, only the files it needs) before any is
        loaded, so a wrong path fails at once, with one HubError / CheckpointError line.
        """
        hub = dict(cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        model_path = cls.default_repo if model_path is None else model_path
        file, saved = resolve_checkpoint(
            model_path, cls.model_class.config_class.model_type, model_kwargs.get("variant"),
            filename=model_kwargs.pop("filename", None), revision=revision, **hub,
        )
        model_source = file.parent if saved is not None else file
        if not isinstance(text_encoder_path, TextEncoder):
            text_encoder_path = resolve(text_encoder_path, files=TEXT_ENCODER_FILES, required=TEXT_ENCODER_REQUIRED,
                                        revision=text_encoder_revision, what="text encoder", **hub)
        if vae_path is not None and not isinstance(vae_path, LatentCodec):
            vae_path = resolve(vae_path, files=VAE_FILES, required=VAE_REQUIRED, revision=vae_revision, what="DC-AE", **hub)
        model = cls.model_class.from_pretrained(model_source, dtype=dtype, device=device, **model_kwargs)
        text_encoder = text_encoder_path
        if not isinstance(text_encoder, TextEncoder):
            text_encoder = TextEncoder.from_pretrained(text_encoder_path, dtype=dtype, device=device)
        codec = vae_path
        if vae_path is not None and not isinstance(vae_path, LatentCodec):
            codec = LatentCodec.from_pretrained(vae_path, dtype=dtype, device=device)
        return cls(model, text_encoder, codec)

    # -- diffusers-style helpers ---------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs) -> None:
        """Options of the progress bar over sampling steps (tqdm's: ``disable=True``, ``desc``, ``leave``, ...)."""
        self._progress_bar_config = dict(kwargs)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "_Pipeline":
        """Move (and cast) every component; returns the pipeline."""
        self.model.to(device=device, dtype=dtype)
        self.text_encoder.model.to(device=device, dtype=dtype)
        self.text_encoder._empty = None
        if self.codec is not None:
            self.codec.vae.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- one call ------------------------------------------------------------------------------
    def _embed(self, prompts: List[str], negative: Optional[List[str]], copies: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B * copies, L, C) prompt embeddings, each prompt's copies adjacent, and the matching
        unconditional embeddings: (1, L, C) for the empty prompt, else one row per image."""
        dtype, device = self.model.dtype, self.model.device
        text = self.text_encoder.encode(prompts).to(device, dtype).repeat_interleave(copies, dim=0)
        if negative is None:
            return text, self.text_encoder.empty_embedding().to(device, dtype)
        uncond = self.text_encoder.encode(negative).to(device, dtype)
        return text, uncond.expand(len(prompts), -1, -1).repeat_interleave(copies, dim=0)

    def _generators(self, generator: GeneratorArg, seed: Optional[int], count: int) -> Optional[List[torch.Generator]]:
        """None (one stream for the batch), or one generator per image."""
        if generator is not None and seed is not None:
            raise InvalidArgumentError("pass generator= or seed=, not both")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise invalid("seed", seed, "an integer")
            return [torch.Generator().manual_seed(int(seed))]
        if generator is None:
            return None
        if isinstance(generator, torch.Generator):
            return [generator]
        gens = list(generator) if isinstance(generator, (list, tuple)) else None
        if not gens or not all(isinstance(g, torch.Generator) for g in gens) or len(gens) not in (1, count):
            raise invalid("generator", generator, f"a torch.Generator or a list of {count} (one per image)")
        return gens

    def _total_steps(self, generate_kwargs: dict) -> int:
        raise NotImplementedError

    def _sample(self, text, uncond, gens: Optional[List[torch.Generator]], callback, generate_kwargs) -> torch.Tensor:
        raise NotImplementedError

    def _step_callback(self, bar, callback_on_step_end, callback) -> Callable[[int, torch.Tensor], None]:
        def on_step(step: int, latents: torch.Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(step, latents)
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, None, {"latents": latents})

        return on_step

    def _finish(self, latents: torch.Tensor, output_type: str) -> PipelineOutput:
        if output_type == "latent":
            return PipelineOutput(images=latents, latents=latents)
        images = self.codec.decode(latents)
        if output_type == "pt":
            return PipelineOutput(images=images, latents=latents)
        if output_type == "np":
            return PipelineOutput(images=images.permute(0, 2, 3, 1).cpu().numpy(), latents=latents)
        return PipelineOutput(images=LatentCodec.to_pil(images), latents=latents)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Union[str, Sequence[str], None] = None,
        *,
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
        seed: Optional[int] = None,
        output_type: str = "pil",
        callback_on_step_end: Optional[Callable] = None,
        callback: Optional[Callable[[int, torch.Tensor], None]] = None,
        return_dict: bool = True,
        **generate_kwargs,
    ):
        """Generate ``num_images_per_prompt`` images per prompt (images of a prompt adjacent).

        Args:
            prompt: a prompt or a list of prompts (longer than 128 tokens: truncated, warned).
            negative_prompt: guidance's unconditional prompt (one, or one per prompt); default the
                empty prompt, as the official sampler.
            num_images_per_prompt: images per prompt.
            generator: a ``torch.Generator`` (one stream for the batch, drawn in the documented
                order: same generator state, same images on any device), or a list of one per
                image (each image then depends on its own generator only, whatever the batch).
            seed: shorthand for ``generator=torch.Generator().manual_seed(seed)``.
            output_type: "pil", "pt", "np" or "latent" (no decoding).
            callback_on_step_end: diffusers-style ``fn(pipeline, step, None, {"latents": x})``
                after every AR step (Nitro-AR: x are the (B, 256, 32) tokens) or flow step
                (Nitro-E: x are the (B, 32, 16, 16) latents); its return value is not used.
            callback: the model-level ``callback(step, x)`` of ``generate`` (same x).
            return_dict: False returns ``(images,)``.
            generate_kwargs: to the model's ``generate`` under the official names (``cfg``,
                ``ar_steps``, ``head_steps``, DiSA options for Nitro-AR; ``steps`` for Nitro-E).
        Returns:
            :class:`PipelineOutput` (``images``, ``latents``).
        """
        from tqdm.auto import tqdm

        prompts = _as_prompts("prompt", prompt)
        negative = None if negative_prompt is None else _as_prompts("negative_prompt", negative_prompt)
        if negative is not None and len(negative) not in (1, len(prompts)):
            raise invalid("negative_prompt", negative_prompt, f"one prompt or {len(prompts)} (one per prompt)")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise invalid("num_images_per_prompt", num_images_per_prompt, "an integer >= 1")
        if output_type not in OUTPUT_TYPES:
            raise invalid("output_type", output_type, " | ".join(repr(t) for t in OUTPUT_TYPES))
        if output_type != "latent" and self.codec is None:
            raise InvalidArgumentError(f"output_type={output_type!r}: this pipeline has no VAE (vae_path=None); use output_type='latent'")
        count = len(prompts) * num_images_per_prompt
        gens = self._generators(generator, seed, count)
        text, uncond = self._embed(prompts, negative, num_images_per_prompt)
        per_image = gens is not None and len(gens) == count and count > 1
        total = self._total_steps(generate_kwargs) * (count if per_image and self.model_class is NitroAR else 1)
        with tqdm(total=total, unit="step", **{"desc": type(self).__name__, **self._progress_bar_config}) as bar:
            on_step = self._step_callback(bar, callback_on_step_end, callback)
            latents = self._sample(text, uncond, gens if per_image else (gens[0] if gens else None), on_step, generate_kwargs)
        out = self._finish(latents, output_type)
        return out if return_dict else (out.images,)


class NitroARPipeline(_Pipeline):
    """Nitro-AR text-to-image: ``pipe("a red fox", seed=0).images[0]``. Keyword arguments of a
    call go to :meth:`NitroAR.generate` (``ar_steps``, ``head_steps``, ``cfg``, DiSA options, ...).

    A list of generators (one per image) runs one image per ``generate`` call, because
    ``NitroAR.generate`` draws one random stream per batch; a single generator runs the whole
    batch at once."""

    model_class = NitroAR
    default_repo = "amd/Nitro-AR"
    per_image_generators_batched = False

    def _total_steps(self, generate_kwargs: dict) -> int:
        steps = generate_kwargs.get("ar_steps")
        return int(self.model.config.ar_steps if steps is None else steps)

    def _sample(self, text, uncond, gens, callback, generate_kwargs) -> torch.Tensor:
        if not isinstance(gens, list):
            return self.model.generate(text, uncond, generator=gens, callback=callback, **generate_kwargs)
        return torch.cat([
            self.model.generate(text[i:i + 1], uncond[i:i + 1] if uncond.shape[0] > 1 else uncond,
                                generator=g, callback=callback, **generate_kwargs)
            for i, g in enumerate(gens)
        ])


class NitroEPipeline(_Pipeline):
    """Nitro-E text-to-image (20 steps, CFG 4.5; the distilled checkpoint: ``steps=4, cfg=1``).

    A list of generators (one per image) draws each image's starting noise from its own
    generator; the batch still runs as one."""

    model_class = NitroE
    default_repo = "amd/Nitro-E"
    per_image_generators_batched = True

    def _total_steps(self, generate_kwargs: dict) -> int:
        steps = generate_kwargs.get("steps")
        return int(self.model.config.steps if steps is None else steps)

    def _sample(self, text, uncond, gens, callback, generate_kwargs) -> torch.Tensor:
        if isinstance(gens, list):
            if generate_kwargs.get("latents") is not None:
                raise InvalidArgumentError("pass latents= or a list of generators, not both")
            conf = self.model.config
            shape = (1, conf.in_channels, conf.grid_size, conf.grid_size)
            # The noise a batch-1 call with that generator would draw: same image as alone.
            generate_kwargs = dict(generate_kwargs, latents=torch.cat([torch.randn(shape, generator=g, device=g.device) for g in gens]))
            gens = None
        return self.model.generate(text, uncond, generator=gens, callback=callback, **generate_kwargs)
