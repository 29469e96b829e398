"""Pipeline and CLI plumbing with a tiny random text encoder and DC-AE (nothing downloaded)."""
import logging

import pytest
import torch

from factories import save_tiny_text_encoder, save_tiny_vae, tiny_ar, tiny_e
from nitro_ar import NitroARPipeline, NitroEPipeline, __version__
from nitro_ar.cli import main
from nitro_ar.encoders import TextEncoder
from nitro_ar.errors import InvalidArgumentError


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
    assert sorted(p.name for p in out.iterdir()) == ["00000_0000_a_red_fox.png", "00001_0000_the_owl.png", "generation.json"]
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


def test_pipeline_diffusers_call_conventions(components):
    pipe = NitroARPipeline.from_pretrained(components["ar"], components["text"], components["vae"])
    pipe.set_progress_bar_config(disable=True)
    seen, model_level = [], []
    prompts = ["a red fox", "the owl"]
    out = pipe(prompts[:1], "blurry", num_images_per_prompt=2, generator=torch.Generator().manual_seed(1), output_type="latent",
               ar_steps=2, callback_on_step_end=lambda p, step, t, kw: seen.append((p is pipe, step, tuple(kw["latents"].shape))),
               callback=lambda step, x: model_level.append(step))
    assert out.latents.shape == (2, 32, 16, 16) and out.images is out.latents
    assert seen == [(True, 0, (2, 256, 32)), (True, 1, (2, 256, 32))] and model_level == [0, 1]
    plain = pipe(prompts[:1], num_images_per_prompt=2, generator=torch.Generator().manual_seed(1), output_type="latent", ar_steps=2)
    assert not torch.equal(plain.latents, out.latents)  # the negative prompt is used
    # One generator per image: each image is the one its generator gives alone.
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    both = pipe(prompts, generator=gens, output_type="latent", ar_steps=1).latents
    alone = pipe("the owl", generator=torch.Generator().manual_seed(6), output_type="latent", ar_steps=1).latents
    assert torch.equal(both[1:], alone)
    (array,) = pipe("a red fox", seed=0, ar_steps=1, output_type="np", return_dict=False)
    assert array.shape == (1, 512, 512, 3) and 0 <= array.min() <= array.max() <= 1
    for bad in (dict(seed=1, generator=torch.Generator()), dict(output_type="jpeg"), dict(num_images_per_prompt=0),
                dict(negative_prompt=["a", "b", "c"]), dict(generator=[torch.Generator()] * 3)):
        with pytest.raises(InvalidArgumentError):
            pipe(prompts, **bad)


def test_cli_version_and_wrong_encoder_path(components, tmp_path, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nitro-ar {__version__}"
    args = ["generate", "--model", str(components["ar"]), "--text-encoder", str(tmp_path / "llama"), "--prompt", "a red fox",
            "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 2
    assert "no text encoder at" in capsys.readouterr().err
