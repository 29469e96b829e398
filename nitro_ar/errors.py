"""The one exception family of nitro-ar.

Every error the package raises for bad input derives from :class:`NitroARError`, and from the
built-in class a caller would already catch (``ValueError`` for a bad value, ``FileNotFoundError``
for a missing file), so ``except ValueError`` keeps working. Messages name the argument, the
value received and what would be accepted; the CLI prints them as one line.
"""
from __future__ import annotations

from typing import Any

# The kernels (torch and triton only) raise their own ValueError subclass; re-exported here.
from .kernels.errors import KernelInputError

__all__ = [
    "NitroARError",
    "InvalidArgumentError",
    "ConfigError",
    "CheckpointError",
    "DatasetError",
    "TuningCacheError",
    "HubError",
    "TrainingError",
    "KernelInputError",
    "invalid",
]


class NitroARError(Exception):
    """Base class of every error nitro-ar raises on purpose."""


class InvalidArgumentError(NitroARError, ValueError):
    """An argument of a public function or the command line that cannot be used."""


class ConfigError(NitroARError, ValueError):
    """A model or training configuration that cannot run; the message says which setting and why."""


class CheckpointError(NitroARError, ValueError):
    """A checkpoint that cannot be loaded into the requested model; the message says why."""


class DatasetError(NitroARError, ValueError):
    """A training dataset that cannot be read; the message names the file."""


class TuningCacheError(NitroARError, ValueError):
    """A tuning-cache file or entry that cannot be used."""


class HubError(NitroARError, OSError):
    """A model or encoder that cannot be fetched from (or found in the cache of) the Hugging Face Hub."""


class TrainingError(NitroARError, RuntimeError):
    """A training run that cannot go on (e.g. too many steps in a row with a non-finite loss)."""


def invalid(name: str, value: Any, accepted: str, cls: type = InvalidArgumentError) -> NitroARError:
    """The error for argument ``name`` holding ``value`` where ``accepted`` was expected.

    Usage: ``raise invalid("cfg", cfg, "a finite number")``.
    """
    return cls(f"{name}={value!r} is not accepted: expected {accepted}")
