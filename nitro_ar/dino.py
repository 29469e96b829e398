"""DINOv2 patch features for REPA, from a local ``transformers`` ``Dinov2Model`` folder.

What the official Nitro-E code computes (``train.py``, ``datasets/prepare/precompute.py``,
``core/dataset.py``): DINOv2 ViT-B/14 with its position table resampled once to a 16 x 16 grid
(timm's ``resample_abs_pos_embed``: bicubic with antialiasing, in float32), images resized
(shorter side 512, bilinear), centre-cropped to 512, resized to 224 x 224 (bicubic), scaled to
[0, 1] and normalised with the ImageNet mean and std; the features are the final-LayerNorm
patch tokens (``x_norm_patchtokens``): (B, 256, 768), stored in the MDS ``dino_feat`` column as
float16 bytes of one (256, 768) array per sample (:func:`precompute_dino_feat` adds the column to
a dataset that has the images).

``Dinov2Model``'s ``last_hidden_state`` is the same final LayerNorm output ([CLS] first), and
with the table resampled to the input's grid, ``transformers`` uses it as is (its own on-the-fly
interpolation, which has no antialiasing, never runs).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CheckpointError, InvalidArgumentError, invalid

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DINO_IMAGE_SIZE",
    "DINO_GRID",
    "load_dino",
    "resample_position_embeddings",
    "dino_transform",
    "dino_pixels",
    "dino_features",
    "dino_feat_to_bytes",
    "dino_feat_from_bytes",
    "precompute_dino_feat",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_IMAGE_SIZE = 224
DINO_GRID = 16  # 224 / 14: one DINOv2 patch per 512 px latent token


def resample_position_embeddings(model, grid: int) -> None:
    """Resample ``model.embeddings.position_embeddings`` (1, 1 + n^2, D) to (1, 1 + grid^2, D)
    in place, as timm's ``resample_abs_pos_embed`` (bicubic, antialias, float32); [CLS] kept."""
    table = model.embeddings.position_embeddings
    cls_pos, patch_pos = table[:, :1], table[:, 1:]
    side = int(round(patch_pos.shape[1] ** 0.5))
    if side * side != patch_pos.shape[1]:
        raise CheckpointError(f"DINOv2 position table of {patch_pos.shape[1]} patches is not square")
    if side == grid:
        return
    image = patch_pos.detach().float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True)
    patch_pos = image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)
    model.embeddings.position_embeddings = torch.nn.Parameter(torch.cat([cls_pos.detach(), patch_pos], dim=1),
                                                              requires_grad=False)


