"""Model configurations. Defaults are the released full-size checkpoints."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

VARIANTS = ("gan", "joint_gan")
QK_NORMS = (None, "rms_norm")

# Nitro-E's Alternating Subregion Attention: (groups s, group length n) for block i is
# PATTERN[i % 3]; (1, 1) is full joint attention.
NITRO_E_ASA = ((1, 1), (4, 1), (4, 4))
NO_ASA = ((1, 1),)


def _asa_tuple(pattern) -> Tuple[Tuple[int, int], ...]:
    out = tuple((int(s), int(n)) for s, n in pattern)
    if not out or any(s < 1 or n < 1 for s, n in out):
        raise ValueError(f"ASA pattern must be a non-empty list of (s >= 1, n >= 1) pairs, got {pattern!r}")
    return out


@dataclass
class _BackboneConfig:
    """Fields shared by the E-MMDiT backbone of Nitro-AR and Nitro-E."""

    sample_size: int = 16  # latent side (512 px / DC-AE f32)
    patch_size: int = 1
    in_channels: int = 32
    out_channels: int = 32
    num_attention_heads: int = 24
    attention_head_dim: int = 32
    caption_channels: int = 2048  # Llama-3.2-1B hidden size
    caption_projection_dim: int = 768
    pos_embed_max_size: int = 96
    qk_norm: Optional[str] = "rms_norm"
    block_groups: Tuple[int, int, int] = (4, 16, 4)
    text_max_length: int = 128

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def grid_size(self) -> int:
        """Tokens per row of the latent grid (the official models tokenise with patch size 1)."""
        return self.sample_size

    @property
    def pos_base_size(self) -> int:
        """``base_size`` of the position table; the official code divides by ``patch_size``."""
        return self.sample_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def interpolation_scale(self) -> int:
        return max(self.sample_size // 16, 1)

    def position_table(self, *, full: bool = False, device=None):
        """The 2-D sin-cos position table of this backbone: (1, grid^2, D) float32, or the whole
        (1, max_size^2, D) table with ``full`` (Nitro-E stores it)."""
        from .layers import sincos_pos_table

        return sincos_pos_table(
            self.inner_dim,
            self.grid_size,
            max_size=self.pos_embed_max_size,
            base_size=self.pos_base_size,
            interpolation_scale=self.interpolation_scale,
            full=full,
            device=device,
        )

    def asa_for_block(self, index: int) -> Tuple[int, int]:
        pattern = self.asa_pattern  # type: ignore[attr-defined]
        return pattern[index % len(pattern)]

    def _validate_backbone(self) -> None:
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({self.inner_dim})"
            )
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.grid_size % 4:
            raise ValueError(f"token compression needs a grid divisible by 4, got {self.grid_size}")
        if len(self.block_groups) != 3 or min(self.block_groups) < 1:
            raise ValueError(f"block_groups must be three positive block counts, got {self.block_groups}")
        if self.inner_dim % 4:
            raise ValueError(f"inner width {self.inner_dim} must be divisible by 4 (position table)")
        self.asa_pattern = _asa_tuple(self.asa_pattern)  # type: ignore[attr-defined]
        self.block_groups = tuple(int(b) for b in self.block_groups)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = type(self).model_type  # type: ignore[attr-defined]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)  # type: ignore[attr-defined]
        if model_type != cls.model_type:  # type: ignore[attr-defined]
            raise ValueError(f"config is for model_type {model_type!r}, not {cls.model_type!r}")  # type: ignore[attr-defined]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        if "block_groups" in data:
            data["block_groups"] = tuple(data["block_groups"])
        if "asa_pattern" in data:
            data["asa_pattern"] = _asa_tuple(data["asa_pattern"])
        return cls(**data)


# Official constructor arguments that only matter to official training (or to modules the
# released checkpoints do not have); from_official_kwargs accepts and ignores them.
_OFFICIAL_TRAINING_ONLY = {
    "repa_depth", "projector_dim", "z_dims", "diffusion_batch_mul", "mask_ratio_min",
    "ratio_sampling_method", "interpolation_scale", "dual_attention_layers", "num_layers",
    "global_token_type", "use_ncl", "global_token_dependency",
}


@dataclass
class NitroARConfig(_BackboneConfig):
    """Nitro-AR: E-MMDiT backbone (no timestep) + a flow-matching head per token.

    ``variant`` "gan": LayerNorm backbone, MLP head (``diffloss_d`` residual blocks of width
    ``diffloss_w``). "joint_gan": RMSNorm backbone, transformer head (``diffloss_w // 64`` heads)
    plus the global-token path (``global_head``: a separate head for the global token).
    """

    model_type = "nitro_ar"

    variant: str = "gan"
    diffloss_d: int = 8
    diffloss_w: int = 768
    num_sampling_steps: int = 1000  # flow-matching training timesteps of the head
    shift: float = 1.0
    global_head: bool = True  # joint_gan: separate head for the global token
    asa_pattern: Tuple[Tuple[int, int], ...] = NO_ASA
    # Default sampling of the released checkpoints.
    ar_steps: int = 20
    head_steps: int = 3
    cfg: float = 4.0
    scaling_factor: float = 0.41407
    # TensorAR-style refinement (nitro_ar.tensorar): window k; k > 1 adds the zero-initialised
    # ``age_embed`` (k - 1 rows) to the backbone input and is generate's default window.
    refine_window: int = 1

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if isinstance(self.refine_window, bool) or not isinstance(self.refine_window, int) or self.refine_window < 1:
            raise ValueError(f"refine_window must be an integer >= 1, got {self.refine_window!r}")
        if self.variant == "gan":
            self.global_head = False  # only the joint variant has a global-token path
        if self.variant == "joint_gan" and self.diffloss_w % 64:
            raise ValueError(f"the transformer head uses heads of 64 channels; diffloss_w={self.diffloss_w}")
        self._validate_backbone()

    @property
    def norm_type(self) -> str:
        """Backbone norms: LayerNorm for ``gan``, RMSNorm for ``joint_gan``."""
        return "layer" if self.variant == "gan" else "rms"

    @classmethod
    def for_variant(cls, variant: str, **overrides) -> "NitroARConfig":
        """The released configuration of ``variant`` ("gan" or "joint_gan"), with overrides."""
        defaults = {"gan": dict(head_steps=3, ar_steps=20), "joint_gan": dict(head_steps=6, ar_steps=1)}
        if variant not in defaults:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        return cls(variant=variant, **{**defaults[variant], **overrides})

    @classmethod
    def from_official_kwargs(cls, kwargs: Dict[str, Any], variant: str) -> "NitroARConfig":
        """Build from the official ``MMDiTTransformer2DModel`` constructor arguments.

        Args:
            kwargs: e.g. ``num_attention_heads``, ``attention_head_dim``, ``caption_projection_dim``,
                ``caption_channels``, ``in_channels``, ``out_channels``, ``sample_size``,
                ``patch_size``, ``qk_norm``, ``diffloss_d``, ``diffloss_w``,
                ``num_sampling_steps``, ``shift``, ``global_head``, ``pos_embed_max_size``.
                Training-only arguments are ignored; unknown ones raise ValueError.
            variant: "gan" or "joint_gan".
        """
        kwargs = dict(kwargs)
        mapped: Dict[str, Any] = {}
        direct = [
            "sample_size", "patch_size", "in_channels", "out_channels", "num_attention_heads",
            "attention_head_dim", "caption_channels", "caption_projection_dim", "pos_embed_max_size",
            "qk_norm", "diffloss_d", "diffloss_w", "num_sampling_steps", "shift",
        ]
        for name in direct:
            if name in kwargs:
                mapped[name] = kwargs.pop(name)
        if "global_head" in kwargs:
            mapped["global_head"] = kwargs.pop("global_head") not in (None, "none", False)
        if "out_channels" in mapped and mapped["out_channels"] is None:
            mapped["out_channels"] = mapped.get("in_channels", 32)
        for name in _OFFICIAL_TRAINING_ONLY:
            kwargs.pop(name, None)
        if kwargs:
            raise ValueError(f"unknown official Nitro-AR constructor arguments: {sorted(kwargs)}")
        # Arguments left out take the official constructor's defaults, as the official code would.
        mapped.setdefault("caption_channels", 4096)
        mapped.setdefault("diffloss_d", 3)
        mapped.setdefault("diffloss_w", 1024)
        mapped.setdefault("sample_size", 128)
        mapped.setdefault("patch_size", 2)
        mapped.setdefault("in_channels", 16)
        mapped.setdefault("out_channels", mapped["in_channels"])
        mapped.setdefault("qk_norm", None)
        if variant == "joint_gan":
            mapped.setdefault("global_head", False)
        return cls.for_variant(variant, **mapped)


@dataclass
class NitroEConfig(_BackboneConfig):
    """Nitro-E: E-MMDiT diffusion transformer with AdaLN-affine and ASA, predicting velocity."""

    model_type = "nitro_e"

    asa_pattern: Tuple[Tuple[int, int], ...] = NITRO_E_ASA
    num_train_timesteps: int = 1000
    shift: float = 1.0
    steps: int = 20
    cfg: float = 4.5
    scaling_factor: float = 0.41407

    def __post_init__(self) -> None:
        if self.patch_size != 1:
            raise ValueError("Nitro-E's token compression and position reinforcement need patch_size 1")
        self._validate_backbone()

    @classmethod
    def from_official_kwargs(cls, kwargs: Dict[str, Any]) -> "NitroEConfig":
        """Build from the official ``EMMDiTTransformer`` constructor arguments.

        ``use_sub_attn`` (default True) selects the ASA pattern; training-only arguments
        (``repa_depth``, ``projector_dim``, ``z_dims``, ``interpolation_scale``) are ignored.
        """
        kwargs = dict(kwargs)
        use_sub_attn = kwargs.pop("use_sub_attn", True)
        for name in ("repa_depth", "projector_dim", "z_dims", "interpolation_scale", "num_layers"):
            kwargs.pop(name, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown official Nitro-E constructor arguments: {unknown}")
        kwargs["asa_pattern"] = NITRO_E_ASA if use_sub_attn else NO_ASA
        return cls(**kwargs)
