"""Model configurations. Defaults are the released full-size checkpoints."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import ConfigError, invalid

VARIANTS = ("gan", "joint_gan")
QK_NORMS = (None, "rms_norm")

# Nitro-E's Alternating Subregion Attention: (groups s, group length n) for block i is
# PATTERN[i % 3]; (1, 1) is full joint attention.
NITRO_E_ASA = ((1, 1), (4, 1), (4, 4))
NO_ASA = ((1, 1),)


# Float fields that must also be > 0 (shift 0 makes every timestep 0: NaN images).
_POSITIVE_FLOATS = ("shift", "scaling_factor")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _asa_tuple(pattern) -> Tuple[Tuple[int, int], ...]:
    accepted = "a non-empty list of [s, n] pairs of integers >= 1"
    try:
        pairs = [tuple(pair) for pair in pattern]
    except TypeError:
        raise invalid("asa_pattern", pattern, accepted, ConfigError) from None
    if not pairs or any(len(pair) != 2 or not all(_is_int(v) and v >= 1 for v in pair) for pair in pairs):
        raise invalid("asa_pattern", pattern, accepted, ConfigError)
    return tuple((int(s), int(n)) for s, n in pairs)


def _check_fields(config) -> None:
    """Raise ConfigError naming the first field whose value has the wrong type or range: every
    ``int`` field is an integer >= 1, every ``float`` a finite number (``shift`` and
    ``scaling_factor`` > 0), every ``bool`` a bool."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "int" and not (_is_int(value) and value >= 1):
            raise invalid(f.name, value, "an integer >= 1", ConfigError)
        if f.type == "float":
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if f.name in _POSITIVE_FLOATS and not (ok and value > 0):
                raise invalid(f.name, value, "a finite number > 0", ConfigError)
            if not ok:
                raise invalid(f.name, value, "a finite number", ConfigError)
        if f.type == "bool" and not isinstance(value, bool):
            raise invalid(f.name, value, "true or false", ConfigError)


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
        _check_fields(self)
        groups = self.block_groups
        if (isinstance(groups, (str, bytes)) or not isinstance(groups, (list, tuple)) or len(groups) != 3
                or not all(_is_int(b) and b >= 1 for b in groups)):
            raise invalid("block_groups", groups, "three integers >= 1 (blocks per group)", ConfigError)
        if self.caption_projection_dim != self.inner_dim:
            raise ConfigError(
                f"caption_projection_dim={self.caption_projection_dim} is not accepted: it must equal "
                f"num_attention_heads * attention_head_dim ({self.inner_dim})"
            )
        if self.qk_norm not in QK_NORMS:
            raise invalid("qk_norm", self.qk_norm, f"one of {QK_NORMS}", ConfigError)
        if self.grid_size % 4:
            raise invalid("sample_size", self.sample_size, "a multiple of 4 (token compression)", ConfigError)
        if self.pos_embed_max_size < self.grid_size:
            raise invalid("pos_embed_max_size", self.pos_embed_max_size,
                          f"at least the latent grid side sample_size={self.sample_size}", ConfigError)
        if self.inner_dim % 4:
            raise ConfigError(f"inner width num_attention_heads * attention_head_dim = {self.inner_dim} is not "
                              "accepted: it must be divisible by 4 (position table)")
        self.asa_pattern = _asa_tuple(self.asa_pattern)  # type: ignore[attr-defined]
        self.block_groups = tuple(int(b) for b in groups)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = type(self).model_type  # type: ignore[attr-defined]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The config of a ``to_dict`` / ``config.json`` mapping. Raises ConfigError naming the
        first unknown key or the first field of the wrong type or range."""
        if not isinstance(data, Mapping):
            raise invalid("config", data, f"a mapping of {cls.__name__} fields", ConfigError)
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)  # type: ignore[attr-defined]
        if model_type != cls.model_type:  # type: ignore[attr-defined]
            raise invalid("model_type", model_type, repr(cls.model_type), ConfigError)  # type: ignore[attr-defined]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, data)) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields: {unknown}; accepted: {sorted(names)}")
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
    shortcut: bool = False  # FAR shortcut head(s): a zero-initialised step-size embedding (nitro_ar.shortcut)
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
            raise invalid("variant", self.variant, f"one of {VARIANTS}", ConfigError)
        if isinstance(self.refine_window, bool) or not isinstance(self.refine_window, int) or self.refine_window < 1:
            raise invalid("refine_window", self.refine_window, "an integer >= 1", ConfigError)
        self._validate_backbone()
        if self.variant == "gan":
            self.global_head = False  # only the joint variant has a global-token path
        if not isinstance(self.shortcut, bool):
            raise invalid("shortcut", self.shortcut, "True or False", ConfigError)
        if self.variant == "joint_gan" and self.diffloss_w % 64:
            raise invalid("diffloss_w", self.diffloss_w, "a multiple of 64 (the transformer head's 64-channel heads)",
                          ConfigError)

    @property
    def norm_type(self) -> str:
        """Backbone norms: LayerNorm for ``gan``, RMSNorm for ``joint_gan``."""
        return "layer" if self.variant == "gan" else "rms"

    @classmethod
    def for_variant(cls, variant: str, **overrides) -> "NitroARConfig":
        """The released configuration of ``variant`` ("gan" or "joint_gan"), with overrides."""
        defaults = {"gan": dict(head_steps=3, ar_steps=20), "joint_gan": dict(head_steps=6, ar_steps=1)}
        if variant not in defaults:
            raise invalid("variant", variant, f"one of {VARIANTS}", ConfigError)
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
            raise ConfigError(f"unknown official Nitro-AR constructor arguments: {sorted(kwargs)}")
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
        self._validate_backbone()
        if self.patch_size != 1:
            raise invalid("patch_size", self.patch_size, "1 (Nitro-E's token compression and position "
                          "reinforcement)", ConfigError)

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
            raise ConfigError(f"unknown official Nitro-E constructor arguments: {unknown}")
        kwargs["asa_pattern"] = NITRO_E_ASA if use_sub_attn else NO_ASA
        return cls(**kwargs)
