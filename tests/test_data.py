"""MDS training data: the official Nitro layout read as a user's prepared dataset would be
(written here with ``MDSWriter`` as the official precompute does), mixing streams, named errors
for missing columns and missing / truncated / corrupt shards, exact mid-epoch resumption, the
synthetic dataset, and `nitro-ar precompute` with a tiny random Llama and DC-AE (built offline)."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from streaming import MDSWriter
from torch.utils.data import DataLoader

from nitro_ar.data import (
    EMPTY_TEXT_NAME,
    DatasetError,
    NitroStreamingDataset,
    _load_image,
    load_empty_text,
    make_streams,
    make_synthetic_dataset,
    precompute,
    precompute_main,
)
from nitro_ar.encoders import SCALING_FACTOR

TEXT_SHAPE = (8, 16)
OFFICIAL_COLUMNS = {"caption": "str", "jpg": "jpeg", "latents_512": "bytes", "dino_feat": "bytes",
                    "text_feat": "bytes", "text_mask": "bytes"}


def official_rows(n, seed=0, resolution=512):
    """Rows as the official precompute.py builds them: numpy float16 / int64 ``tobytes()``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = resolution // 32
    rows = []
    for i in range(n):
        mask = np.zeros(128, np.int64)
        mask[: 5 + i] = 1
        rows.append({
            "caption": f"caption {i}",
            f"latents_{resolution}": rng.standard_normal((32, side, side)).astype(np.float16),
            "text_feat": rng.standard_normal((128, 2048)).astype(np.float16),
            "text_mask": mask,
            "dino_feat": rng.standard_normal((256, 768)).astype(np.float16),
            "jpg": Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
        })
    return rows


def write_official(root, rows, columns=OFFICIAL_COLUMNS):
    """An MDS folder written like the official precompute (no checksums, no compression)."""
    with MDSWriter(out=str(root), columns=columns, compression=None, size_limit=256 * (2 ** 20)) as writer:
        for row in rows:
            writer.write({k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in row.items() if k in columns})
    return root


def open_dataset(root, *, batch_size=2, **kw):
    kw.setdefault("fields", ("latents", "text"))
    kw.setdefault("text_length", TEXT_SHAPE[0])
    kw.setdefault("text_channels", TEXT_SHAPE[1])
    kw.setdefault("num_canonical_nodes", 1)
    sources = root if isinstance(root, list) else [root]
    return NitroStreamingDataset(make_streams(sources), batch_size=batch_size, **kw)


@pytest.fixture
def synthetic(tmp_path):
    """10 samples in shards of 4, 4, 2."""
    return make_synthetic_dataset(tmp_path / "data", 10, text_shape=TEXT_SHAPE, shard_size=4)


def captions(loader):
    return [c for batch in loader for c in batch["caption"]]


# --------------------------------------------------------------------------------------------
# the official layout
# --------------------------------------------------------------------------------------------
def test_reads_an_official_dataset(tmp_path):
    rows = official_rows(3)
    root = write_official(tmp_path / "official", rows)
    data = open_dataset(root, fields=("latents", "text", "text_mask", "dino", "caption"), text_length=128,
                        text_channels=2048, shuffle=False)
    assert data.num_samples == 3
    for i, row in enumerate(rows):
        item = data[i]
        assert item["caption"] == row["caption"]
        assert item["latents"].dtype == torch.float32 and item["latents"].shape == (32, 16, 16)
        # Stored unscaled, as the official writer; served scaled, as the models take them.
        torch.testing.assert_close(item["latents"], torch.from_numpy(row["latents_512"]).float() * SCALING_FACTOR)
        assert torch.equal(item["text"], torch.from_numpy(row["text_feat"]).float())
        assert item["text_mask"].dtype == torch.int64 and torch.equal(item["text_mask"], torch.from_numpy(row["text_mask"]))
        assert torch.equal(item["dino"], torch.from_numpy(row["dino_feat"]).float())


def test_reads_1024_px_latents(tmp_path):
    columns = {"caption": "str", "latents_1024": "bytes", "text_feat": "bytes", "text_mask": "bytes"}
    rows = official_rows(2, resolution=1024)
    root = write_official(tmp_path / "official", rows, columns)
    data = open_dataset(root, resolution=1024, text_length=128, text_channels=2048, shuffle=False)
    torch.testing.assert_close(data[1]["latents"], torch.from_numpy(rows[1]["latents_1024"]).float() * SCALING_FACTOR)
    with pytest.raises(DatasetError, match=r"no 'latents_512' column .* the dataset has \['latents_1024'\]"):
        open_dataset(root, resolution=512, text_length=128, text_channels=2048)


