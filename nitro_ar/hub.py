"""Local path or Hugging Face Hub repository -> a local file or folder, fetching only what is needed.

Every loader of the package (models, text encoder, DC-AE, pipelines) goes through :func:`resolve`:

- an existing local file or folder is used as it is (nothing is contacted);
- otherwise an ``org/name`` string is a Hub repository: ``huggingface_hub.snapshot_download``
  fetches the files matching ``files`` (``allow_patterns``) at ``revision`` into the Hub cache
  (``cache_dir``, else ``HF_HUB_CACHE``) and returns the snapshot folder. With
  ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` only the cache is read.

Whatever goes wrong (gated or private repository, a repository, revision or file that does not
exist, no network, offline with an empty cache) ends in one :class:`~nitro_ar.errors.HubError`
line saying what to do: log in, accept the licence, go online, or pass a local folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from .errors import CheckpointError, HubError

__all__ = ["resolve", "is_repo_id", "offline_mode", "TEXT_ENCODER_FILES", "VAE_FILES"]

PathLike = Union[str, os.PathLike]
# A required entry is one file name, or a tuple of names of which one must be present.
Required = Sequence[Union[str, Tuple[str, ...]]]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TRUE = {"1", "on", "yes", "true"}

# What each component needs from its repository (never the pickled `original/` weights of
# Llama, nor `.bin` files: weights are read as safetensors only).
TEXT_ENCODER_FILES = ("config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json")
TEXT_ENCODER_REQUIRED: Required = (
    "config.json", ("model.safetensors", "model.safetensors.index.json"), ("tokenizer.json", "tokenizer.model"),
)
VAE_FILES = ("config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model.safetensors.index.json")
VAE_REQUIRED: Required = ("config.json", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"))


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network, read now
    (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def is_repo_id(value: PathLike) -> bool:
    """Whether ``value`` reads as a Hub repository id (``org/name``) rather than a path."""
    text = os.fspath(value)
    return isinstance(text, str) and _REPO_ID.fullmatch(text) is not None and ".." not in text


def _missing(folder: Path, required: Required) -> list:
    missing = []
    for entry in required:
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        if not any((folder / name).exists() for name in names):
            missing.append(" or ".join(names))
    return missing


def _hub_error(repo_id: str, revision: Optional[str], err: Exception, offline: bool) -> HubError:
    """One line saying what failed and what to do about it."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"https://huggingface.co/{repo_id}"
    local = "or pass a local folder (a download of the repository) instead"
    if isinstance(err, GatedRepoError):
        what = (f"{repo_id} is gated: accept its licence at {url} with your account, log in "
                f"(`hf auth login`, or HF_TOKEN / token=...), {local}")
    elif isinstance(err, RepositoryNotFoundError):
        what = (f"{repo_id} is neither a local path nor a Hub repository you can access (not found, or private: "
                f"check the name, log in with `hf auth login` or pass token=...), {local}")
    elif isinstance(err, RevisionNotFoundError):
        what = f"{repo_id} has no revision {revision!r} (a branch, tag or commit of {url}); pass an existing revision"
    elif isinstance(err, LocalEntryNotFoundError):
        if offline:
            what = (f"{repo_id} (revision {revision or 'main'}) is not in the Hub cache and downloads are off "
                    f"(HF_HUB_OFFLINE=1 or local_files_only=True): run once online, "
                    f"`hf download {repo_id}`, point cache_dir / HF_HUB_CACHE at a cache holding it, {local}")
        else:
            what = (f"could not reach the Hugging Face Hub for {repo_id} and it is not in the cache: check the network "
                    f"(or HF_ENDPOINT / proxies), {local}")
    elif isinstance(err, EntryNotFoundError):
        what = f"{repo_id} lacks a needed file ({err}); {local}"
    elif isinstance(err, HFValidationError):
        what = f"{repo_id!r} is not a valid repository id or revision ({err})"
    else:
        what = f"fetching {repo_id} from the Hub failed ({type(err).__name__}: {err}); {local}"
    return HubError(what)


def resolve(
    path_or_repo_id: PathLike,
    *,
    files: Optional[Sequence[str]] = None,
    required: Required = (),
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
    what: str = "checkpoint",
) -> Path:
    """The local file or folder behind ``path_or_repo_id``.

    Args:
        path_or_repo_id: a local file or folder (returned as is), or a Hub repository id
            (``"amd/Nitro-AR"``).
        files: ``allow_patterns`` of the download (glob patterns relative to the repository
            root, e.g. ``["Nitro-AR-512px-GAN.safetensors"]``); ``None`` fetches everything.
        required: names that must exist in the folder (a tuple entry: one of them); checked for
            local folders and Hub snapshots alike, so a partial cache is reported, not loaded.
        revision: branch, tag or commit of the repository (default ``main``).
        cache_dir: the Hub cache (default ``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``).
        token: Hub token (default: the logged-in one, or ``HF_TOKEN``).
        local_files_only: only read the cache (also when ``HF_HUB_OFFLINE=1``).
        what: what the path is for, used in messages ("text encoder", ...).
    Returns:
        the path of the local file, the local folder, or the Hub snapshot folder.
    Raises:
        HubError: the repository cannot be fetched or is not cached (one line, what to do).
        CheckpointError: a local path or a snapshot lacks a required file, or ``path_or_repo_id``
            is neither an existing path nor a repository id.
    """
    local = Path(path_or_repo_id).expanduser()
    if local.exists():
        missing = _missing(local, required) if local.is_dir() else []
        if missing:
            raise CheckpointError(f"{what} folder {local} lacks {', '.join(missing)}")
        return local
    if not is_repo_id(path_or_repo_id):
        raise CheckpointError(f"no {what} at {local} (not an existing file or folder, nor a Hub repository id org/name)")
    repo_id = os.fspath(path_or_repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    offline = bool(local_files_only) or offline_mode()
    try:
        folder = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=None if cache_dir is None else os.fspath(cache_dir), token=token,
            local_files_only=offline, allow_patterns=None if files is None else list(files),
        ))
    # OSError covers the network errors of requests (RequestException is an OSError).
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError) as err:
        raise _hub_error(repo_id, revision, err, offline) from err
    missing = _missing(folder, required)
    if missing:
        hint = ("downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True): fetch them online"
                if offline else "the repository does not hold them: pass the right repository or file")
        raise HubError(f"the {what} snapshot of {repo_id} (revision {revision or 'main'}, {folder}) lacks "
                       f"{', '.join(missing)}; {hint}, or pass a local folder")
    return folder