def load_dino(path: Union[str, Path], *, grid: int = DINO_GRID, device=None, dtype: torch.dtype = torch.float32):
    """A frozen ``Dinov2Model`` from a local folder (``save_pretrained`` layout; nothing is
    downloaded), its position table resampled to ``grid`` x ``grid``, in eval mode."""
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError as err:
        raise CheckpointError("DINOv2 features need transformers: pip install 'nitro-ar[train]'") from err
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a DINOv2 model folder (no config.json)")
    try:
        config = Dinov2Config.from_pretrained(path, local_files_only=True)
        model = Dinov2Model.from_pretrained(path, config=config, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load a Dinov2Model from {path}: {err}") from err
    if config.model_type != "dinov2":
        raise CheckpointError(f"{path} holds a {config.model_type!r} model, not a DINOv2 (Dinov2Model)")
    resample_position_embeddings(model, grid)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def dino_transform(image_size: int = DINO_IMAGE_SIZE, crop: int = 512):
    """The official DINO image transform (torchvision): Resize(crop), CenterCrop(crop),
    Resize(image_size, bicubic), ToTensor, Normalize(ImageNet). PIL image -> (3, S, S) float32."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(crop),
        transforms.CenterCrop(crop),
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def dino_pixels(images: Sequence, image_size: int = DINO_IMAGE_SIZE) -> torch.Tensor:
    """PIL images (any mode, any size) -> (B, 3, S, S) float32 normalised DINO inputs."""
    transform = dino_transform(image_size)
    return torch.stack([transform(im.convert("RGB") if im.mode != "RGB" else im) for im in images])


@torch.no_grad()
def dino_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> (B, (S/14)^2, D) final-LayerNorm patch tokens, float32."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise invalid("pixels", tuple(pixels.shape), "(B, 3, S, S) normalised images")
    weight = model.embeddings.patch_embeddings.projection.weight
    out = model(pixel_values=pixels.to(device=weight.device, dtype=weight.dtype)).last_hidden_state
    return out[:, 1:].float()


def dino_feat_to_bytes(features: torch.Tensor) -> List[bytes]:
    """(B, N, D) -> one float16 byte string of (N, D) per sample (the MDS ``dino_feat`` column)."""
    if features.ndim != 3:
        raise invalid("features", tuple(features.shape), "(B, N, D)")
    array = features.detach().to("cpu", torch.float16).numpy()
    return [array[i].tobytes() for i in range(array.shape[0])]


def dino_feat_from_bytes(data: bytes, tokens: int = DINO_GRID**2, dim: int = 768) -> torch.Tensor:
    """One ``dino_feat`` value -> (tokens, dim) float32 (as the official reader)."""
    if len(data) != tokens * dim * 2:
        raise InvalidArgumentError(f"dino_feat of {len(data)} bytes: expected {tokens} x {dim} float16 = {tokens * dim * 2}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.float16).copy()).reshape(tokens, dim).float()


def precompute_dino_feat(
    src_dir: Union[str, Path],
    out_dir: Union[str, Path],
    dino_path: Union[str, Path],
    *,
    batch_size: int = 32,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Copy a local MDS dataset that has images (the ``jpg`` column) into ``out_dir`` with the
    ``dino_feat`` column added: one float16 (256, D) array of DINOv2 patch features per sample,
    as the official ``precompute.py --dino_model`` (which, unlike this function, stores the
    whole batch's features in every sample unless its batch size is 1). Every other column
    and ``empty_text.safetensors`` are kept. The dataset is written into a hidden sibling
    folder and renamed when complete, so an interrupted run leaves no partial dataset.
    Returns ``out_dir``.
    """
    import json
    import os
    import shutil

    from streaming.base.format import reader_from_json

    from .data import DINO_FEAT, EMPTY_TEXT_NAME, JPG, _writer
    from .errors import DatasetError

    src, out = Path(src_dir), Path(out_dir)
    if out.exists():
        raise invalid("out_dir", str(out), "a folder that does not exist yet", DatasetError)
    try:
        index = json.loads((src / "index.json").read_text())
        shards = index["shards"]
        columns = dict(zip(shards[0]["column_names"], shards[0]["column_encodings"]))
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise DatasetError(f"{src}: not a local MDS dataset (index.json: {err})") from err
    if JPG not in columns:
        raise DatasetError(f"{src}: no {JPG!r} column (images) to compute DINOv2 features from; its columns: {sorted(columns)}")
    if DINO_FEAT in columns:
        raise DatasetError(f"{src} already has a {DINO_FEAT!r} column")
    model = load_dino(dino_path, device=device, dtype=dtype)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)

    def flush(rows, writer):
        feats = dino_feat_to_bytes(dino_features(model, dino_pixels([row[JPG] for row in rows])))
        for row, feat in zip(rows, feats):
            writer.write({**row, DINO_FEAT: feat})
        rows.clear()

    try:
        with _writer(partial, {**columns, DINO_FEAT: "bytes"}) as writer:
            pending: list = []
            for shard in shards:
                reader = reader_from_json(str(src), None, shard)
                for i in range(reader.samples):
                    pending.append(reader.get_item(i))
                    if len(pending) == batch_size:
                        flush(pending, writer)
            if pending:
                flush(pending, writer)
        if (src / EMPTY_TEXT_NAME).is_file():
            shutil.copy2(src / EMPTY_TEXT_NAME, partial / EMPTY_TEXT_NAME)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
