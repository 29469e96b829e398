"""Loading and saving: both layouts, dtypes, meta construction, and clear errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import tiny_ar, tiny_ar_config, tiny_e
from nitro_ar import CheckpointError, NitroAR, NitroE
from nitro_ar.checkpoint import OFFICIAL_FILES, infer_config
from nitro_ar.errors import ConfigError


def _official_file(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_official_file_roundtrip_with_inferred_config(tmp_path, variant):
    model = tiny_ar(variant)
    file = _official_file(model, tmp_path / "official.safetensors")
    loaded = NitroAR.from_pretrained(file)
    assert loaded.config == tiny_ar_config(variant)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    tokens, text = torch.randn(1, 256, 32), torch.randn(1, 8, 48)
    assert torch.allclose(loaded.backbone(tokens, text), model.backbone(tokens, text), atol=1e-5, rtol=1e-5)


def test_save_pretrained_layout_and_official_export(tmp_path):
    model = tiny_ar("joint_gan")
    model.save_pretrained(tmp_path / "own")
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "own" / "config.json").read_text())["variant"] == "joint_gan"
    again = NitroAR.from_pretrained(tmp_path / "own")
    model.save_official(tmp_path / "exported.safetensors")
    exported = load_file(str(tmp_path / "exported.safetensors"))
    assert exported.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in again.state_dict().items())
    assert not list(tmp_path.glob("**/*.tmp"))


def test_nitro_e_roundtrip_keeps_stored_position_table(tmp_path):
    model = tiny_e()
    file = _official_file(model, tmp_path / "e.safetensors")
    loaded = NitroE.from_pretrained(file)
    assert "pos_embed.pos_embed" in load_file(str(file))
    lat, text = torch.randn(1, 32, 16, 16), torch.randn(1, 16, 48)
    # Same weights; memory alignment of the loaded buffers may change BLAS rounding slightly.
    assert torch.allclose(loaded(lat, text, torch.tensor([500.0])), model(lat, text, torch.tensor([500.0])), atol=1e-5, rtol=1e-5)


def test_dtype_and_buffers_after_meta_load(tmp_path):
    model = tiny_ar("joint_gan")
    file = _official_file(model, tmp_path / "m.safetensors")
    half = NitroAR.from_pretrained(file, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.pos_embed_lv0.dtype == torch.bfloat16 and half.pos_embed_lv0.device.type == "cpu"
    assert torch.equal(half.pos_embed_lv0, model.pos_embed_lv0.to(torch.bfloat16))
    assert torch.equal(half.diffloss.net.pos_embed_lv0, model.diffloss.net.pos_embed_lv0.to(torch.bfloat16))


def test_directory_of_official_files_needs_variant(tmp_path):
    _official_file(tiny_ar("gan"), tmp_path / OFFICIAL_FILES["gan"])
    _official_file(tiny_ar("joint_gan"), tmp_path / OFFICIAL_FILES["joint_gan"])
    assert NitroAR.from_pretrained(tmp_path, variant="joint_gan").config.variant == "joint_gan"
    assert NitroAR.from_pretrained(tmp_path, config=tiny_ar_config("gan")).config.variant == "gan"
    (tmp_path / "extra.safetensors").write_bytes(b"")
    (tmp_path / OFFICIAL_FILES["gan"]).rename(tmp_path / "renamed.safetensors")
    with pytest.raises(CheckpointError, match="several checkpoints"):
        NitroAR.from_pretrained(tmp_path, variant="gan")


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path):
    state = tiny_ar("gan").state_dict()
    state.pop("x_proj.bias")
    state["bogus.weight"] = torch.zeros(3)
    state["context_embedder.weight"] = torch.zeros(64, 40)
    file = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    with pytest.raises(CheckpointError) as err:
        NitroAR.from_pretrained(file, config=tiny_ar_config("gan"))
    msg = str(err.value)
    assert "missing keys: x_proj.bias" in msg and "unexpected keys: bogus.weight" in msg
    assert "context_embedder.weight (64, 40) vs model (64, 48)" in msg


def test_wrong_variant_suggests_fitting_config(tmp_path):
    file = _official_file(tiny_ar("joint_gan"), tmp_path / "j.safetensors")
    with pytest.raises(CheckpointError, match="fits this checkpoint.*joint_gan"):
        NitroAR.from_pretrained(file, config=tiny_ar_config("gan"))
    with pytest.raises(CheckpointError, match="NitroAR.from_pretrained"):
        NitroE.from_pretrained(file)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_not_safetensors(tmp_path, content):
    file = tmp_path / "broken.safetensors"
    file.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        NitroAR.from_pretrained(file)


def test_truncated_file(tmp_path):
    file = _official_file(tiny_ar("gan"), tmp_path / "t.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        NitroAR.from_pretrained(file)


def test_missing_path_and_bad_config_json(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        NitroAR.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        NitroAR.from_pretrained(tmp_path)


def test_infer_config_nitro_e():
    cfg = infer_config(tiny_e().state_dict())
    assert cfg.inner_dim == 64 and cfg.caption_channels == 48 and cfg.asa_pattern == ((1, 1), (4, 1), (4, 4))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        model = tiny_ar("gan", block_groups=(1, 1, 1))
        model.save_pretrained(tmp_path / "own")
        model.save_official(tmp_path / "official.safetensors")
    finally:
        os.umask(old)
    for file in (tmp_path / "own" / "config.json", tmp_path / "own" / "model.safetensors", tmp_path / "official.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "model.safetensors", "official.safetensors", "own"]


@pytest.mark.parametrize("key, value, message", [
    ("shift", 0, r"shift=0 is not accepted: expected a finite number > 0"),
    ("num_attention_heads", "2", r"num_attention_heads='2' is not accepted: expected an integer >= 1"),
    ("head_steps", 2.9, r"head_steps=2.9 is not accepted"),
    ("block_groups", [1, 1], r"block_groups=\[1, 1\] is not accepted"),
    ("colour", "red", r"unknown NitroARConfig fields: \['colour'\]"),
])
def test_config_json_values_are_validated_before_loading(tmp_path, key, value, message):
    tiny_ar("gan", block_groups=(1, 1, 1)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ConfigError, match=message) as err:
        NitroAR.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        NitroAR.from_pretrained(tmp_path)
