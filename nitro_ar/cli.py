"""The ``nitro-ar`` command line: generate, convert, info, and the tool subcommands.

Every failure ends in one line on stderr, ``nitro-ar: error: ...``, and a non-zero exit code:
2 for bad input (arguments, paths, files, configs, checkpoints: the :mod:`nitro_ar.errors`
family and missing / unreadable paths), 1 for anything else, 130 when interrupted. ``--debug``
(before the subcommand) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import __version__
from .errors import NitroARError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Subcommands that hand their arguments to another module's entry point ``fn(argv) -> int``.
DELEGATED = {
    "train": ("nitro_ar.train", "main", "train or fine-tune on precomputed shards (see README)"),
    "precompute": ("nitro_ar.data", "precompute_main", "build an MDS training dataset from images + captions"),
    "autotune": ("nitro_ar.kernels.tuning", "main", "tune kernel configs on this GPU and persist them"),
    "bench": ("nitro_ar.bench", "main", "run the benchmark suite and print the speed-up table"),
}


# Options of `nitro-ar` itself, accepted before the subcommand (also before a delegated one).
GLOBAL_FLAGS = {"-v": "verbose", "--verbose": "verbose", "--debug": "debug"}
# OSErrors that mean a path given on the command line is wrong: bad input, exit code 2.
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


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


def cmd_generate(args) -> int:
    from .generation import run_cli

    return run_cli(args)


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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``nitro-ar: error: <subcommand>: <message>``, exit 2."""

    def error(self, message: str):
        where = self.prog.partition(" ")[2]
        self.exit(EXIT_BAD_INPUT, f"nitro-ar: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: expected an integer >= 1")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: expected a finite number")
    return value


def _device_name(text: str) -> str:
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: expected a device such as cpu, cuda, cuda:1") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nitro-ar", description="Nitro-AR / Nitro-E: generate, convert, inspect, tune.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and progress details")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    parser.add_argument("--version", action="version", version=f"nitro-ar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="prompts -> PNG files (or latents), batched, resumable, sharded over processes")
    gen.add_argument("--model", default="amd/Nitro-AR",
                     help="Hub repo (default amd/Nitro-AR; amd/Nitro-E), official .safetensors, a folder of them, or a saved model folder")
    gen.add_argument("--variant", choices=["gan", "joint_gan"], help="Nitro-AR variant (default on the Hub: gan)")
    gen.add_argument("--filename", help="weights file inside --model's folder or repo (e.g. Nitro-E-512px-dist.safetensors)")
    gen.add_argument("--revision", help="branch, tag or commit of --model's Hub repo")
    gen.add_argument("--text-encoder", default="meta-llama/Llama-3.2-1B", help="Llama-3.2-1B: Hub repo (default; gated) or local folder")
    gen.add_argument("--vae", default="mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers",
                     help="DC-AE f32c32 (diffusers format): Hub repo (default) or local folder")
    gen.add_argument("--cache-dir", help="Hugging Face Hub cache (default HF_HUB_CACHE)")
    gen.add_argument("--local-files-only", action="store_true", help="never download: read the Hub cache only (also HF_HUB_OFFLINE=1)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file",
                     help="text file (one prompt per line) or JSONL ({\"prompt\": ...} per line, e.g. GenEval's evaluation_metadata.jsonl)")
    gen.add_argument("--negative-prompt", help="unconditional prompt of guidance (default: the empty prompt, as officially)")
    gen.add_argument("--images-per-prompt", type=_positive_int, default=1, help="images per prompt (GenEval: 4)")
    gen.add_argument("--batch-size", type=_positive_int, default=1,
                     help="images per forward pass (Nitro-AR: part of what an image depends on)")
    gen.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from (seed, prompt index, image index)")
    gen.add_argument("--steps", type=_positive_int, help="AR steps (Nitro-AR) or flow steps (Nitro-E)")
    gen.add_argument("--head-steps", type=_positive_int, dest="head_steps", help="Euler steps of the head per AR step")
    gen.add_argument("--cfg", type=_finite_float, help="guidance weight")
    gen.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    gen.add_argument("--device", type=_device_name,
                     help="e.g. cuda, cuda:1, cpu (default: GPU when present; under accelerate/torchrun: each process's own)")
    gen.add_argument("--backend", choices=["auto", "triton", "interpret", "torch", "reference"],
                     help="nitro_ar.fast backend (default reference, the eager model; auto: by device)")
    gen.add_argument("--fast", action="store_true", help="same as --backend auto")
    gen.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True, help="replay CUDA/HIP graphs (accelerated, on a GPU)")
    gen.add_argument("--output-type", choices=["png", "latent"], default="png", help="latent: .safetensors latents, no DC-AE needed")
    gen.add_argument("--layout", choices=["flat", "geneval"], default="flat",
                     help="flat: OUT/<prompt>_<image>_<slug>.png; geneval: OUT/<prompt:05d>/{metadata.jsonl, samples/<image:04d>.png}")
    gen.add_argument("--out", default="outputs", help="output folder (re-running resumes: existing outputs are skipped)")
    gen.add_argument("--overwrite", action="store_true", help="regenerate existing outputs")
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
    info.add_argument("--device", type=_device_name)
    info.set_defaults(func=cmd_info)

    for name, (_, _, text) in DELEGATED.items():
        tool = sub.add_parser(name, help=text, add_help=False)
        tool.add_argument("args", nargs=argparse.REMAINDER)
        tool.set_defaults(func=lambda args: _delegate(args.command, args.args))
    return parser


