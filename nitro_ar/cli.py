"""The ``nitro-ar`` command line: generate, convert, info, and the tool subcommands."""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from pathlib import Path
from typing import List, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Subcommands that hand their arguments to another module's entry point ``fn(argv) -> int``.
DELEGATED = {
    "train": ("nitro_ar.train", "main", "train or fine-tune on precomputed shards (see README)"),
    "precompute": ("nitro_ar.data", "precompute_main", "build an MDS training dataset from images + captions"),
    "autotune": ("nitro_ar.kernels.tuning", "main", "tune kernel configs on this GPU and persist them"),
    "bench": ("nitro_ar.bench", "main", "run the benchmark suite and print the speed-up table"),
}


def _model_class(path: Path, variant: Optional[str]):
    from .checkpoint import detect_model_type, read_state_dict, resolve_checkpoint
    from .nitro_ar_model import NitroAR
    from .nitro_e_model import NitroE

    file, saved = resolve_checkpoint(path, "nitro_ar", variant)
    kind = saved.get("model_type") if saved else detect_model_type(read_state_dict(file).keys())
    return NitroE if kind == "nitro_e" else NitroAR


def _device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", prompt).strip("_")[:48] or "image"


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .nitro_e_model import NitroE
    from .pipeline import NitroARPipeline, NitroEPipeline

    prompts: List[str] = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("nitro-ar generate: give --prompt (repeatable) or --prompts-file")
    device = _device(args.device)
    cls = _model_class(Path(args.model), args.variant)
    pipe_cls = NitroEPipeline if cls is NitroE else NitroARPipeline
    kwargs = {"variant": args.variant} if args.variant and pipe_cls is NitroARPipeline else {}
    pipe = pipe_cls.from_pretrained(args.model, args.text_encoder, args.vae, dtype=DTYPES[args.dtype], device=device, **kwargs)
    if args.fast:
        from . import fast

        fast.accelerate(pipe.model)
    names = {"steps": "steps" if cls is NitroE else "ar_steps", "head_steps": "head_steps", "cfg": "cfg"}
    gen_kwargs = {names[k]: getattr(args, k) for k in names if getattr(args, k) is not None}
    if cls is NitroE and "head_steps" in gen_kwargs:
        raise SystemExit("nitro-ar generate: --head-steps applies to Nitro-AR only")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(tqdm(prompts, desc="generating", unit="image", disable=args.quiet)):
        seed = args.seed + i
        result = pipe(prompt, seed=seed, **gen_kwargs)
        file = out_dir / f"{i:04d}_{_slug(prompt)}_seed{seed}.png"
        result.images[0].save(file)
        if not args.quiet:
            tqdm.write(str(file))
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import resolve_checkpoint

    src, dst = Path(args.src), Path(args.dst)
    cls = _model_class(src, args.variant)
    model = cls.from_pretrained(src, variant=args.variant)
    _, saved = resolve_checkpoint(src, cls.config_class.model_type, args.variant)
    to = args.to or ("official" if saved is not None else "own")
    if to == "official":
        written = model.save_official(dst if dst.suffix == ".safetensors" else dst / "model.safetensors")
    else:
        written = model.save_pretrained(dst)
    print(f"wrote {to} layout: {written}")
    return 0


def cmd_info(args) -> int:
    from .kernels.backend import device_info, select_backend, triton_available

    device = _device(args.device)
    info = device_info(device)
    print(f"device: {info.name} ({info.vendor}, {info.arch})")
    print(f"torch {torch.__version__}; triton: {'yes' if triton_available() else 'not installed'}")
    print(f"backend: {select_backend(device)}")
    if args.model:
        cls = _model_class(Path(args.model), args.variant)
        model = cls.from_pretrained(args.model, variant=args.variant)
        params = sum(p.numel() for p in model.parameters())
        print(f"model: {cls.__name__}, {params / 1e6:.1f}M parameters, dtype {model.dtype}")
        print(model.config.to_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitro-ar", description="Nitro-AR / Nitro-E: generate, convert, inspect, tune.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="prompts -> PNG files")
    gen.add_argument("--model", required=True, help="official .safetensors, a folder of them, or a saved model folder")
    gen.add_argument("--text-encoder", required=True, help="local Llama-3.2-1B folder")
    gen.add_argument("--vae", required=True, help="local DC-AE f32c32 folder (diffusers format)")
    gen.add_argument("--variant", choices=["gan", "joint_gan"], help="Nitro-AR variant, for a folder holding both")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image (then +1 per prompt)")
    gen.add_argument("--steps", type=int, help="AR steps (Nitro-AR) or flow steps (Nitro-E)")
    gen.add_argument("--head-steps", type=int, dest="head_steps", help="Euler steps of the head per AR step")
    gen.add_argument("--cfg", type=float, help="guidance weight")
    gen.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    gen.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: GPU when present)")
    gen.add_argument("--fast", action="store_true", help="accelerate with nitro_ar.fast")
    gen.add_argument("--out", default="outputs", help="output folder")
    gen.add_argument("--quiet", action="store_true")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="official file <-> project layout (config.json + model.safetensors)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=["own", "official"], help="default: the other layout than src's")
    conv.add_argument("--variant", choices=["gan", "joint_gan"])
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="config, parameter count, detected device and backend")
    info.add_argument("model", nargs="?")
    info.add_argument("--variant", choices=["gan", "joint_gan"])
    info.add_argument("--device")
    info.set_defaults(func=cmd_info)

    for name, (_, _, text) in DELEGATED.items():
        tool = sub.add_parser(name, help=text, add_help=False)
        tool.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        module_name, function, _ = DELEGATED[argv[0]]
        return int(getattr(importlib.import_module(module_name), function)(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from .checkpoint import CheckpointError

    try:
        return int(args.func(args) or 0)
    except CheckpointError as err:
        print(f"nitro-ar {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
