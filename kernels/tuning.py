"""Persisted launch-config tuning shared by every kernel.

Each kernel module describes its tunable launches as :class:`TunableOp` objects and registers
them at import. At run time a launcher asks :func:`get_config` for the config of its shape
bucket on its device: the tuned winner when one was recorded, else the op's default for the
device's architecture. Nothing is ever benchmarked on the hot path; tuning happens only through
:func:`run_autotune` (the ``nitro-ar autotune`` command, :func:`main`).

Tuned configs are JSON files, one per device and Triton version, e.g.
``NVIDIA_H100_80GB_HBM3__triton-3.9.0.json``::

    {"device": "NVIDIA H100 80GB HBM3", "arch": "sm_90", "triton": "3.9.0",
     "ops": {"modulated_norm": {"d1024_r512": {"config": {...}, "ms": 0.0123}}}}

They are looked up first in the user cache (:func:`cache_dir`: ``$NITRO_AR_TUNING_DIR`` or
``~/.cache/nitro_ar/tuning``), then in the files shipped with the package
(``nitro_ar/kernels/configs/``). Writes merge with the file's current content under a lock file
and replace it atomically (:mod:`nitro_ar.kernels.atomic_files`: fsync-ed, umask-respecting),
so several processes (one per GPU) can tune at once. Files are strict JSON: a non-finite
timing is never written. A malformed entry (or file) is ignored with one warning and the op's
default is used; it never stops a launch.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from nitro_ar.errors import TuningCacheError

from .atomic_files import atomic_path
from .backend import DeviceInfo, device_info, validate_config

try:
    import fcntl
except ImportError:  # not POSIX: merging by re-reading just before the replace still narrows races
    fcntl = None

__all__ = [
    "KERNEL_MODULES",
    "SHAPE_SETS",
    "TunableOp",
    "register",
    "register_kernel_ops",
    "registered_ops",
    "get_config",
    "cache_dir",
    "tuning_file_name",
    "store_configs",
    "clear_cache",
    "run_autotune",
    "main",
]

logger = logging.getLogger("nitro_ar")

ENV_TUNING_DIR = "NITRO_AR_TUNING_DIR"
SHAPE_SETS = ("nitro-ar", "nitro-e")
# Modules whose import registers tunable ops; one failing to import leaves the others usable
# (tuning_problems registers each kernel module's ops that import).
KERNEL_MODULES = ["nitro_ar.kernels.tuning_problems"]
PACKAGED_DIR = Path(__file__).resolve().parent / "configs"
GPU_REQUIRED = "autotuning needs a CUDA or ROCm GPU (it times kernels on the device it tunes for)"


@dataclass
class TunableOp:
    """One tunable kernel launch.

    Attributes:
        name: unique op name, the key in tuned-config files.
        configs: vendor (``"cuda"`` | ``"hip"`` | ``"cpu"``) -> candidate configs, each a dict of
            meta-parameters plus ``num_warps`` / ``num_stages`` and, for HIP, the HIP-only keys.
        default: (vendor, arch) -> the config used when nothing was tuned.
        shapes: shape set (``"nitro-ar"`` | ``"nitro-e"``) -> problem shapes to tune on.
        bucket: shape -> bucket key; shapes in one bucket share a config.
        bench: (shape, config, device) -> milliseconds per launch.
    """

    name: str
    configs: Callable[[str], List[dict]]
    default: Callable[[str, str], dict]
    shapes: Callable[[str], List[dict]]
    bucket: Callable[[dict], str]
    bench: Callable[[dict, dict, torch.device], float]


_REGISTRY: Dict[str, TunableOp] = {}
_failed_imports: set = set()
# Parsed tuning files by path: {op name: {bucket: {"config": dict, "ms": float}}}.
_tables: Dict[str, dict] = {}
# Resolved configs by (op name, device, bucket): launchers ask on every call.
_resolved: Dict[tuple, dict] = {}
_warned: set = set()


def register(op: TunableOp) -> TunableOp:
    """Add ``op`` to the registry (a re-imported module replaces its earlier registration)."""
    _REGISTRY[op.name] = op
    return op


def register_kernel_ops(benches: Dict[str, Callable], candidate_configs: Callable, default_config: Callable,
                        shapes: Callable, bucket: Callable) -> None:
    """Register one TunableOp per (op name -> bench function) of a kernel module whose config
    functions take the op name first: ``candidate_configs(name, vendor)``,
    ``default_config(name, vendor, arch)``."""
    for name, bench in benches.items():
        register(TunableOp(
            name=name,
            configs=functools.partial(candidate_configs, name),
            default=functools.partial(default_config, name),
            shapes=shapes,
            bucket=bucket,
            bench=bench,
        ))


def registered_ops() -> Dict[str, TunableOp]:
    """Every registered op by name, after importing the :data:`KERNEL_MODULES` that import."""
    for module in KERNEL_MODULES:
        try:
            importlib.import_module(module)
        except Exception as err:  # a broken or missing kernel module must not hide the others
            if module not in _failed_imports:
                _failed_imports.add(module)
                logger.warning("nitro_ar: kernel module %s did not import (%s); its ops are not tunable", module, err)
    return dict(_REGISTRY)


def cache_dir() -> Path:
    """The user tuning cache: ``$NITRO_AR_TUNING_DIR`` or ``~/.cache/nitro_ar/tuning``."""
    override = os.environ.get(ENV_TUNING_DIR, "").strip()
    return Path(override).expanduser() if override else Path.home() / ".cache" / "nitro_ar" / "tuning"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def tuning_file_name(info: DeviceInfo) -> str:
    """``<device key>__triton-<version>.json``: configs tuned on one device with one Triton."""
    return f"{info.key}__triton-{_triton_version()}.json"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _entry_problem(entry) -> Optional[str]:
    """Why a tuning-file entry ``{"config": {name: int}, "ms": float}`` is unusable, or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        return "expected an object with a 'config' object"
    config = entry["config"]
    bad = [k for k, v in config.items() if not isinstance(v, numbers.Integral) or isinstance(v, bool)]
    if bad:
        return f"config values must be integers: {', '.join(f'{k}={config[k]!r}' for k in bad)}"
    ms = entry.get("ms")
    if ms is not None and (isinstance(ms, bool) or not isinstance(ms, numbers.Real) or not math.isfinite(ms) or ms < 0):
        return f"'ms' must be a finite number >= 0, got {ms!r}"
    return None