def _delegate(command: str, argv: List[str]) -> int:
    """Run a tool subcommand: its module's entry point ``fn(argv) -> exit code``."""
    module_name, function, _ = DELEGATED[command]
    return int(getattr(importlib.import_module(module_name), function)(argv) or 0)


def _split_global_flags(argv: List[str]) -> Tuple[dict, List[str]]:
    """The leading ``nitro-ar`` options and the rest (the subcommand and its arguments)."""
    flags = {name: False for name in GLOBAL_FLAGS.values()}
    while argv and argv[0] in GLOBAL_FLAGS:
        flags[GLOBAL_FLAGS[argv.pop(0)]] = True
    return flags, argv


def _error_line(err: BaseException) -> Tuple[str, int]:
    """(one-line message, exit code) of an error that ends the command."""
    if isinstance(err, NitroARError):
        message, code = str(err), EXIT_BAD_INPUT
    elif isinstance(err, UnicodeDecodeError):  # a text file given on the command line is not UTF-8
        message, code = f"a file is not UTF-8 text ({err})", EXIT_BAD_INPUT
    elif isinstance(err, PATH_ERRORS):
        what = err.strerror or type(err).__name__
        message, code = (f"{what}: {err.filename}" if err.filename else str(err)), EXIT_BAD_INPUT
    elif isinstance(err, OSError):
        message, code = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else ""), EXIT_FAILURE
    else:
        message, code = f"{type(err).__name__}: {err} (rerun with --debug for the traceback)", EXIT_FAILURE
    return " ".join(message.split()), code


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``nitro-ar [-v] [--debug] COMMAND ...``; returns the exit code (0 on success)."""
    flags, argv = _split_global_flags(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if flags["verbose"] else logging.WARNING, format="%(message)s")
    try:
        if argv and argv[0] in DELEGATED:  # its arguments are the tool's own, argparse must not see them
            return _delegate(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as done:  # argparse (already printed its one line) or a tool's exit message
        if isinstance(done.code, int) or done.code is None:
            return done.code or 0
        message = re.sub(r"^nitro-ar (\S+): ", r"\1: ", " ".join(str(done.code).split()))
        print(f"nitro-ar: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if flags["debug"]:
            raise
        print("nitro-ar: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 -- the CLI's one place that turns any error into one line
        if flags["debug"]:
            raise
        message, code = _error_line(err)
        print(f"nitro-ar: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
