"""Host-side launch planning shared by every kernel: config tables and the index width.

Torch-free and Triton-free, so launch plans can be built and tested from sizes and strides
alone (no allocation, no GPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["ConfigTable", "ConfigTables", "INDEX_32_LIMIT", "storage_span", "needs_int64"]

# Offsets stay int32 while every element a kernel addresses lies below this. The margin below
# 2^31 covers the masked lanes of a last, partial tile: they are computed (never dereferenced)
# and stay unwrapped too, so the arithmetic is exact on every lane.
INDEX_32_LIMIT = 2**31 - 2**24


def storage_span(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Elements from a view's first element to one past its last: ``1 + sum((n - 1) * |s|)``;
    0 for an empty view. Expanded (stride 0) dims add nothing."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(shape, strides))


def needs_int64(*spans: Optional[int]) -> bool:
    """Whether any span (elements a kernel addresses from one base pointer; None: absent) needs
    64-bit offsets. Products such as ``row * stride`` of a view never exceed its span."""
    return max((span for span in spans if span is not None), default=0) >= INDEX_32_LIMIT


@dataclass(frozen=True)
class ConfigTable:
    """Launch configs of one op: candidates to tune over per vendor, and untuned defaults.

    Attributes:
        cuda, hip: candidate configs (meta-parameters plus ``num_warps`` / ``num_stages`` and,
            in HIP lists only, HIP-only keys such as ``waves_per_eu``).
        interpreter: the one config of the CPU interpreter (vendor ``"cpu"``).
        defaults: (vendor, arch prefix, config) triples; the first matching entry wins.
        host_keys: keys the host launcher consumes; every other key is a Triton launch option.
    """

    cuda: Sequence[dict]
    hip: Sequence[dict]
    interpreter: dict
    defaults: Sequence[Tuple[str, str, dict]]
    host_keys: Tuple[str, ...] = field(default=())

    def candidates(self, vendor: str) -> List[dict]:
        """Fresh copies of the candidates of ``vendor`` ("cuda" | "hip" | "cpu")."""
        lists: Dict[str, Sequence[dict]] = {"cuda": self.cuda, "hip": self.hip, "cpu": [self.interpreter]}
        if vendor not in lists:
            raise ValueError(f"vendor={vendor!r} is not accepted: expected cuda, hip or cpu")
        return [dict(config) for config in lists[vendor]]

    def default(self, vendor: str, arch: str) -> dict:
        """The untuned config on (vendor, arch); the interpreter's on ``"cpu"``."""
        if vendor == "cpu":
            return dict(self.interpreter)
        for entry_vendor, arch_prefix, config in self.defaults:
            if entry_vendor == vendor and arch.startswith(arch_prefix):
                return dict(config)
        raise ValueError(f"vendor={vendor!r} is not accepted: expected cuda, hip or cpu")

    def launch_options(self, config: dict) -> dict:
        """The Triton launch options of ``config`` (everything but the host keys)."""
        return {key: value for key, value in config.items() if key not in self.host_keys}


@dataclass(frozen=True)
class ConfigTables:
    """The :class:`ConfigTable` of each tunable op of a kernel module, by op name: what the
    tuner's registry asks a module for (``candidate_configs``, ``default_config``)."""

    tables: Dict[str, ConfigTable]

    def _table(self, op_name: str) -> ConfigTable:
        if op_name not in self.tables:
            raise ValueError(f"unknown op {op_name!r}: expected one of {', '.join(self.tables)}")
        return self.tables[op_name]

    def candidate_configs(self, op_name: str, vendor: str) -> List[dict]:
        """Fresh copies of the configs to tune ``op_name`` over on ``vendor`` ("cuda" | "hip" | "cpu")."""
        return self._table(op_name).candidates(vendor)

    def default_config(self, op_name: str, vendor: str, arch: str) -> dict:
        """The untuned config of ``op_name`` on (vendor, arch)."""
        return self._table(op_name).default(vendor, arch)
