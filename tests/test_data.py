"""The precomputed-pairs dataset: layout, error reporting, synthetic data, and `precompute`
with a tiny random Llama text encoder and a tiny random DC-AE (built offline)."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from nitro_ar.data import (
    EMPTY_TEXT_NAME,
    INDEX_NAME,
    DatasetError,
    PairDataset,
    ShardError,
    _load_image,
    make_synthetic_dataset,
    precompute,
    precompute_main,
)

TEXT_SHAPE = (8, 16)


@pytest.fixture
def synthetic(tmp_path):
    """10 samples in shards of 4, 4, 2."""
    return make_synthetic_dataset(tmp_path / "data", 10, text_shape=TEXT_SHAPE, shard_size=4)


def test_synthetic_dataset_reads_back(synthetic):
    data = PairDataset(synthetic)
    assert len(data) == 10 and data.has_thumbnails
    assert data.latent_shape == (32, 16, 16) and data.text_shape == TEXT_SHAPE
    shard = load_file(str(synthetic / "shard-00001.safetensors"))
    item = data[5]  # second sample of the second shard
    assert torch.equal(item["latents"], shard["latents"][1])
    assert torch.equal(item["text"], shard["text"][1].float())
    assert torch.equal(item["thumbnail"], shard["thumbnails"][1])
    assert item["text"].dtype == torch.float32 and item["thumbnail"].shape == (32, 1, 1)
    assert data.empty_text().shape == (1, *TEXT_SHAPE)
    with pytest.raises(IndexError):
        data[10]


def test_synthetic_dataset_has_learnable_structure(tmp_path):
    # Samples of one class share their latent up to 10% noise; the classes differ.
    root = make_synthetic_dataset(tmp_path / "d", 8, text_shape=TEXT_SHAPE, num_classes=2, shard_size=8)
    data = PairDataset(root)
    same = (data[0]["latents"] - data[2]["latents"]).std()
    other = (data[0]["latents"] - data[1]["latents"]).std()
    assert same < 0.2 < other


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no index.json"):
        PairDataset(tmp_path)


def test_corrupt_shard_fails_loudly_with_its_path(synthetic):
    bad = synthetic / "shard-00001.safetensors"
    bad.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ShardError, match="shard-00001.safetensors") as err:
        PairDataset(synthetic)
    assert "unreadable or truncated" in str(err.value)


def test_corrupt_shard_is_skipped_with_a_warning_when_asked(synthetic, caplog):
    (synthetic / "shard-00001.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="nitro_ar.data"):
        data = PairDataset(synthetic, on_bad_shard="skip")
    assert len(data) == 6
    assert any("shard-00001.safetensors" in r.getMessage() for r in caplog.records)
    # The samples left are those of shards 0 and 2, in order.
    assert torch.equal(data[4]["latents"], load_file(str(synthetic / "shard-00002.safetensors"))["latents"][0])


def test_truncated_shard_is_reported(synthetic):
    path = synthetic / "shard-00002.safetensors"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ShardError, match=r"shard-00002\.safetensors.*truncated"):
        PairDataset(synthetic)


def test_missing_text_embedding_is_a_clear_error(synthetic):
    path = synthetic / "shard-00000.safetensors"
    tensors = load_file(str(path))
    del tensors["text"]
    save_file(tensors, str(path))
    with pytest.raises(ShardError, match=r"shard-00000\.safetensors: missing the 'text' tensor \(text embeddings\)"):
        PairDataset(synthetic)


def test_missing_empty_prompt_embedding_is_a_clear_error(synthetic):
    os.remove(synthetic / EMPTY_TEXT_NAME)
    data = PairDataset(synthetic)
    with pytest.raises(DatasetError, match="empty-prompt text embedding"):
        data.empty_text()


def test_shape_mismatch_is_a_clear_error(synthetic):
    path = synthetic / "shard-00000.safetensors"
    tensors = load_file(str(path))
    tensors["latents"] = tensors["latents"][:, :, :8, :8].contiguous()
    save_file(tensors, str(path))
    with pytest.raises(ShardError, match=r"'latents' has shape \(4, 32, 8, 8\), expected \(4, 32, 16, 16\)"):
        PairDataset(synthetic)


def test_sample_count_mismatch_with_index_is_reported(synthetic):
    index = json.loads((synthetic / INDEX_NAME).read_text())
    index["shards"][2]["count"] = 3
    (synthetic / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"shard-00002\.safetensors: 'latents' has shape \(2, "):
        PairDataset(synthetic)


def test_non_finite_sample_is_reported_on_read(synthetic):
    path = synthetic / "shard-00000.safetensors"
    tensors = load_file(str(path))
    tensors["latents"][3, 0, 0, 0] = float("nan")
    save_file(tensors, str(path))
    data = PairDataset(synthetic)
    data[2]
    with pytest.raises(ShardError, match=r"shard-00000\.safetensors: sample 3 has non-finite values in 'latents'"):
        data[3]


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
    return precompute(images, out, llama, vae, resolution=64, batch_size=2, shard_size=2, progress=False, **kw)


def test_precompute_writes_what_the_encoders_compute(images, tmp_path, encoders):
    from nitro_ar.encoders import LatentCodec, TextEncoder

    out = _build(images, tmp_path / "out", encoders)
    data = PairDataset(out)
    assert len(data) == 5 and data.latent_shape == (32, 2, 2) and data.text_shape == (128, 16)
    assert data.thumbnail_shape == (32, 1, 1)
    index = json.loads((out / INDEX_NAME).read_text())
    assert [s["count"] for s in index["shards"]] == [2, 2, 1]

    text_encoder, codec = TextEncoder.from_pretrained(encoders[0]), LatentCodec.from_pretrained(encoders[1])
    order = ["img0.png", "img1.png", "img2.png", "img3.png", "sub/img4.png"]
    for i, name in enumerate(order):
        image = _load_image(images / name, 64)
        assert image.shape == (3, 64, 64)
        expected = codec.encode(image[None])[0]
        torch.testing.assert_close(data[i]["latents"], expected, rtol=1e-4, atol=1e-5)
        thumb = torch.nn.functional.interpolate(image[None], size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
        torch.testing.assert_close(data[i]["thumbnail"], codec.encode(thumb)[0], rtol=1e-4, atol=1e-5)
        text = text_encoder.encode([CAPTIONS[i]]).to(torch.bfloat16).float()[0]
        torch.testing.assert_close(data[i]["text"], text, rtol=2e-2, atol=2e-2)
    empty = text_encoder.empty_embedding().to(torch.bfloat16).float()
    torch.testing.assert_close(data.empty_text(), empty)
    from safetensors import safe_open

    with safe_open(str(out / "shard-00002.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["captions"]) == [CAPTIONS[4]] and json.loads(meta["sources"]) == ["sub/img4.png"]


def test_precompute_resumes_and_rebuilds_bad_shards(images, tmp_path, encoders, caplog):
    out = _build(images, tmp_path / "out", encoders, thumbnails=False)
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*")}
    _build(images, out, encoders, thumbnails=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == {k: v[0] for k, v in first.items()}

    os.remove(out / "shard-00001.safetensors")
    (out / "shard-00002.safetensors").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="nitro_ar.data"):
        _build(images, out, encoders, thumbnails=False)
    assert any("shard-00002.safetensors" in r.getMessage() for r in caplog.records)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first["shard-00000.safetensors"][0]
    for name in ("shard-00001.safetensors", "shard-00002.safetensors"):
        rebuilt = load_file(str(out / name))
        assert torch.equal(rebuilt["latents"], load_bytes(first[name][1])["latents"])
    data = PairDataset(out)
    assert len(data) == 5 and not data.has_thumbnails


def test_precompute_settings_change_rebuilds(images, tmp_path, encoders):
    out = _build(images, tmp_path / "out", encoders, thumbnails=False)
    _build(images, out, encoders, thumbnails=True)
    assert PairDataset(out).has_thumbnails


def test_precompute_missing_caption_is_a_clear_error(images, tmp_path, encoders):
    os.remove(images / "img2.txt")
    with pytest.raises(DatasetError, match=r"1 image\(s\) .* have no caption file .*: img2\.png"):
        _build(images, tmp_path / "out", encoders)


def test_precompute_command_line(images, tmp_path, encoders):
    llama, vae = encoders
    out = tmp_path / "cli"
    argv = [str(images), str(out), "--text-encoder", str(llama), "--vae", str(vae), "--resolution", "64",
            "--shard-size", "4", "--no-thumbnails", "--text-dtype", "float32"]
    assert precompute_main(argv) == 0
    data = PairDataset(out)
    assert len(data) == 5 and not data.has_thumbnails
    assert load_file(str(out / "shard-00000.safetensors"))["text"].dtype == torch.float32
    assert precompute_main([str(tmp_path / "nothing"), str(out), "--text-encoder", str(llama), "--vae", str(vae)]) == 1