def _parse_table(path: Path) -> dict:
    """The ``ops`` mapping of one tuning file; raises OSError/ValueError when unusable."""
    document = json.loads(path.read_text(encoding="utf-8"))
    ops = document.get("ops") if isinstance(document, dict) else None
    if not isinstance(ops, dict) or not all(isinstance(buckets, dict) for buckets in ops.values()):
        raise ValueError("expected an object with an 'ops' mapping of op name -> bucket -> entry")
    return ops


def _load_table(path: Path, required: bool) -> dict:
    """Parsed table of ``path`` (memoised); missing or corrupt files give {} with one warning.

    A missing packaged file is normal (nothing shipped for that device) and stays silent.
    """
    key = str(path)
    if key not in _tables:
        try:
            _tables[key] = _parse_table(path)
        except FileNotFoundError:
            if required:
                _warn_once(key, f"nitro_ar: no tuned kernel configs at {path}; using defaults "
                                "(run `nitro-ar autotune`)")
            _tables[key] = {}
        except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            _warn_once(key, f"nitro_ar: ignoring unreadable tuned-config file {path} ({err}); using defaults")
            _tables[key] = {}
    return _tables[key]


def clear_cache() -> None:
    """Forget parsed tuning files, resolved configs and issued warnings (files are re-read at next use)."""
    _tables.clear()
    _resolved.clear()
    _warned.clear()


def _as_device_info(device: Union[torch.device, str, DeviceInfo]) -> DeviceInfo:
    return device if isinstance(device, DeviceInfo) else device_info(torch.device(device))


def get_config(op_name: str, device: Union[torch.device, str, DeviceInfo], bucket: str) -> dict:
    """The launch config of ``op_name`` for one shape bucket on ``device`` (a fresh dict).

    Order: the user cache, then the packaged files, then ``op.default(vendor, arch)``. CPU
    devices (the Triton interpreter) always get the op's ``"cpu"`` default. A tuned entry that
    is not valid for the device's vendor is ignored with a warning.
    """
    info = _as_device_info(device)
    key = (op_name, info, bucket)
    if key not in _resolved:
        _resolved[key] = _resolve(op_name, info, bucket)
    return dict(_resolved[key])


