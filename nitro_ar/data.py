"""Training data: MosaicML Streaming (MDS) datasets in the official Nitro layout.

The official Nitro-E repository writes its precomputed datasets with ``streaming.MDSWriter``
(``datasets/prepare/precompute.py``) and reads them with ``StreamingDataset``
(``core/dataset.py``); this module reads those datasets as they are and writes new ones in the
same layout. One sample is a row of these columns (all optional except the latents, each
present in every shard of a stream):

====================== ======== ================================================================
column                 MDS type  content
====================== ======== ================================================================
``caption``            str      the prompt
``latents_512``        bytes    float16 (32, 16, 16): DC-AE latent of the 512 px image, **not**
                                scaled (the official training multiplies by 0.41407)
``latents_1024``       bytes    float16 (32, 32, 32): the same at 1024 px
``text_feat``          bytes    float16 (128, 2048): Llama-3.2-1B last hidden state
``text_mask``          bytes    int64 (128,): the tokenizer's attention mask
``dino_feat``          bytes    float16 (256, 768): DINOv2 ViT-B/14 patch tokens (Nitro-E REPA)
``jpg``                jpeg     the source image
``nitro_thumb_latent`` bytes    float16 (32, 1, 1): DC-AE latent of a 32 x 32 px thumbnail,
                                not scaled (this package's column: the ``joint_gan`` global token)
====================== ======== ================================================================

Byte layouts are C-contiguous ``numpy.tobytes()`` of the arrays. Besides the MDS files, a
dataset folder written by :func:`precompute` holds ``empty_text.safetensors``: ``text``
(1, 128, C_text) float32 and ``text_mask`` (1, 128) int64, the empty-prompt embedding used for
classifier-free-guidance text dropout (official datasets do not have it: write it with
``nitro-ar precompute --only-empty-text DIR --text-encoder PATH``).

:class:`NitroStreamingDataset` (a ``StreamingDataset``) serves both model families: items are
dicts of the requested ``fields`` -- ``latents`` (32, h, w) float32 **scaled** by 0.41407,
``text`` (Lt, C_text) float32, ``text_mask`` (Lt,) int64, ``thumbnail`` (32, 1, 1) float32
scaled, ``dino`` (256, 768) float32, ``caption`` str. Several streams (local folders or remote
URLs, each with an optional ``proportion`` / ``repeat`` / ``choose``) are mixed by streaming.
Every local shard is checked when the dataset opens (present, of the indexed size) and its
checksum verified the first time a process reads it; a missing or corrupt shard raises
:class:`DatasetError` naming the file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

try:
    from streaming import StreamingDataset
except ImportError as _err:  # the `train` extra
    raise ImportError("nitro_ar.data reads and writes MDS datasets with mosaicml-streaming: "
                      "pip install 'nitro-ar[train]'") from _err

from .encoders import SCALING_FACTOR
from .errors import DatasetError, invalid
from .io import write_safetensors_atomic, write_text_atomic

logger = logging.getLogger("nitro_ar.data")

__all__ = [
    "DatasetError",
    "CAPTION", "TEXT_FEAT", "TEXT_MASK", "DINO_FEAT", "JPG", "THUMB_LATENT", "FIELDS",
    "latent_column",
    "mds_columns",
    "encode_sample",
    "make_streams",
    "NitroStreamingDataset",
    "load_empty_text",
    "make_synthetic_dataset",
    "precompute",
    "write_empty_text",
    "precompute_main",
]

CAPTION = "caption"
TEXT_FEAT = "text_feat"
TEXT_MASK = "text_mask"
DINO_FEAT = "dino_feat"
JPG = "jpg"
THUMB_LATENT = "nitro_thumb_latent"
DINO_SHAPE = (256, 768)
TEXT_LENGTH = 128
EMPTY_TEXT_NAME = "empty_text.safetensors"
CHUNK_MANIFEST = "nitro_chunk.json"
# Checksums written with every shard; sha1 for tools that expect it, xxh64 (fast) for reading.
HASHES = ["sha1", "xxh64"]
VERIFY_ORDER = ("xxh64", "xxh3_64", "sha1", "md5", "sha256")
SHARD_SIZE_LIMIT = 256 << 20  # bytes, as the official writer
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STREAM_KEYS = ("remote", "local", "split", "proportion", "repeat", "choose")

#: What a dataset item can hold (see the module docstring).
FIELDS = ("latents", "text", "text_mask", "thumbnail", "dino", "caption")

PathLike = Union[str, os.PathLike]


def latent_column(resolution: int) -> str:
    """Name of the latent column for images of ``resolution`` px (``latents_512``, ...)."""
    return f"latents_{int(resolution)}"


def mds_columns(resolution: int, *, text: bool = True, thumbnails: bool = False, dino: bool = False,
                images: bool = False) -> Dict[str, str]:
    """MDS column encodings for a dataset with these contents (for ``MDSWriter(columns=...)``)."""
    columns = {CAPTION: "str", latent_column(resolution): "bytes"}
    if text:
        columns.update({TEXT_FEAT: "bytes", TEXT_MASK: "bytes"})
    if thumbnails:
        columns[THUMB_LATENT] = "bytes"
    if dino:
        columns[DINO_FEAT] = "bytes"
    if images:
        columns[JPG] = "jpeg"
    return columns


def _fp16_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()


def encode_sample(
    caption: str,
    latents: torch.Tensor,
    *,
    text: Optional[torch.Tensor] = None,
    text_mask: Optional[torch.Tensor] = None,
    thumbnail: Optional[torch.Tensor] = None,
    dino: Optional[torch.Tensor] = None,
    image=None,
    scaling_factor: float = SCALING_FACTOR,
) -> Dict[str, Any]:
    """One MDS row in the official layout.

    Args:
        latents: (32, h, w) **scaled** latents (as :class:`nitro_ar.encoders.LatentCodec`
            returns them); stored unscaled in float16 under ``latents_{32 h}``.
        text: (Lt, C_text) text embedding, stored float16. text_mask: (Lt,) stored int64.
        thumbnail: (32, 1, 1) scaled thumbnail latent, stored unscaled float16.
        dino: (256, 768) DINOv2 patch tokens, stored float16. image: a PIL image (``jpg``).
    """
    if latents.dim() != 3 or latents.shape[1] != latents.shape[2]:
        raise invalid("latents", tuple(latents.shape), "a (C, h, h) tensor")
    row: Dict[str, Any] = {CAPTION: caption, latent_column(32 * latents.shape[-1]): _fp16_bytes(latents / scaling_factor)}
    if text is not None:
        row[TEXT_FEAT] = _fp16_bytes(text)
        mask = torch.ones(text.shape[0], dtype=torch.int64) if text_mask is None else text_mask
        row[TEXT_MASK] = mask.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    if thumbnail is not None:
        row[THUMB_LATENT] = _fp16_bytes(thumbnail / scaling_factor)
    if dino is not None:
        row[DINO_FEAT] = _fp16_bytes(dino)
    if image is not None:
        row[JPG] = image
    return row


def _writer(out: Path, columns: Dict[str, str]):
    from streaming import MDSWriter

    return MDSWriter(out=str(out), columns=columns, compression=None, hashes=HASHES, size_limit=SHARD_SIZE_LIMIT)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def make_streams(sources: Union[PathLike, Sequence[Union[PathLike, Dict[str, Any]]]], *, cache_dir: Optional[PathLike] = None):
    """``streaming.Stream`` objects from dataset sources.

    A source is a local folder, a remote URL (``s3://``, ``gs://``, ``oci://``, ``hf://``, ...,
    downloaded by streaming into ``cache_dir`` -- or streaming's default temporary folder), or a
    dict of ``Stream`` arguments (``remote``, ``local``, ``split``, and at most one of
    ``proportion``, ``repeat``, ``choose`` for mixing).
    """
    from streaming import Stream

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DatasetError("no dataset given (pass a folder, a URL or a list of streams)")
    streams = []
    for source in sources:
        if isinstance(source, (str, os.PathLike)):
            source = str(source)
            source = {"remote": source} if "://" in source else {"local": source}
        if not isinstance(source, dict) or not source.get("local") and not source.get("remote"):
            raise DatasetError(f"a stream is a folder, a URL or a dict with 'local' and/or 'remote'; got {source!r}")
        unknown = sorted(set(source) - set(STREAM_KEYS))
        if unknown:
            raise DatasetError(f"stream {source!r}: unknown keys {unknown} (accepted: {', '.join(STREAM_KEYS)})")
        spec = dict(source)
        if spec.get("remote") and not spec.get("local") and cache_dir is not None:
            digest = hashlib.blake2s(spec["remote"].encode("utf-8"), digest_size=8).hexdigest()
            spec["local"] = os.path.join(str(cache_dir), digest)
        try:
            streams.append(Stream(**spec))
        except ValueError as err:
            raise DatasetError(f"stream {source!r}: {err}") from err
    return streams


def load_empty_text(path: PathLike, text_shape: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
    """The empty-prompt embedding file: ``text`` (1, Lt, C_text) float32, ``text_mask`` (1, Lt) int64."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"empty-prompt embedding not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise DatasetError(f"{path}: unreadable safetensors file ({err})") from err
    if "text" not in tensors:
        raise DatasetError(f"{path}: no 'text' tensor (the empty-prompt embedding)")
    text = tensors["text"].float()
    if text_shape is not None and tuple(text.shape) != (1, *text_shape):
        raise DatasetError(f"{path}: 'text' has shape {tuple(text.shape)}, expected {(1, *text_shape)}")
    mask = tensors.get("text_mask", torch.ones(text.shape[:2], dtype=torch.int64)).long()
    return {"text": text, "text_mask": mask}


def _file_hash(path: str, algo: str) -> str:
    import xxhash

    digest = getattr(xxhash, algo)() if algo.startswith("xxh") else hashlib.new(algo)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _ShardInfo:
    """Where a shard lives and how to check it."""

    def __init__(self, stream, shard):
        raw, zipped = shard.file_pairs[0]
        self.raw, self.zip = raw, zipped
        self.path = os.path.join(stream.local, stream.split, raw.basename)
        self.zip_path = os.path.join(stream.local, stream.split, zipped.basename) if zipped else None
        self.local_only = stream.remote is None


class NitroStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` over MDS datasets in the official Nitro layout (module docstring).

    Args:
        streams: ``streaming.Stream`` objects (see :func:`make_streams`).
        batch_size: samples per device and batch (streaming partitions by it; give the
            DataLoader the same).
        resolution: image size the latents were made at: the ``latents_{resolution}`` column,
            (32, resolution / 32, resolution / 32).
        fields: what items hold, a subset of :data:`FIELDS`; the needed columns must be in
            every shard (else :class:`DatasetError` naming the stream and column).
        text_length, text_channels: the ``text_feat`` layout (128 x 2048 for Llama-3.2-1B).
        latent_channels: 32 for the DC-AE f32c32.
        scaling_factor: multiplies the stored latents and thumbnails (0.41407, as the
            official training does).
        shuffle, shuffle_seed, shuffle_algo, num_canonical_nodes: streaming's shuffling; the
            sample order depends only on these, the dataset and the epoch (not on the number
            of processes), see streaming's documentation.
        verify: check each shard's checksum (or, without one in the index, its size) the
            first time this process reads it.
        **kwargs: more ``StreamingDataset`` arguments (``cache_limit``, ``predownload``, ...).
    """

    def __init__(
        self,
        streams,
        *,
        batch_size: int,
        resolution: int = 512,
        fields: Sequence[str] = ("latents", "text", "text_mask"),
        text_length: int = TEXT_LENGTH,
        text_channels: int = 2048,
        latent_channels: int = 32,
        scaling_factor: float = SCALING_FACTOR,
        shuffle: bool = True,
        shuffle_seed: int = 9176,
        shuffle_algo: str = "py1e",
        num_canonical_nodes: Optional[int] = None,
        verify: bool = True,
        **kwargs,
    ):
        unknown = [f for f in fields if f not in FIELDS]
        if unknown:
            raise invalid("fields", list(fields), f"a subset of {FIELDS}", DatasetError)
        if resolution % 32:
            raise invalid("resolution", resolution, "a multiple of 32", DatasetError)
        self.fields = tuple(fields)
        self.latent_column = latent_column(resolution)
        self.latent_shape = (latent_channels, resolution // 32, resolution // 32)
        self.text_shape = (text_length, text_channels)
        self.scaling_factor = scaling_factor
        self.verify = verify
        try:
            super().__init__(streams=streams, batch_size=batch_size, shuffle=shuffle, shuffle_seed=shuffle_seed,
                             shuffle_algo=shuffle_algo, num_canonical_nodes=num_canonical_nodes, **kwargs)
        except (RuntimeError, ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as err:
            where = ", ".join(str(s.remote or s.local) for s in streams)
            raise DatasetError(f"cannot open the MDS dataset(s) {where}: {err}") from err
        self._infos = [_ShardInfo(self.streams[self.stream_per_shard[i]], shard) for i, shard in enumerate(self.shards)]
        self._verified: set = set()
        self._background_error: Optional[BaseException] = None
        self._check_columns()
        self._check_local_files()
        unchecked = sum(not any(a in info.raw.hashes for a in VERIFY_ORDER) for info in self._infos)
        if verify and unchecked:
            logger.info("%d of %d shards have no checksum in their index (written without hashes, as the official "
                        "precompute does): they are checked by size only", unchecked, len(self._infos))
        for stream_id in range(self.num_streams):
            self.get_item(int(self.sample_offset_per_stream[stream_id]))  # layout of each stream's first sample

    # ------------------------------------------------------------------ checks
    def _stream_name(self, stream_id: int) -> str:
        stream = self.streams[stream_id]
        return str(stream.remote or os.path.normpath(os.path.join(stream.local, stream.split)))

    def required_columns(self) -> List[str]:
        """The MDS columns the requested fields read."""
        by_field = {"latents": self.latent_column, "text": TEXT_FEAT, "text_mask": TEXT_MASK,
                    "thumbnail": THUMB_LATENT, "dino": DINO_FEAT, "caption": CAPTION}
        return [by_field[f] for f in self.fields]

    def _check_columns(self) -> None:
        hints = {
            THUMB_LATENT: "the joint_gan global token's thumbnail latent; build the dataset with `nitro-ar precompute` "
                          "(thumbnails on) -- it cannot be derived from the latents",
            TEXT_FEAT: "precomputed text embeddings; write them with `nitro-ar precompute` (official: --text_encoder)",
            TEXT_MASK: "the text attention mask, written with text_feat",
            DINO_FEAT: "DINOv2 features (official precompute --dino_model)",
        }
        for stream_id in range(self.num_streams):
            begin = int(self.shard_offset_per_stream[stream_id])
            shards = self.shards[begin: begin + int(self.shards_per_stream[stream_id])]
            present = set.intersection(*(set(shard.column_names) for shard in shards))
            for column in self.required_columns():
                if column not in present:
                    latents = sorted(c for c in present if c.startswith("latents_"))
                    hint = hints.get(column, f"this model needs {column}; the dataset has {latents or 'no latents'}")
                    raise DatasetError(f"{self._stream_name(stream_id)}: no {column!r} column in (every shard of) this "
                                       f"dataset ({hint}); its columns: {sorted(present)}")

    def _check_local_files(self) -> None:
        """Every shard of a local-only stream is present at its indexed size (streaming would
        otherwise end an epoch early on a missing one)."""
        bad = []
        for info in self._infos:
            if not info.local_only:
                continue
            if os.path.isfile(info.path):
                size = os.path.getsize(info.path)
                if size != info.raw.bytes:
                    bad.append(f"{info.path}: {size} bytes, the index says {info.raw.bytes} (truncated or overwritten)")
            elif not (info.zip_path and os.path.isfile(info.zip_path)):
                bad.append(f"{info.path}: missing")
        if bad:
            raise DatasetError(f"{len(bad)} bad shard(s):\n  " + "\n  ".join(bad))

    def _verify_shard(self, shard_id: int) -> None:
        info = self._infos[shard_id]
        if not os.path.isfile(info.path):
            self.prepare_shard(shard_id)  # download / decompress first
        if not os.path.isfile(info.path):
            raise DatasetError(f"shard {info.path}: missing")
        size = os.path.getsize(info.path)
        if size != info.raw.bytes:
            raise DatasetError(f"shard {info.path}: {size} bytes, the index says {info.raw.bytes} (truncated or overwritten)")
        algo = next((a for a in VERIFY_ORDER if a in info.raw.hashes), None)
        if algo is not None and _file_hash(info.path, algo) != info.raw.hashes[algo]:
            raise DatasetError(f"shard {info.path}: {algo} checksum mismatch (the file is corrupt)")
        self._verified.add(shard_id)

    # ------------------------------------------------------------------ items
    def get_item(self, sample_id: int, retry: int = 7) -> Dict[str, Any]:
        """Sample ``sample_id`` (global index over all streams) as a dict of ``fields``."""
        shard_id, _ = self.spanner[sample_id]
        if self.verify and shard_id not in self._verified:
            self._verify_shard(shard_id)
        path = self._infos[shard_id].path
        try:
            row = super().get_item(sample_id, retry)
        except (RuntimeError, OSError, ValueError) as err:
            raise DatasetError(f"shard {path}: cannot read sample {sample_id} ({err})") from err
        return self._decode(row, path)

    @staticmethod
    def _numpy(row: dict, column: str, dtype, shape: Tuple[int, ...], path: str) -> np.ndarray:
        data = row[column]
        want = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != want:
            got = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray, memoryview)) else type(data).__name__
            raise DatasetError(f"shard {path}: {column!r} holds {got}, expected {' x '.join(map(str, shape))} "
                               f"{np.dtype(dtype).name} ({want} bytes)")
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def _float(self, row: dict, column: str, shape: Tuple[int, ...], path: str, scale: float = 1.0) -> torch.Tensor:
        # numpy, single-threaded: cheaper than torch ops in DataLoader workers.
        value = self._numpy(row, column, np.float16, shape, path).astype(np.float32)
        if not np.isfinite(value).all():
            raise DatasetError(f"shard {path}: non-finite values in {column!r}")
        if scale != 1.0:
            value *= np.float32(scale)
        return torch.from_numpy(value)

    @staticmethod
    def _check_width(row: dict, column: str, other: int, want: int, path: str, what: str) -> None:
        """A clear error when a float16 column holds ``other`` x n values with n != ``want``."""
        data = row[column]
        if isinstance(data, bytes) and len(data) % (2 * other) == 0 and len(data) // (2 * other) != want:
            raise DatasetError(f"shard {path}: {column!r} holds {what.format(len(data) // (2 * other))}")

    def _decode(self, row: dict, path: str) -> Dict[str, Any]:
        item: Dict[str, Any] = {}
        channels, height, width = self.latent_shape
        length, text_channels = self.text_shape
        for field_name in self.fields:
            if field_name == "latents":
                self._check_width(row, self.latent_column, height * width, channels, path,
                                  f"{{}}-channel latents but the model takes {channels} channels")
                item["latents"] = self._float(row, self.latent_column, self.latent_shape, path, self.scaling_factor)
            elif field_name == "text":
                self._check_width(row, TEXT_FEAT, length, text_channels, path,
                                  f"{length} x {{}} float16 embeddings, expected {length} x {text_channels} (the model's "
                                  "caption_channels; wrong text encoder, or another text_length?)")
                item["text"] = self._float(row, TEXT_FEAT, self.text_shape, path)
            elif field_name == "text_mask":
                item["text_mask"] = torch.from_numpy(self._numpy(row, TEXT_MASK, np.int64, (length,), path).copy())
            elif field_name == "thumbnail":
                item["thumbnail"] = self._float(row, THUMB_LATENT, (channels, 1, 1), path, self.scaling_factor)
            elif field_name == "dino":
                item["dino"] = self._float(row, DINO_FEAT, DINO_SHAPE, path)
            else:
                item["caption"] = row[CAPTION]
        return item

    # ------------------------------------------------------------------ iteration
    def on_exception(self, future) -> None:
        # streaming's download threads report failures here and then end the epoch quietly;
        # keep the error so that __iter__ raises it.
        if future.exception() is not None:
            self._background_error = future.exception()
        super().on_exception(future)

    def __iter__(self):
        yield from super().__iter__()
        if self._background_error is not None:
            err = self._background_error
            raise DatasetError(f"preparing a shard failed ({type(err).__name__}: {err})") from err

    def empty_text(self, path: Optional[PathLike] = None) -> Dict[str, torch.Tensor]:
        """The empty-prompt embedding: from ``path``, else ``empty_text.safetensors`` in the
        first local stream folder that has one. ``text`` (1, Lt, C_text) float32,
        ``text_mask`` (1, Lt) int64."""
        if path:
            return load_empty_text(path, self.text_shape)
        for stream in self.streams:
            candidate = Path(stream.local) / stream.split / EMPTY_TEXT_NAME
            if candidate.is_file():
                return load_empty_text(candidate, self.text_shape)
        where = ", ".join(self._stream_name(i) for i in range(self.num_streams))
        raise DatasetError(f"no empty-prompt embedding ({EMPTY_TEXT_NAME}) in {where}: write one with "
                           "`nitro-ar precompute --only-empty-text DIR --text-encoder PATH` and put it in the dataset "
                           "folder or pass its path (train: --empty-text)")


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------
def make_synthetic_dataset(
    root: PathLike,
    num_samples: int,
    *,
    latent_shape: Sequence[int] = (32, 16, 16),
    text_shape: Sequence[int] = (TEXT_LENGTH, 2048),
    thumbnails: bool = True,
    dino: bool = False,
    num_classes: int = 4,
    shard_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a small MDS dataset in the official layout with learnable structure, for tests and
    benchmarks; ``shard_size`` samples per shard. Returns ``root``.

    Each sample belongs to one of ``num_classes`` classes; its (scaled) latent is the class's
    smooth prototype (low-frequency, unit variance) plus 10% noise, its text embedding the
    class's random embedding plus 10% noise, its thumbnail the mean of its latent. A model can
    learn to predict masked tokens from the text and the visible tokens, so the loss falls
    quickly. ``empty_text.safetensors`` holds a random empty-prompt embedding.
    """
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    channels, height, width = latent_shape
    coarse = torch.randn(num_classes, channels, max(height // 4, 1), max(width // 4, 1), generator=gen)
    prototypes = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    prototypes = prototypes / prototypes.std()
    class_text = torch.randn(num_classes, *text_shape, generator=gen)
    labels = torch.arange(num_samples) % num_classes
    latents = prototypes[labels] + 0.1 * torch.randn(num_samples, *latent_shape, generator=gen)
    text = class_text[labels] + 0.1 * torch.randn(num_samples, *text_shape, generator=gen)
    features = torch.randn(num_samples, *DINO_SHAPE, generator=gen) if dino else None

    rows = [encode_sample(f"sample {i:06d} of class {int(labels[i]):03d}", latents[i], text=text[i],
                          thumbnail=latents[i].mean(dim=(1, 2), keepdim=True) if thumbnails else None,
                          dino=None if features is None else features[i])
            for i in range(num_samples)]
    with _writer(root, mds_columns(32 * height, thumbnails=thumbnails, dino=dino)) as writer:
        # Rows are all the same size: a size limit of exactly shard_size rows.
        row_bytes = len(writer.encode_sample(rows[0])) + writer.extra_bytes_per_sample
        writer.size_limit = writer.extra_bytes_per_shard + shard_size * row_bytes
        for row in rows:
            writer.write(row)
    empty = torch.randn(1, *text_shape, generator=gen).half().float()
    write_safetensors_atomic({"text": empty, "text_mask": torch.ones(1, text_shape[0], dtype=torch.int64)},
                             root / EMPTY_TEXT_NAME)
    return root


# --------------------------------------------------------------------------------------------
# precompute from images + captions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ImageCaption:
    image: Path
    caption: Path
    source: str  # path relative to the images folder


def _find_pairs(images_dir: Path) -> List[_ImageCaption]:
    if not images_dir.is_dir():
        raise DatasetError(f"images folder not found: {images_dir}")
    images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images_dir}")
    pairs = [_ImageCaption(p, p.with_suffix(".txt"), p.relative_to(images_dir).as_posix()) for p in images]
    missing = [pair.source for pair in pairs if not pair.caption.is_file()]
    if missing:
        shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise DatasetError(f"{len(missing)} image(s) under {images_dir} have no caption file (same stem, .txt): {shown}")
    return pairs


def _open_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read image {path} ({err})") from err


def _load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB image resized (shorter side = ``resolution``, bicubic) and centre-cropped: (3, R, R) in [0, 1]."""
    from PIL import Image

    img = _open_rgb(path)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def _text_masks(encoder, prompts: List[str]) -> torch.Tensor:
    """(B, Lt) int64 attention masks, tokenized exactly as ``TextEncoder.encode`` does."""
    inputs = encoder.tokenizer(prompts, return_tensors="pt", padding="max_length", max_length=encoder.max_length,
                               truncation=True)
    return inputs["attention_mask"].long()


def _chunk_complete(folder: Path, manifest: dict) -> bool:
    """True if ``folder`` is a finished chunk of exactly these sources and settings."""
    if not (folder / "index.json").is_file() or not (folder / CHUNK_MANIFEST).is_file():
        return False
    try:
        same = json.loads((folder / CHUNK_MANIFEST).read_text()) == manifest
    except json.JSONDecodeError:
        same = False
    if not same:
        logger.warning("rebuilding chunk %s: it was built from other images or settings", folder)
    return same


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _text_encoder(path: PathLike, device: torch.device):
    from .encoders import TextEncoder

    # bf16 on a GPU, as the official pipeline runs Llama; fp32 on CPU, where bf16 is slow.
    return TextEncoder.from_pretrained(path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)


def _write_empty_text(encoder, file: Path) -> None:
    text = encoder.empty_embedding().to(torch.float16).float().cpu()
    write_safetensors_atomic({"text": text, "text_mask": _text_masks(encoder, [""])}, file)


def write_empty_text(out_dir: PathLike, text_encoder_path: PathLike, *, device=None) -> Path:
    """Write ``OUT_DIR/empty_text.safetensors`` (the empty-prompt embedding, see the module
    docstring) for a dataset made elsewhere, e.g. an official one. Returns the file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_empty_text(_text_encoder(text_encoder_path, _device(device)), out_dir / EMPTY_TEXT_NAME)
    return out_dir / EMPTY_TEXT_NAME


def precompute(
    images_dir: PathLike,
    out_dir: PathLike,
    text_encoder_path: PathLike,
    vae_path: PathLike,
    *,
    resolution: int = 512,
    thumbnails: bool = True,
    thumbnail_size: int = 32,
    save_images: bool = False,
    batch_size: int = 16,
    chunk_size: int = 4096,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
) -> Path:
    """Encode a folder of images + captions into an MDS dataset in the official layout (see
    the module docstring): ``caption``, ``latents_{resolution}``, ``text_feat``, ``text_mask``,
    ``nitro_thumb_latent`` (with ``thumbnails``) and ``jpg`` (with ``save_images``), sha1 and
    xxh64 checksums per shard, and ``empty_text.safetensors``.

    Captions are the same-stem ``.txt`` files (UTF-8, stripped); images are found recursively
    and processed in sorted order. Chunk k (images ``[k * chunk_size, (k + 1) * chunk_size)``)
    is an MDS folder ``OUT_DIR/{k:05d}``, written under a hidden name and renamed when complete;
    ``OUT_DIR/index.json`` merges them (``streaming.base.util.merge_index``). Resumable: a
    re-run keeps the chunks already written for the same images and settings.

    Args:
        text_encoder_path: local folder of the text encoder (Llama-3.2-1B for the released
            models): tokenizer + model, read by :class:`nitro_ar.encoders.TextEncoder`.
        vae_path: local folder of the DC-AE (diffusers ``AutoencoderDC``).
        resolution: image side in pixels (512 gives 32 x 16 x 16 latents).
        thumbnails: also store the global-token latent of a ``thumbnail_size`` px thumbnail
            (needed to train ``joint_gan``).
        batch_size: images per encoder call.
        device: where the encoders run (default: CUDA when available, else CPU).
    Returns:
        ``out_dir``.
    Raises:
        DatasetError: no images, images without captions, unreadable images.
    """
    from streaming.base.util import merge_index
    from tqdm.auto import tqdm

    from .encoders import LatentCodec

    images_dir, out_dir = Path(images_dir), Path(out_dir)
    pairs = _find_pairs(images_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _device(device)
    settings = {
        "resolution": resolution,
        "thumbnails": thumbnails,
        "thumbnail_size": thumbnail_size,
        "save_images": save_images,
        "text_encoder": str(text_encoder_path),
        "vae": str(vae_path),
    }
    chunks = [pairs[start: start + chunk_size] for start in range(0, len(pairs), chunk_size)]
    manifests = [{"sources": [p.source for p in chunk], "settings": settings} for chunk in chunks]
    names = [f"{k:05d}" for k in range(len(chunks))]
    todo = [k for k in range(len(chunks)) if not _chunk_complete(out_dir / names[k], manifests[k])]
    done_images = sum(len(chunks[k]) for k in range(len(chunks)) if k not in todo)
    if done_images:
        logger.info("resuming: %d of %d chunks already written", len(chunks) - len(todo), len(chunks))

    encoder = codec = None
    if todo or not (out_dir / EMPTY_TEXT_NAME).is_file():
        encoder = _text_encoder(text_encoder_path, device)
        _write_empty_text(encoder, out_dir / EMPTY_TEXT_NAME)
    columns = mds_columns(resolution, thumbnails=thumbnails, images=save_images)
    bar = tqdm(total=len(pairs), initial=done_images, desc="precompute", unit="img", disable=not progress)
    for k in todo:
        if codec is None:
            codec = LatentCodec.from_pretrained(vae_path, device=device)
        final, partial = out_dir / names[k], out_dir / f".{names[k]}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with _writer(partial, columns) as writer:
            for start in range(0, len(chunks[k]), batch_size):
                batch = chunks[k][start: start + batch_size]
                captions = [p.caption.read_text(encoding="utf-8").strip() for p in batch]
                images = torch.stack([_load_image(p.image, resolution) for p in batch])
                latents = codec.encode(images).cpu()
                thumbs = None
                if thumbnails:
                    small = F.interpolate(images, size=(thumbnail_size, thumbnail_size), mode="bicubic",
                                          antialias=True, align_corners=False)
                    thumbs = codec.encode(small.clamp(0, 1)).cpu()
                texts, masks = encoder.encode(captions).float().cpu(), _text_masks(encoder, captions)
                for i, pair in enumerate(batch):
                    writer.write(encode_sample(
                        captions[i], latents[i], text=texts[i], text_mask=masks[i],
                        thumbnail=None if thumbs is None else thumbs[i],
                        image=_open_rgb(pair.image) if save_images else None, scaling_factor=codec.scaling_factor,
                    ))
                bar.update(len(batch))
        write_text_atomic(json.dumps(manifests[k]), partial / CHUNK_MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    bar.close()

    # merge_index moves its result into `out`, refusing to overwrite: merge into a scratch
    # folder, then replace the index atomically.
    scratch = out_dir / ".index.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    merge_index([str(out_dir / name / "index.json") for name in names], str(scratch), keep_local=True)
    os.replace(scratch / "index.json", out_dir / "index.json")
    shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def _count_samples(out_dir: Path) -> int:
    index = json.loads((out_dir / "index.json").read_text())
    return sum(shard["samples"] for shard in index["shards"])


def precompute_main(argv: Optional[Sequence[str]] = None) -> int:
    """``nitro-ar precompute IMAGES_DIR OUT_DIR --text-encoder PATH --vae PATH [...]`` or
    ``nitro-ar precompute --only-empty-text OUT_DIR --text-encoder PATH``."""
    parser = argparse.ArgumentParser(prog="nitro-ar precompute", description=precompute.__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", metavar="IMAGES_DIR OUT_DIR",
                        help="folder of images, each with a same-stem .txt caption, and the dataset folder to write "
                             "(resumes if it exists); only OUT_DIR with --only-empty-text")
    parser.add_argument("--text-encoder", required=True, help="local folder of the text encoder (Llama-3.2-1B)")
    parser.add_argument("--vae", help="local folder of the DC-AE (diffusers AutoencoderDC)")
    parser.add_argument("--only-empty-text", action="store_true",
                        help=f"only write OUT_DIR/{EMPTY_TEXT_NAME} (e.g. for an official dataset)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--no-thumbnails", dest="thumbnails", action="store_false", help="skip the global-token thumbnails")
    parser.add_argument("--thumbnail-size", type=int, default=32)
    parser.add_argument("--save-images", action="store_true", help="also store the source images (jpg column)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=4096, help="images per resumable MDS sub-folder")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    expected = 1 if args.only_empty_text else 2
    if len(args.folders) != expected:
        parser.error("give OUT_DIR only" if expected == 1 else "give IMAGES_DIR and OUT_DIR")
    if not args.only_empty_text and not args.vae:
        parser.error("--vae is required")
    try:
        if args.only_empty_text:
            out = write_empty_text(args.folders[0], args.text_encoder, device=args.device)
            logger.info("empty-prompt embedding written to %s", out)
            return 0
        out = precompute(
            args.folders[0], args.folders[1], args.text_encoder, args.vae,
            resolution=args.resolution, thumbnails=args.thumbnails, thumbnail_size=args.thumbnail_size,
            save_images=args.save_images, batch_size=args.batch_size, chunk_size=args.chunk_size, device=args.device,
        )
    except DatasetError as err:
        logger.error("%s", err)
        return 1
    logger.info("dataset written to %s (%d samples)", out, _count_samples(out))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(precompute_main())
