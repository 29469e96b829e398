"""Training data: precomputed (latent, text embedding) pairs stored as safetensors shards.

A dataset directory holds

- ``index.json``: format tag, per-sample shapes, and the list of shards with their sample counts;
- ``shard-00000.safetensors``, ...: tensors ``latents`` (n, 32, 16, 16) float32, already multiplied
  by the DC-AE scaling factor; ``text`` (n, 128, C_text) (the text encoder's last hidden state,
  bfloat16 by default); optionally ``thumbnails`` (n, 32, 1, 1) float32, the scaled latent of a
  32 x 32 thumbnail of the image (the global token of the ``joint_gan`` variant). Shard metadata
  keeps the captions and source file names;
- ``empty_text.safetensors``: ``text`` (1, 128, C_text), the empty-prompt embedding used for
  classifier-free-guidance text dropout.

:func:`precompute` builds such a directory from a folder of images with same-stem ``.txt``
captions; :func:`make_synthetic_dataset` writes a small learnable one for tests and benchmarks;
:class:`PairDataset` reads it. Bad shards are never ignored silently: they raise
:class:`ShardError` naming the file, or, with ``on_bad_shard="skip"``, are left out with a
warning naming the file.
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .io import write_json_atomic, write_safetensors_atomic
from .errors import DatasetError

logger = logging.getLogger("nitro_ar.data")

__all__ = [
    "DatasetError",
    "ShardError",
    "PairDataset",
    "write_shard",
    "write_index",
    "make_synthetic_dataset",
    "precompute",
    "precompute_main",
]

FORMAT = "nitro-ar-pairs"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
EMPTY_TEXT_NAME = "empty_text.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BAD_SHARD_POLICIES = ("error", "skip")
OPEN_SHARDS = 64
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PathLike = Union[str, os.PathLike]


class ShardError(DatasetError):
    """A shard that is unreadable, truncated, or does not hold what the index promises."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def write_shard(
    path: PathLike,
    latents: torch.Tensor,
    text: torch.Tensor,
    thumbnails: Optional[torch.Tensor] = None,
    *,
    captions: Optional[Sequence[str]] = None,
    sources: Optional[Sequence[str]] = None,
    settings: Optional[dict] = None,
) -> None:
    """Write one shard atomically.

    Args:
        latents: (n, C, H, W) scaled image latents (stored float32).
        text: (n, Lt, C_text) text embeddings (stored in their dtype).
        thumbnails: optional (n, C, 1, 1) scaled thumbnail latents (stored float32).
        captions, sources, settings: kept as JSON in the shard metadata.
    """
    n = latents.shape[0]
    if text.shape[0] != n or (thumbnails is not None and thumbnails.shape[0] != n):
        raise DatasetError(f"shard {path}: {n} latents but {text.shape[0]} text embeddings"
                           + ("" if thumbnails is None else f" and {thumbnails.shape[0]} thumbnails"))
    tensors = {"latents": latents.float(), "text": text}
    if thumbnails is not None:
        tensors["thumbnails"] = thumbnails.float()
    metadata = {
        "format": FORMAT,
        "count": str(n),
        "captions": json.dumps(list(captions or [])),
        "sources": json.dumps(list(sources or [])),
        "settings": json.dumps(settings or {}, sort_keys=True),
    }
    write_safetensors_atomic(tensors, path, metadata=metadata)


def write_index(
    root: PathLike,
    shards: Sequence[Tuple[str, int]],
    *,
    latent_shape: Sequence[int],
    text_shape: Sequence[int],
    thumbnail_shape: Optional[Sequence[int]],
    settings: Optional[dict] = None,
) -> Path:
    """Write ``index.json`` atomically. ``shards``: (file name, sample count) in order."""
    root = Path(root)
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_samples": int(sum(count for _, count in shards)),
        "latent_shape": list(latent_shape),
        "text_shape": list(text_shape),
        "thumbnail_shape": None if thumbnail_shape is None else list(thumbnail_shape),
        "settings": settings or {},
        "shards": [{"file": name, "count": int(count)} for name, count in shards],
    }
    write_json_atomic(index, root / INDEX_NAME)
    return root / INDEX_NAME