def _resolve(op_name: str, info: DeviceInfo, bucket: str) -> dict:
    op = _REGISTRY.get(op_name) or registered_ops().get(op_name)
    if op is None:
        raise KeyError(f"no tunable op named {op_name!r}; registered: {sorted(_REGISTRY)}")
    if info.vendor != "cpu":
        name = tuning_file_name(info)
        packaged_path = PACKAGED_DIR / name
        # The user cache only warns about being absent when nothing is shipped either.
        packaged = _load_table(packaged_path, required=False)
        user_path = cache_dir() / name
        for path, table in ((user_path, _load_table(user_path, required=not packaged)), (packaged_path, packaged)):
            entry = table.get(op_name, {}).get(bucket)
            if entry is None:
                continue
            problem = _entry_problem(entry)
            if problem is not None:
                _warn_once(f"{path}:{op_name}:{bucket}",
                           f"nitro_ar: ignoring malformed tuned entry of {op_name} [{bucket}] in {path}: {problem}")
                continue
            config = entry["config"]
            try:
                validate_config(config, info.vendor)
            except ValueError as err:
                _warn_once(f"{path}:{op_name}:{bucket}",
                           f"nitro_ar: ignoring tuned config of {op_name} [{bucket}] in {path}: {err}")
                continue
            return config
    return op.default(info.vendor, info.arch)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (POSIX); a no-op where unsupported."""
    with open(lock_path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def store_configs(info: DeviceInfo, winners: Dict[str, Dict[str, dict]], directory: Optional[Path] = None) -> Path:
    """Merge tuned winners into the device's tuning file, atomically.

    Args:
        info: the device the configs were measured on.
        winners: {op name: {bucket: {"config": dict, "ms": float}}}.
        directory: target folder (default :func:`cache_dir`).
    Returns:
        The path written. An existing unreadable file is replaced, and its malformed entries
        are dropped (with a warning).
    Raises:
        TuningCacheError: a winner is malformed (e.g. a NaN timing); nothing is written.
    """
    for op_name, buckets in winners.items():
        if not isinstance(buckets, dict):
            raise TuningCacheError(f"tuned entries of {op_name} cannot be stored: expected {{bucket: entry}}, got {buckets!r}")
        for bucket, entry in buckets.items():
            problem = _entry_problem(entry)
            if problem is not None:
                raise TuningCacheError(f"tuned entry of {op_name} [{bucket}] cannot be stored: {problem}")
    directory = Path(directory) if directory is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / tuning_file_name(info)
    with _locked(directory / (path.name + ".lock")):
        try:
            ops = _parse_table(path)
        except FileNotFoundError:
            ops = {}
        except (OSError, ValueError) as err:
            warnings.warn(f"nitro_ar: replacing unreadable tuned-config file {path} ({err})", stacklevel=2)
            ops = {}
        dropped = []
        for op_name, buckets in ops.items():
            for bucket in [b for b, entry in buckets.items() if _entry_problem(entry)]:
                del buckets[bucket]
                dropped.append(f"{op_name} [{bucket}]")
        if dropped:
            warnings.warn(f"nitro_ar: dropping malformed entries of {path}: {', '.join(dropped)}", stacklevel=2)
        for op_name, buckets in winners.items():
            ops.setdefault(op_name, {}).update(buckets)
        document = {"device": info.name, "arch": info.arch, "triton": _triton_version(), "ops": ops}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(document, indent=1, sort_keys=True, allow_nan=False), encoding="utf-8")
    _tables.pop(str(path), None)
    _resolved.clear()
    return path


def _shape_sets(shapes: str) -> Sequence[str]:
    if shapes == "all":
        return SHAPE_SETS
    if shapes not in SHAPE_SETS:
        raise ValueError(f"unknown shape set {shapes!r}; expected one of {', '.join(SHAPE_SETS)} or all")
    return (shapes,)


def _tune(op: TunableOp, info: DeviceInfo, sets: Sequence[str], device: torch.device) -> Dict[str, dict]:
    """Winners of one op, {bucket: {"config", "ms"}}; a bucket's time is the mean over its shapes."""
    candidates = op.configs(info.vendor)
    for config in candidates:
        validate_config(config, info.vendor)
    by_bucket: Dict[str, List[dict]] = {}
    for shape_set in sets:
        for shape in op.shapes(shape_set):
            bucket_shapes = by_bucket.setdefault(op.bucket(shape), [])
            if shape not in bucket_shapes:
                bucket_shapes.append(shape)
    winners = {}
    for bucket, bucket_shapes in by_bucket.items():
        timings = []
        for config in candidates:
            try:
                total_ms = sum(op.bench(shape, config, device) for shape in bucket_shapes)
            except Exception as err:  # a config that does not compile or fit this shape is out
                logger.info("nitro_ar: %s [%s] %s failed: %s", op.name, bucket, config, err)
                continue
            if not math.isfinite(total_ms) or total_ms < 0:  # a broken timing must not win (nor reach the file)
                logger.info("nitro_ar: %s [%s] %s timed %s ms; left out", op.name, bucket, config, total_ms)
                continue
            timings.append((total_ms / len(bucket_shapes), config))
        if not timings:
            warnings.warn(f"nitro_ar: no config of {op.name} ran for bucket {bucket}; keeping the default")
            continue
        best_ms, best = min(timings, key=lambda timing: timing[0])
        winners[bucket] = {"config": dict(best), "ms": best_ms}
        logger.info("nitro_ar: %s [%s] -> %s (%.4f ms)", op.name, bucket, best, best_ms)
    return winners