def test_missing_columns_are_named(tmp_path):
    root = write_official(tmp_path / "official", official_rows(2))
    with pytest.raises(DatasetError, match=r"official: no 'nitro_thumb_latent' column .*joint_gan global token.*"
                                           r"cannot be derived from the latents"):
        open_dataset(root, fields=("latents", "text", "thumbnail"), text_length=128, text_channels=2048)
    no_dino = write_official(tmp_path / "no_dino", official_rows(2), {k: v for k, v in OFFICIAL_COLUMNS.items() if k != "dino_feat"})
    with pytest.raises(DatasetError, match=r"no 'dino_feat' column .*\(DINOv2 features"):
        open_dataset(no_dino, fields=("latents", "dino"), text_length=128, text_channels=2048)


def test_wrong_byte_layout_is_a_clear_error(tmp_path):
    rows = official_rows(2)
    for row in rows:
        row["text_mask"] = row["text_mask"].astype(np.int32)  # half the bytes
    root = write_official(tmp_path / "official", rows)
    data = open_dataset(root, fields=("latents",), text_length=128, text_channels=2048)
    with pytest.raises(DatasetError, match=r"shard\.00000\.mds: 'text_mask' holds 512 bytes, expected 128 int64 \(1024 bytes\)"):
        open_dataset(root, fields=("latents", "text_mask"), text_length=128, text_channels=2048)
    assert data[0]["latents"].shape == (32, 16, 16)


def test_non_finite_values_are_named(tmp_path):
    rows = official_rows(2)
    rows[1]["latents_512"][3, 2, 1] = np.inf
    data = open_dataset(write_official(tmp_path / "official", rows), text_length=128, text_channels=2048, shuffle=False)
    assert torch.isfinite(data[0]["latents"]).all()
    with pytest.raises(DatasetError, match=r"shard\.00000\.mds: non-finite values in 'latents_512'"):
        data[1]


def test_empty_text(synthetic, tmp_path):
    data = open_dataset(synthetic)
    empty = data.empty_text()
    assert empty["text"].shape == (1, *TEXT_SHAPE) and empty["text_mask"].shape == (1, TEXT_SHAPE[0])
    assert torch.equal(data.empty_text(synthetic / EMPTY_TEXT_NAME)["text"], empty["text"])
    os.remove(synthetic / EMPTY_TEXT_NAME)
    with pytest.raises(DatasetError, match="--only-empty-text"):
        data.empty_text()
    with pytest.raises(DatasetError, match="not found"):
        load_empty_text(tmp_path / "none.safetensors")