def _read_header(path: Path) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file; ShardError if unreadable or truncated."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ShardError(f"shard {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            return shapes, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ShardError(f"shard {path}: unreadable or truncated safetensors file ({err})") from err


def _check_shard(path: Path, count: int, latent_shape, text_shape, thumbnail_shape) -> None:
    """Raise ShardError unless the shard holds ``count`` samples of the expected shapes."""
    shapes, _ = _read_header(path)
    expected = {"latents": latent_shape, "text": text_shape}
    if thumbnail_shape is not None:
        expected["thumbnails"] = thumbnail_shape
    for name, sample_shape in expected.items():
        if name not in shapes:
            what = {"text": "text embeddings", "latents": "image latents", "thumbnails": "thumbnail latents"}[name]
            raise ShardError(f"shard {path}: missing the {name!r} tensor ({what})")
        want = (count, *sample_shape)
        if shapes[name] != want:
            raise ShardError(f"shard {path}: {name!r} has shape {shapes[name]}, expected {want} (from {INDEX_NAME})")


class PairDataset(Dataset):
    """Precomputed training pairs (see the module docstring for the layout).

    Every shard is checked when the dataset is opened (readable header, file not truncated,
    tensors present with the indexed count and shapes). ``on_bad_shard="error"`` raises
    :class:`ShardError` listing every bad shard; ``"skip"`` leaves them out, logging a warning
    that names each file and the reason.

    Items are dicts: ``latents`` (C, H, W) float32, ``text`` (Lt, C_text) float32 and, when the
    dataset has them, ``thumbnail`` (C, 1, 1) float32.
    """

    def __init__(self, root: PathLike, *, on_bad_shard: str = "error"):
        if on_bad_shard not in BAD_SHARD_POLICIES:
            raise ValueError(f"on_bad_shard must be one of {BAD_SHARD_POLICIES}, got {on_bad_shard!r}")
        self.root = Path(root)
        index_file = self.root / INDEX_NAME
        if not index_file.is_file():
            raise DatasetError(f"{self.root} is not a dataset: no {INDEX_NAME} (build one with `nitro-ar precompute`)")
        try:
            index = json.loads(index_file.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{index_file} is not valid JSON ({err})") from err
        if index.get("format") != FORMAT:
            raise DatasetError(f"{index_file}: format {index.get('format')!r}, expected {FORMAT!r}")
        self.latent_shape = tuple(index["latent_shape"])
        self.text_shape = tuple(index["text_shape"])
        self.thumbnail_shape = None if index.get("thumbnail_shape") is None else tuple(index["thumbnail_shape"])

        self.files: List[Path] = []
        counts: List[int] = []
        bad: List[str] = []
        for entry in index["shards"]:
            path = self.root / entry["file"]
            try:
                _check_shard(path, int(entry["count"]), self.latent_shape, self.text_shape, self.thumbnail_shape)
            except ShardError as err:
                if on_bad_shard == "error":
                    bad.append(str(err))
                    continue
                logger.warning("skipping bad shard: %s", err)
                continue
            self.files.append(path)
            counts.append(int(entry["count"]))
        if bad:
            raise ShardError(f"{len(bad)} bad shard(s) in {self.root} (pass on_bad_shard='skip' to leave them out):\n  "
                             + "\n  ".join(bad))
        if not self.files:
            raise DatasetError(f"{self.root} holds no usable shard")
        self._ends = [sum(counts[: i + 1]) for i in range(len(counts))]
        self._handles: "OrderedDict[int, object]" = OrderedDict()

    @property
    def has_thumbnails(self) -> bool:
        return self.thumbnail_shape is not None

    def __len__(self) -> int:
        return self._ends[-1]

    def empty_text(self) -> torch.Tensor:
        """(1, Lt, C_text) float32: the empty-prompt embedding (for text dropout)."""
        path = self.root / EMPTY_TEXT_NAME
        if not path.is_file():
            raise DatasetError(f"{self.root} has no empty-prompt text embedding ({EMPTY_TEXT_NAME}); "
                               "rebuild the dataset with `nitro-ar precompute`")
        shapes, _ = _read_header(path)
        if shapes.get("text") != (1, *self.text_shape):
            raise DatasetError(f"{path}: 'text' has shape {shapes.get('text')}, expected {(1, *self.text_shape)}")
        from safetensors.torch import load_file

        return load_file(str(path))["text"].float()

    def _handle(self, shard: int):
        # Lazily opened, memory-mapped handles, per worker process; the least recently used
        # ones are closed so that large datasets do not exhaust file descriptors.
        from safetensors import safe_open

        if shard in self._handles:
            self._handles.move_to_end(shard)
        else:
            if len(self._handles) >= OPEN_SHARDS:
                self._handles.popitem(last=False)
            self._handles[shard] = safe_open(str(self.files[shard]), framework="pt")
        return self._handles[shard]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()  # handles do not cross into DataLoader workers
        return state

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        shard = bisect.bisect_right(self._ends, index)
        row = index - (self._ends[shard - 1] if shard else 0)
        handle = self._handle(shard)
        names = ("latents", "text", "thumbnails") if self.has_thumbnails else ("latents", "text")
        item = {}
        for name in names:
            value = handle.get_slice(name)[row : row + 1][0].float()
            if not torch.isfinite(value).all():
                raise ShardError(f"shard {self.files[shard]}: sample {row} has non-finite values in {name!r}")
            item["thumbnail" if name == "thumbnails" else name] = value
        return item


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------
def make_synthetic_dataset(
    root: PathLike,
    num_samples: int,
    *,
    latent_shape: Sequence[int] = (32, 16, 16),
    text_shape: Sequence[int] = (128, 2048),
    thumbnails: bool = True,
    num_classes: int = 4,
    shard_size: int = 64,
    text_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write a small dataset with learnable structure, for tests and benchmarks.

    Each sample belongs to one of ``num_classes`` classes; its latent is the class's smooth
    prototype (low-frequency, unit variance) plus 10% noise, its text embedding the class's
    random embedding plus 10% noise, its thumbnail the mean of its latent. A model can learn to
    predict masked tokens from the text and the visible tokens, so the loss falls quickly.
    Returns ``root``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    channels, height, width = latent_shape
    coarse = torch.randn(num_classes, channels, max(height // 4, 1), max(width // 4, 1), generator=gen)
    prototypes = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    prototypes = prototypes / prototypes.std()
    class_text = torch.randn(num_classes, *text_shape, generator=gen)
    labels = torch.arange(num_samples) % num_classes
    latents = prototypes[labels] + 0.1 * torch.randn(num_samples, *latent_shape, generator=gen)
    text = class_text[labels] + 0.1 * torch.randn(num_samples, *text_shape, generator=gen)
    thumbs = latents.mean(dim=(2, 3), keepdim=True) if thumbnails else None

    shards = []
    for number, start in enumerate(range(0, num_samples, shard_size)):
        stop = min(start + shard_size, num_samples)
        name = shard_name(number)
        write_shard(
            root / name,
            latents[start:stop],
            text[start:stop].to(text_dtype),
            None if thumbs is None else thumbs[start:stop],
            captions=[f"class {int(c)}" for c in labels[start:stop]],
            sources=[f"synthetic-{i}" for i in range(start, stop)],
        )
        shards.append((name, stop - start))
    write_safetensors_atomic({"text": torch.randn(1, *text_shape, generator=gen).to(text_dtype)}, root / EMPTY_TEXT_NAME)
    write_index(
        root,
        shards,
        latent_shape=latent_shape,
        text_shape=text_shape,
        thumbnail_shape=(channels, 1, 1) if thumbnails else None,
        settings={"synthetic": True, "seed": seed},
    )
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


def _load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB image resized (shorter side = ``resolution``, bicubic) and centre-cropped: (3, R, R) in [0, 1]."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = resolution / min(img.size)
            size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
            img = img.resize(size, Image.BICUBIC)
            left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
            array = np.asarray(img, dtype=np.uint8).copy()
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read image {path} ({err})") from err
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def _existing_shard_ok(path: Path, sources: List[str], settings: dict) -> bool:
    """True if ``path`` is a complete shard of exactly these sources, built with these settings.
    A shard that exists but is not is reported and rebuilt."""
    if not path.exists():
        return False
    try:
        shapes, metadata = _read_header(path)
    except ShardError as err:
        logger.warning("rebuilding bad shard: %s", err)
        return False
    ok = (
        json.loads(metadata.get("sources", "[]")) == sources
        and json.loads(metadata.get("settings", "{}")) == settings
        and shapes.get("latents", (0,))[0] == len(sources)
        and shapes.get("text", (0,))[0] == len(sources)
        and (not settings["thumbnails"] or shapes.get("thumbnails", (0,))[0] == len(sources))
    )
    if not ok:
        logger.warning("rebuilding shard %s: it was built from other images or settings", path)
    return ok


def precompute(
    images_dir: PathLike,
    out_dir: PathLike,
    text_encoder_path: PathLike,
    vae_path: PathLike,
    *,
    resolution: int = 512,
    thumbnails: bool = True,
    thumbnail_size: int = 32,
    batch_size: int = 16,
    shard_size: int = 1024,
    text_dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
) -> Path:
    """Encode a folder of images + captions into a training dataset (see the module docstring).

    Captions are the same-stem ``.txt`` files (UTF-8, stripped); images are found recursively
    and processed in sorted order. Shard k holds images ``[k * shard_size, (k + 1) * shard_size)``.
    Resumable: shards already written for the same images and settings are kept (each shard
    and the index are written atomically, so an interrupted run leaves no partial file).

    Args:
        text_encoder_path: local folder of the text encoder (Llama-3.2-1B for the released
            models): tokenizer + model, read by :class:`nitro_ar.encoders.TextEncoder`.
        vae_path: local folder of the DC-AE (diffusers ``AutoencoderDC``).
        resolution: image side in pixels (512 gives 32 x 16 x 16 latents).
        thumbnails: also store the global-token latent of a ``thumbnail_size`` px thumbnail
            (needed to train ``joint_gan``).
        batch_size: images per encoder call. text_dtype: storage dtype of the text embeddings.
        device: where the encoders run (default: CUDA when available, else CPU).
    Returns:
        ``out_dir``.
    Raises:
        DatasetError: no images, images without captions, unreadable images.
    """
    from tqdm.auto import tqdm

    from .encoders import LatentCodec, TextEncoder

    images_dir, out_dir = Path(images_dir), Path(out_dir)
    pairs = _find_pairs(images_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {
        "resolution": resolution,
        "thumbnails": thumbnails,
        "thumbnail_size": thumbnail_size,
        "text_dtype": str(text_dtype).replace("torch.", ""),
        "text_encoder": str(text_encoder_path),
        "vae": str(vae_path),
    }
    groups = [pairs[start : start + shard_size] for start in range(0, len(pairs), shard_size)]
    todo = [k for k, group in enumerate(groups) if not _existing_shard_ok(out_dir / shard_name(k), [p.source for p in group], settings)]
    done_images = sum(len(groups[k]) for k in range(len(groups)) if k not in todo)
    if done_images:
        logger.info("resuming: %d of %d shards already written", len(groups) - len(todo), len(groups))

    encoder = codec = None
    if todo or not (out_dir / EMPTY_TEXT_NAME).is_file():
        # bf16 on a GPU, as the official pipeline runs Llama; fp32 on CPU, where bf16 is slow.
        encoder_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        encoder = TextEncoder.from_pretrained(text_encoder_path, dtype=encoder_dtype, device=device)
        write_safetensors_atomic({"text": encoder.empty_embedding().to(text_dtype)}, out_dir / EMPTY_TEXT_NAME)
    bar = tqdm(total=len(pairs), initial=done_images, desc="precompute", unit="img", disable=not progress)
    for k in todo:
        if codec is None:
            codec = LatentCodec.from_pretrained(vae_path, device=device)
        latents, texts, thumbs, captions = [], [], [], []
        for start in range(0, len(groups[k]), batch_size):
            batch = groups[k][start : start + batch_size]
            batch_captions = [p.caption.read_text(encoding="utf-8").strip() for p in batch]
            images = torch.stack([_load_image(p.image, resolution) for p in batch])
            latents.append(codec.encode(images).cpu())
            if thumbnails:
                small = F.interpolate(images, size=(thumbnail_size, thumbnail_size), mode="bicubic", antialias=True, align_corners=False)
                thumbs.append(codec.encode(small.clamp(0, 1)).cpu())
            texts.append(encoder.encode(batch_captions).to(text_dtype).cpu())
            captions += batch_captions
            bar.update(len(batch))
        write_shard(
            out_dir / shard_name(k),
            torch.cat(latents),
            torch.cat(texts),
            torch.cat(thumbs) if thumbnails else None,
            captions=captions,
            sources=[p.source for p in groups[k]],
            settings=settings,
        )
    bar.close()

    shapes, _ = _read_header(out_dir / shard_name(0))
    write_index(
        out_dir,
        [(shard_name(k), len(group)) for k, group in enumerate(groups)],
        latent_shape=shapes["latents"][1:],
        text_shape=shapes["text"][1:],
        thumbnail_shape=shapes["thumbnails"][1:] if thumbnails else None,
        settings=settings,
    )
    return out_dir


def precompute_main(argv: Optional[Sequence[str]] = None) -> int:
    """``nitro-ar precompute IMAGES_DIR OUT_DIR --text-encoder PATH --vae PATH [...]``."""
    parser = argparse.ArgumentParser(prog="nitro-ar precompute", description=precompute.__doc__.split("\n")[0])
    parser.add_argument("images_dir", help="folder of images, each with a same-stem .txt caption")
    parser.add_argument("out_dir", help="dataset folder to write (resumes if it exists)")
    parser.add_argument("--text-encoder", required=True, help="local folder of the text encoder (Llama-3.2-1B)")
    parser.add_argument("--vae", required=True, help="local folder of the DC-AE (diffusers AutoencoderDC)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--no-thumbnails", dest="thumbnails", action="store_false", help="skip the global-token thumbnails")
    parser.add_argument("--thumbnail-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--text-dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = precompute(
            args.images_dir, args.out_dir, args.text_encoder, args.vae,
            resolution=args.resolution, thumbnails=args.thumbnails, thumbnail_size=args.thumbnail_size,
            batch_size=args.batch_size, shard_size=args.shard_size, text_dtype=_DTYPES[args.text_dtype],
            device=args.device,
        )
    except DatasetError as err:
        logger.error("%s", err)
        return 1
    logger.info("dataset written to %s (%d samples)", out, len(PairDataset(out)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(precompute_main())