def run_autotune(ops: Optional[List[str]], shapes: str, device: Union[torch.device, str, None] = None) -> dict:
    """Benchmark every candidate config of ``ops`` on ``device`` and record the winners.

    Args:
        ops: op names to tune (default: every registered op).
        shapes: ``"nitro-ar"``, ``"nitro-e"`` or ``"all"``.
        device: the GPU to tune on (default: the current CUDA/ROCm device).
    Returns:
        {op name: {bucket: {"config": dict, "ms": float}}}, also merged into the tuning file.
    Raises:
        RuntimeError: no CUDA or ROCm GPU (nothing is written).
        ValueError: unknown op or shape set.
    """
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"{GPU_REQUIRED}; none is available here (device {device}, "
                           f"torch.cuda.is_available() = {torch.cuda.is_available()})")
    sets = _shape_sets(shapes)
    available = registered_ops()
    names = list(ops) if ops else sorted(available)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; registered: {sorted(available)}")
    info = device_info(device)
    # Time on the requested GPU (cuda:N), whatever the current device is.
    on_device = torch.cuda.device(device.index) if device.index is not None else contextlib.nullcontext()
    with on_device:
        results = {name: _tune(available[name], info, sets, device) for name in names}
    results = {name: buckets for name, buckets in results.items() if buckets}
    if results:
        store_configs(info, results)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """``nitro-ar autotune [--ops NAME ...] [--shapes nitro-ar|nitro-e|all] [--device cuda:N]``.

    Returns the process exit code: 0 on success, 2 when tuning cannot run (no GPU, bad names).
    """
    parser = argparse.ArgumentParser(
        prog="nitro-ar autotune",
        description="Benchmark kernel launch configs on this GPU and cache the fastest per shape bucket.")
    parser.add_argument("--ops", nargs="+", metavar="NAME", help="ops to tune (default: all registered)")
    parser.add_argument("--shapes", choices=[*SHAPE_SETS, "all"], default="all", help="model shapes to tune on")
    parser.add_argument("--device", default="cuda", help="GPU to tune on (default: the current one)")
    args = parser.parse_args(argv)
    try:
        results = run_autotune(args.ops, args.shapes, args.device)
    except (RuntimeError, ValueError) as err:
        print(f"nitro-ar: error: autotune: {err}", file=sys.stderr)
        return 2
    for name, buckets in sorted(results.items()):
        for bucket, entry in sorted(buckets.items()):
            print(f"{name:32s} {bucket:24s} {entry['ms']:.4f} ms  {entry['config']}")
    if results:
        print(f"written to {cache_dir() / tuning_file_name(device_info(torch.device(args.device)))}")
    return 0