# --------------------------------------------------------------------------------------------
# streams, order, resumption
# --------------------------------------------------------------------------------------------
def test_synthetic_dataset_layout(synthetic):
    index = json.loads((synthetic / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [4, 4, 2]
    assert all(set(s["raw_data"]["hashes"]) == {"sha1", "xxh64"} for s in index["shards"])
    assert set(index["shards"][0]["column_names"]) == {"caption", "latents_512", "text_feat", "text_mask", "nitro_thumb_latent"}
    item = open_dataset(synthetic, fields=("latents", "text", "text_mask", "thumbnail"), shuffle=False)[3]
    assert item["thumbnail"].shape == (32, 1, 1)
    torch.testing.assert_close(item["thumbnail"][:, 0, 0], item["latents"].mean(dim=(1, 2)), rtol=0, atol=2e-3)
    assert torch.equal(item["text_mask"], torch.ones(TEXT_SHAPE[0], dtype=torch.int64))


def test_epochs_reshuffle_and_see_every_sample(synthetic):
    data = open_dataset(synthetic, fields=("caption",), shuffle_seed=5)
    loader = DataLoader(data, batch_size=2, drop_last=True)
    first, second = captions(loader), captions(loader)
    assert len(set(first)) == len(set(second)) == 10
    assert sorted(first) == sorted(second) and first != second


def test_mid_epoch_resumption_continues_with_the_next_samples(synthetic):
    straight = DataLoader(open_dataset(synthetic, fields=("caption",), shuffle_seed=5), batch_size=2, drop_last=True)
    epoch0, epoch1 = captions(straight), captions(straight)

    interrupted = open_dataset(synthetic, fields=("caption",), shuffle_seed=5)
    batches = iter(DataLoader(interrupted, batch_size=2, drop_last=True))
    seen = [c for _ in range(2) for c in next(batches)["caption"]]
    state = interrupted.state_dict(num_samples=len(seen), from_beginning=True)

    resumed = open_dataset(synthetic, fields=("caption",), shuffle_seed=5)
    resumed.load_state_dict(state)
    loader = DataLoader(resumed, batch_size=2, drop_last=True)
    assert seen + captions(loader) == epoch0
    assert captions(loader) == epoch1


def test_worker_processes_do_not_change_the_order(synthetic):
    # Streaming deals each rank's batches out to its workers in turn and the DataLoader takes
    # them back in turn: the worker count changes nothing but the speed.
    orders = [captions(DataLoader(open_dataset(synthetic, fields=("caption",), shuffle_seed=1), batch_size=2,
                                  drop_last=True, num_workers=workers)) for workers in (0, 2)]
    assert orders[0] == orders[1] and len(set(orders[0])) == 10


def test_streams_are_mixed(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", 6, text_shape=TEXT_SHAPE, num_classes=1, seed=1)
    b = make_synthetic_dataset(tmp_path / "b", 4, text_shape=TEXT_SHAPE, num_classes=1, seed=2)
    data = open_dataset([{"local": str(a), "repeat": 2}, str(b)], fields=("latents",))
    assert data.epoch_size == 16 and list(data.samples_per_stream) == [6, 4]
    first_a, first_b = data[0]["latents"], data[6]["latents"]
    rows = [batch["latents"] for batch in DataLoader(data, batch_size=2)]
    latents = torch.cat(rows)
    # Each sample of a is a class prototype + noise, so it is close to a's first sample.
    from_a = ((latents - first_a).flatten(1).norm(dim=1) < (latents - first_b).flatten(1).norm(dim=1)).sum()
    assert latents.shape[0] == 16 and int(from_a) == 12


def test_stream_specs(tmp_path):
    streams = make_streams(["s3://bucket/data", {"local": str(tmp_path), "proportion": 0.5}], cache_dir=tmp_path / "cache")
    assert streams[0].remote == "s3://bucket/data" and streams[0].local.startswith(str(tmp_path / "cache"))
    assert streams[1].local == str(tmp_path) and streams[1].remote is None
    with pytest.raises(DatasetError, match=r"unknown keys \['weight'\]"):
        make_streams([{"local": str(tmp_path), "weight": 2}])
    with pytest.raises(DatasetError, match="no dataset given"):
        make_streams([])
    with pytest.raises(DatasetError, match="cannot open the MDS dataset"):
        open_dataset(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# bad shards
# --------------------------------------------------------------------------------------------
def test_missing_and_truncated_shards_are_named_when_opening(synthetic):
    os.remove(synthetic / "shard.00001.mds")
    blob = (synthetic / "shard.00002.mds").read_bytes()
    (synthetic / "shard.00002.mds").write_bytes(blob[:-10])
    with pytest.raises(DatasetError, match=r"2 bad shard\(s\)") as err:
        open_dataset(synthetic)
    assert f"{synthetic / 'shard.00001.mds'}: missing" in str(err.value)
    assert f"{synthetic / 'shard.00002.mds'}: {len(blob) - 10} bytes, the index says {len(blob)}" in str(err.value)


def test_corrupt_shard_is_named_on_first_read(synthetic):
    path = synthetic / "shard.00001.mds"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x01
    path.write_bytes(bytes(blob))
    data = open_dataset(synthetic, shuffle=False)
    assert data[0]["latents"].shape == (32, 16, 16)
    with pytest.raises(DatasetError, match=r"shard\.00001\.mds: xxh64 checksum mismatch"):
        data[4]
    loader = DataLoader(open_dataset(synthetic), batch_size=2, num_workers=1)
    with pytest.raises(DatasetError, match=r"shard\.00001\.mds: xxh64 checksum mismatch"):
        captions(loader)
    assert open_dataset(synthetic, shuffle=False, verify=False)[4]["latents"].shape == (32, 16, 16)


def test_dataset_without_checksums_is_checked_by_size(tmp_path):
    root = write_official(tmp_path / "official", official_rows(2))
    data = open_dataset(root, text_length=128, text_channels=2048)
    assert data[1]["text"].shape == (128, 2048)


# --------------------------------------------------------------------------------------------
# precompute
# --------------------------------------------------------------------------------------------
CAPTIONS = ["a photo of a red cat", "a blue house", "the green tree", "a dog in the house", "red"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny random Llama (word-level tokenizer without a pad token) and a tiny random DC-AE f32c32."""
    from diffusers import AutoencoderDC
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("encoders")
    words = sorted({w for c in CAPTIONS for w in c.split()})
    vocab = {"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<eos>").save_pretrained(root / "llama")
    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    LlamaModel(llama).save_pretrained(root / "llama")
    channels = (8, 8, 8, 8, 16, 32)  # six stages: f32, 32 latent channels
    AutoencoderDC(
        encoder_block_out_channels=channels, decoder_block_out_channels=channels,
        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6, attention_head_dim=8,
    ).save_pretrained(root / "vae")
    return root / "llama", root / "vae"


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(80, 64), (64, 64), (64, 100), (70, 70), (96, 64)]
    for i, (caption, (w, h)) in enumerate(zip(CAPTIONS, sizes)):
        stem = folder / ("sub" if i == 4 else "") / f"img{i}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def _build(images, out, encoders, **kw):
    llama, vae = encoders
    return precompute(images, out, llama, vae, resolution=64, batch_size=2, chunk_size=2, progress=False, **kw)


def _read_back(out, **kw):
    kw.setdefault("fields", ("latents", "text", "text_mask", "thumbnail", "caption"))
    return open_dataset(out, resolution=64, text_length=128, shuffle=False, **kw)


def test_precompute_writes_what_the_encoders_compute(images, tmp_path, encoders):
    from nitro_ar.encoders import LatentCodec, TextEncoder

    out = _build(images, tmp_path / "out", encoders, save_images=True)
    data = _read_back(out, fields=("latents", "text", "text_mask", "thumbnail", "caption"))
    assert data.num_samples == 5
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1]
    assert [s["raw_data"]["basename"] for s in index["shards"]] == [f"{k:05d}/shard.00000.mds" for k in range(3)]
    assert set(index["shards"][0]["column_names"]) == {"caption", "latents_64", "text_feat", "text_mask",
                                                        "nitro_thumb_latent", "jpg"}

    text_encoder, codec = TextEncoder.from_pretrained(encoders[0]), LatentCodec.from_pretrained(encoders[1])
    order = ["img0.png", "img1.png", "img2.png", "img3.png", "sub/img4.png"]
    for i, name in enumerate(order):
        item = data[i]
        assert item["caption"] == CAPTIONS[i]
        image = _load_image(images / name, 64)
        torch.testing.assert_close(item["latents"], codec.encode(image[None])[0], rtol=2e-3, atol=2e-3)
        thumb = torch.nn.functional.interpolate(image[None], size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
        torch.testing.assert_close(item["thumbnail"], codec.encode(thumb)[0], rtol=2e-3, atol=2e-3)
        text = text_encoder.encode([CAPTIONS[i]]).half().float()[0]
        torch.testing.assert_close(item["text"], text)
        assert int(item["text_mask"].sum()) == len(CAPTIONS[i].split())
    empty = data.empty_text()
    torch.testing.assert_close(empty["text"], text_encoder.empty_embedding().half().float())
    # The source images (jpg column), read with streaming's own reader.
    from streaming import StreamingDataset

    raw = StreamingDataset(local=str(out), batch_size=1, shuffle=False)[4]
    assert raw["jpg"].size == (96, 64)


def test_precompute_resumes_and_rebuilds_changed_chunks(images, tmp_path, encoders, caplog):
    out = _build(images, tmp_path / "out", encoders, thumbnails=False)
    first = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("0*/shard.*.mds")}
    _build(images, out, encoders, thumbnails=False)
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("0*/shard.*.mds")} == first

    # An interrupted chunk (never renamed into place) is redone; the others are kept.
    os.rename(out / "00001", out / ".00001.partial")
    with caplog.at_level(logging.WARNING, logger="nitro_ar.data"):
        _build(images, out, encoders, thumbnails=False)
    assert (out / "00000" / "shard.00000.mds").stat().st_mtime_ns == first["00000"]
    assert (out / "00001" / "shard.00000.mds").stat().st_mtime_ns != first["00001"]
    assert not (out / ".00001.partial").exists()
    assert _read_back(out, fields=("latents",)).num_samples == 5

    # Other settings: every chunk is rebuilt, with a warning naming it.
    with caplog.at_level(logging.WARNING, logger="nitro_ar.data"):
        _build(images, out, encoders, thumbnails=True)
    assert any("00002" in r.getMessage() for r in caplog.records)
    assert _read_back(out).num_samples == 5


def test_precompute_missing_caption_is_a_clear_error(images, tmp_path, encoders):
    os.remove(images / "img2.txt")
    with pytest.raises(DatasetError, match=r"1 image\(s\) .* have no caption file .*: img2\.png"):
        _build(images, tmp_path / "out", encoders)


def test_precompute_command_line(images, tmp_path, encoders):
    llama, vae = encoders
    out = tmp_path / "cli"
    argv = [str(images), str(out), "--text-encoder", str(llama), "--vae", str(vae), "--resolution", "64",
            "--chunk-size", "4", "--no-thumbnails"]
    assert precompute_main(argv) == 0
    data = _read_back(out, fields=("latents", "text"))
    assert data.num_samples == 5
    with pytest.raises(DatasetError, match="nitro_thumb_latent"):
        _read_back(out, fields=("thumbnail",))
    assert precompute_main([str(tmp_path / "nothing"), str(out), "--text-encoder", str(llama), "--vae", str(vae)]) == 1

    official = tmp_path / "official"
    assert precompute_main(["--only-empty-text", str(official), "--text-encoder", str(llama)]) == 0
    assert load_empty_text(official / EMPTY_TEXT_NAME, (128, 16))["text_mask"].shape == (1, 128)
