"""Pipeline and CLI plumbing with a tiny random text encoder and DC-AE (nothing downloaded)."""
import logging

import pytest
import torch

from factories import save_tiny_text_encoder, save_tiny_vae, tiny_ar, tiny_e
from nitro_ar import NitroARPipeline, NitroEPipeline
from nitro_ar.cli import main
from nitro_ar.encoders import TextEncoder


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    tiny_ar("gan").save_pretrained(root / "ar")
    tiny_e().save_official(root / "nitro_e.safetensors")
    return dict(ar=root / "ar", e=root / "nitro_e.safetensors", text=save_tiny_text_encoder(root / "text"), vae=save_tiny_vae(root / "vae"))


def test_text_encoder_padding_and_empty_cache(components):
    enc = TextEncoder.from_pretrained(components["text"])
    emb = enc.encode(["a red fox", "the owl"])
    assert emb.shape == (2, 128, 48)
    assert enc.empty_embedding() is enc.empty_embedding()
    assert torch.allclose(enc.encode([""]), enc.empty_embedding())


def test_long_prompt_truncated_with_warning(components, caplog):
    enc = TextEncoder.from_pretrained(components["text"])
    with caplog.at_level(logging.WARNING, logger="nitro_ar"):
        emb = enc.encode(["red fox " * 100])
    assert emb.shape == (1, 128, 48) and "truncated" in caplog.text


def test_ar_pipeline_deterministic_images(components):
    pipe = NitroARPipeline.from_pretrained(components["ar"], components["text"], components["vae"])
    a = pipe("a red fox", seed=3, ar_steps=2)
    b = pipe("a red fox", seed=3, ar_steps=2)
    assert a.images[0].size == (512, 512) and torch.equal(a.latents, b.latents)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    latent_only = pipe(["a red fox", "the owl"], seed=3, ar_steps=2, output_type="latent")
    assert latent_only.images is latent_only.latents and latent_only.latents.shape == (2, 32, 16, 16)


def test_e_pipeline_without_vae_returns_latents(components):
    pipe = NitroEPipeline.from_pretrained(components["e"], components["text"], None)
    out = pipe("the owl", seed=0, steps=2, output_type="latent")
    assert out.latents.shape == (1, 32, 16, 16)
    with pytest.raises(ValueError, match="no VAE"):
        pipe("the owl", seed=0, steps=1)


def test_cli_generate_convert_info(components, tmp_path, capsys):
    out = tmp_path / "png"
    args = ["generate", "--model", str(components["ar"]), "--text-encoder", str(components["text"]),
            "--vae", str(components["vae"]), "--prompt", "a red fox", "--prompt", "the owl", "--steps", "2",
            "--seed", "5", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000_a_red_fox_seed5.png", "0001_the_owl_seed6.png"]
    official = tmp_path / "official.safetensors"
    assert main(["convert", str(components["ar"]), str(official)]) == 0
    assert main(["convert", str(official), str(tmp_path / "own")]) == 0
    assert (tmp_path / "own" / "config.json").is_file()
    capsys.readouterr()
    assert main(["info", str(components["e"])]) == 0
    assert "NitroE" in capsys.readouterr().out


def test_cli_reports_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["info", str(bad)]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
