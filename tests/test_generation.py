"""`nitro-ar generate` at scale: prompt files, planning, GenEval layout, resume, and the same
files from two processes (torchrun, CPU) as from one."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factories import save_tiny_text_encoder, save_tiny_vae, tiny_ar, tiny_e
from nitro_ar import NitroARPipeline, NitroEPipeline
from nitro_ar.checkpoint import OFFICIAL_FILES
from nitro_ar.errors import InvalidArgumentError
from nitro_ar.generation import generate_to_folder, image_seed, plan_batches, read_prompts, shard
from test_hub import add_to_hub_cache, folder_files

ROOT = Path(__file__).resolve().parents[1]
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "fox", "count": 1}], "prompt": "a photo of a fox"},
    {"tag": "two_object", "include": [{"class": "owl", "count": 1}, {"class": "cat", "count": 1}], "prompt": "a photo of an owl and a cat"},
    {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "blue"}], "prompt": "a photo of a blue dog"},
]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tiny_ar("gan").save_official(root / OFFICIAL_FILES["gan"])
    tiny_e().save_official(root / OFFICIAL_FILES["nitro_e"])
    return dict(root=root, ar=root / OFFICIAL_FILES["gan"], e=root / OFFICIAL_FILES["nitro_e"],
                text=save_tiny_text_encoder(root / "text"), vae=save_tiny_vae(root / "vae"))


def test_read_prompts_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red fox\n\n  the owl  \n")
    assert read_prompts(text) == [{"prompt": "a red fox"}, {"prompt": "the owl"}]
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(line) + "\n" for line in GENEVAL_LINES))
    assert read_prompts(meta) == GENEVAL_LINES
    meta.write_text('{"prompt": "ok"}\n{"tag": "x"}\n')
    with pytest.raises(InvalidArgumentError, match=r'evaluation_metadata.jsonl:2 has no "prompt"'):
        read_prompts(meta)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InvalidArgumentError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")


def test_plan_covers_every_image_once_for_any_process_count():
    batches = plan_batches(7, 3, 4)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 1] and batches[0] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    for n in (1, 2, 3, 8):
        shares = [shard(batches, r, n) for r in range(n)]
        assert sorted(b for share in shares for b in map(tuple, share)) == sorted(map(tuple, batches))
    seeds = {image_seed(0, p, i) for p in range(50) for i in range(4)} | {image_seed(1, 0, 0)}
    assert len(seeds) == 201 and image_seed(0, 3, 1) == image_seed(0, 3, 1) < 2**63


def test_geneval_layout_resume_and_settings(parts, tmp_path):
    pipe = NitroARPipeline.from_pretrained(parts["ar"], parts["text"], parts["vae"])
    out = tmp_path / "geneval"
    run = dict(images_per_prompt=2, batch_size=3, seed=7, layout="geneval", progress=False, ar_steps=1)
    first = generate_to_folder(pipe, GENEVAL_LINES[:2], out, **run)
    assert (first.written, first.skipped, first.batches) == (4, 0, 2)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "00000/metadata.jsonl", "00000/samples/0000.png", "00000/samples/0001.png",
        "00001/metadata.jsonl", "00001/samples/0000.png", "00001/samples/0001.png", "generation.json"]
    # GenEval's evaluator reads metadata.jsonl with json.load: exactly that prompt's line.
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == GENEVAL_LINES[1]
    image = out / "00001" / "samples" / "0000.png"
    original = image.read_bytes()
    image.unlink()
    again = generate_to_folder(pipe, GENEVAL_LINES[:2], out, **run)
    assert (again.written, again.skipped, again.batches) == (1, 3, 1) and image.read_bytes() == original
    with pytest.raises(InvalidArgumentError, match="other settings .*seed"):
        generate_to_folder(pipe, GENEVAL_LINES[:2], out, **dict(run, seed=8))
    assert not list(out.rglob(".*.tmp"))


def test_nitro_e_images_do_not_depend_on_the_batch(parts, tmp_path):
    pipe = NitroEPipeline.from_pretrained(parts["e"], parts["text"], None)
    prompts = ["a red fox", "the owl", "a blue cat"]
    for size in (1, 3):
        generate_to_folder(pipe, prompts, tmp_path / f"b{size}", batch_size=size, output_type="latent", progress=False, steps=1)
    names = sorted(p.name for p in (tmp_path / "b1").glob("*.safetensors"))
    assert len(names) == 3
    # Same noise per image; batched matmuls may round differently from batch-1 ones.
    for name in names:
        a, b = (load_file(tmp_path / f"b{size}" / name)["latents"] for size in (1, 3))
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(*(load_file(tmp_path / "b1" / n)["latents"] for n in names[:2]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(parts, tmp_path):
    """torchrun --nproc_per_node 2 on CPU against one process, both loading amd/Nitro-AR and
    meta-llama/Llama-3.2-1B from a Hub cache through HF_HUB_OFFLINE=1 / HF_HUB_CACHE."""
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "amd/Nitro-AR", {OFFICIAL_FILES["gan"]: parts["ar"]})
    add_to_hub_cache(cache, "meta-llama/Llama-3.2-1B", folder_files(parts["text"]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nthe owl\na blue cat\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["generate", "--prompts-file", str(prompts), "--images-per-prompt", "2", "--batch-size", "2", "--steps", "1",
            "--output-type", "latent", "--device", "cpu", "--seed", "3", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "nitro_ar.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    two = subprocess.run([*launch, "-m", "nitro_ar.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) == 6
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)
