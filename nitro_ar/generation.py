"""Image generation at scale: prompt files, batches, resumable output folders, GenEval's layout,
and sharding over processes and nodes (``accelerate launch`` / ``torchrun``).

Work is planned globally, before sharding: the (prompt index, image index) pairs, prompt-major,
are cut into batches of ``batch_size``; process ``r`` of ``n`` takes batches ``r, r + n, ...``.
The random numbers of a batch come from seeds that depend only on ``(seed, prompt index, image
index)`` (:func:`image_seed`), so every file is identical for any number of processes or nodes:

- Nitro-E: each image's starting noise comes from its own seed, so an image is also the same
  at any batch size;
- Nitro-AR: ``NitroAR.generate`` draws one random stream per batch, seeded by the batch's first
  image (:func:`image_seed` of it); an image therefore also depends on ``batch_size`` (keep it
  fixed to reproduce a run; ``batch_size=1`` makes every image depend on its own seed only).

Outputs (``layout``):

- ``"flat"``: ``OUT/<prompt:05d>_<image:04d>_<prompt slug>.png``;
- ``"geneval"`` (GenEval's ``evaluation_metadata.jsonl`` in, its evaluator's layout out):
  ``OUT/<prompt:05d>/metadata.jsonl`` (that prompt's line) + ``OUT/<prompt:05d>/samples/<image:04d>.png``.

``output_type="latent"`` writes ``.safetensors`` files (tensor ``latents``, (32, 16, 16)
scaled latents, float32; metadata ``nitro_ar_generation``: JSON of prompt, indices and seed)
instead of PNGs and needs no DC-AE. Every file is written atomically;
existing outputs are skipped, so re-running the same command resumes. ``OUT/generation.json``
records the settings; a folder made with other settings is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import write_safetensors_atomic, write_text_atomic
from .errors import InvalidArgumentError, invalid

__all__ = ["image_seed", "read_prompts", "plan_batches", "output_file", "shard", "generate_to_folder", "run_cli", "LAYOUTS"]

logger = logging.getLogger("nitro_ar")
PathLike = Union[str, os.PathLike]
LAYOUTS = ("flat", "geneval")
SETTINGS_FILE = "generation.json"
Job = Tuple[int, int]  # (prompt index, image index)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The 63-bit seed of image ``image_index`` of prompt ``prompt_index`` in a run seeded ``seed``
    (a hash: distinct for distinct triples, independent of batches and processes)."""
    digest = hashlib.sha256(f"nitro-ar:{int(seed)}:{int(prompt_index)}:{int(image_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def read_prompts(path: PathLike) -> List[dict]:
    """Prompts of a text file (one per line, blank lines skipped) or a JSONL file (one object
    with a ``"prompt"`` string per line, e.g. GenEval's ``evaluation_metadata.jsonl``), as
    metadata dicts ``{"prompt": ..., ...}`` (a JSONL line is kept whole)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgumentError(f"prompts file {path} cannot be read ({err})") from err
    jsonl = path.suffix == ".jsonl" or any(line.lstrip().startswith("{") for line in lines[:1])
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append({"prompt": line.strip()})
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise InvalidArgumentError(f"{path}:{number} is not a JSON object ({err.msg})") from err
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise InvalidArgumentError(f'{path}:{number} has no "prompt" string: {line.strip()[:80]!r}')
        prompts.append(entry)
    if not prompts:
        raise InvalidArgumentError(f"prompts file {path} holds no prompt")
    return prompts


def plan_batches(num_prompts: int, images_per_prompt: int, batch_size: int) -> List[List[Job]]:
    """Every (prompt, image) pair, prompt-major, cut into batches of ``batch_size`` (the last may
    be shorter). Independent of the number of processes."""
    jobs = [(p, i) for p in range(num_prompts) for i in range(images_per_prompt)]
    return [jobs[k:k + batch_size] for k in range(0, len(jobs), batch_size)]


def shard(batches: Sequence, process_index: int, num_processes: int) -> list:
    """The batches process ``process_index`` of ``num_processes`` generates (round robin)."""
    return list(batches[process_index::num_processes])


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", prompt).strip("_")[:48] or "image"


def output_file(out_dir: PathLike, layout: str, job: Job, prompt: str, suffix: str = ".png") -> Path:
    """Where image ``job`` = (prompt index, image index) is written (see the module docstring)."""
    p, i = job
    if layout == "geneval":
        return Path(out_dir) / f"{p:05d}" / "samples" / f"{i:04d}{suffix}"
    return Path(out_dir) / f"{p:05d}_{i:04d}_{_slug(prompt)}{suffix}"


def _write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary path)`` next to ``target``, fsync, rename over ``target``, fsync the
    folder. The temporary is created with mode 0o666 (the umask applies) and removed on error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _check_settings(out_dir: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to resume into a folder written with other settings; record ours."""
    file = out_dir / SETTINGS_FILE
    text = json.dumps(settings, indent=1, sort_keys=True)
    if file.is_file() and not overwrite:
        try:
            previous = json.loads(file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != json.loads(text):
            changed = sorted(k for k in set(settings) | set(previous or {}) if (previous or {}).get(k) != settings.get(k))
            raise InvalidArgumentError(
                f"{out_dir} holds images generated with other settings ({', '.join(changed) or SETTINGS_FILE + ' unreadable'} "
                "differ): use another output folder, or overwrite=True / --overwrite")
    if not file.is_file() or file.read_text() != text:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(text, file)


@dataclass
class GenerationSummary:
    """What one process did: images written, images found already present, batches run."""

    written: int
    skipped: int
    batches: int


def generate_to_folder(
    pipe,
    prompts: Sequence[Union[str, dict]],
    out_dir: PathLike,
    *,
    images_per_prompt: int = 1,
    batch_size: int = 1,
    seed: int = 0,
    layout: str = "flat",
    output_type: str = "pil",
    negative_prompt: Optional[str] = None,
    process_index: int = 0,
    num_processes: int = 1,
    overwrite: bool = False,
    settings: Optional[dict] = None,
    progress: bool = True,
    **generate_kwargs,
) -> GenerationSummary:
    """Generate this process's share of ``prompts`` x ``images_per_prompt`` into ``out_dir``.

    Args:
        pipe: a :class:`~nitro_ar.pipeline.NitroARPipeline` or ``NitroEPipeline``.
        prompts: strings or metadata dicts with a ``"prompt"`` (GenEval lines).
        images_per_prompt, batch_size: images per prompt; images per ``generate`` call.
        seed: the run's seed (see :func:`image_seed`).
        layout: "flat" or "geneval"; output_type: "pil" (PNG files) or "latent" (safetensors).
        negative_prompt: one negative prompt for every image (default: the empty prompt).
        process_index, num_processes: this process's share (``accelerate``'s ``PartialState``).
        overwrite: regenerate existing outputs (default: skip them, i.e. resume).
        settings: recorded in ``OUT/generation.json`` and compared on resume (the CLI passes the
            model, steps, dtype, ...); the function adds its own arguments.
        generate_kwargs: to the pipeline call (``cfg``, ``ar_steps``, ``steps``, ...).
    Returns:
        :class:`GenerationSummary` of this process.
    """
    from tqdm.auto import tqdm

    metas = [{"prompt": p} if isinstance(p, str) else dict(p) for p in prompts]
    if not metas or not all(isinstance(m.get("prompt"), str) for m in metas):
        raise invalid("prompts", prompts, 'a non-empty list of strings or dicts with a "prompt" string')
    for name, value in (("images_per_prompt", images_per_prompt), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid(name, value, "an integer >= 1")
    if layout not in LAYOUTS:
        raise invalid("layout", layout, " | ".join(LAYOUTS))
    if output_type not in ("pil", "latent"):
        raise invalid("output_type", output_type, '"pil" (PNG files) or "latent" (safetensors)')
    if not 0 <= process_index < num_processes:
        raise invalid("process_index", process_index, f"0 <= process_index < num_processes ({num_processes})")
    out_dir = Path(out_dir)
    suffix = ".png" if output_type == "pil" else ".safetensors"
    recorded = dict(settings or {}, seed=int(seed), images_per_prompt=images_per_prompt, layout=layout,
                    output_type=output_type, negative_prompt=negative_prompt,
                    generate_kwargs={k: generate_kwargs[k] for k in sorted(generate_kwargs)})
    if not getattr(pipe, "per_image_generators_batched", False):
        recorded["batch_size"] = batch_size  # the batch shares one random stream (module docstring)
    _check_settings(out_dir, recorded, overwrite)
    batches = shard(plan_batches(len(metas), images_per_prompt, batch_size), process_index, num_processes)
    pipe.set_progress_bar_config(disable=True)
    written = skipped = runs = 0
    bar = tqdm(total=sum(len(b) for b in batches), unit="image", desc=f"generating [{process_index + 1}/{num_processes}]",
               disable=not progress)
    for batch in batches:
        files = [output_file(out_dir, layout, job, metas[job[0]]["prompt"], suffix) for job in batch]
        todo = [k for k, f in enumerate(files) if overwrite or not f.is_file()]
        if not todo:
            skipped += len(batch)
            bar.update(len(batch))
            continue
        gens = [torch.Generator().manual_seed(image_seed(seed, p, i)) for p, i in batch]
        if not getattr(pipe, "per_image_generators_batched", False):
            gens = gens[:1]
        result = pipe([metas[p]["prompt"] for p, _ in batch], negative_prompt, generator=gens,
                      output_type="latent" if output_type == "latent" else "pil", **generate_kwargs)
        runs += 1
        for k in todo:
            p, i = batch[k]
            if layout == "geneval":
                meta_file = out_dir / f"{p:05d}" / "metadata.jsonl"
                if not meta_file.is_file():
                    meta_file.parent.mkdir(parents=True, exist_ok=True)
                    write_text_atomic(json.dumps(metas[p]) + "\n", meta_file)
            if output_type == "latent":
                # One metadata entry: safetensors orders several in a per-process random order,
                # and the files must be byte-identical whichever process writes them.
                info = json.dumps({"prompt": metas[p]["prompt"], "prompt_index": p, "image_index": i, "seed": seed}, sort_keys=True)
                write_safetensors_atomic({"latents": result.latents[k].float()}, files[k], metadata={"nitro_ar_generation": info})
            else:
                image = result.images[k]
                _write_atomic(files[k], lambda tmp, image=image: image.save(tmp, format="PNG"))
            written += 1
        skipped += len(batch) - len(todo)
        bar.update(len(batch))
    bar.close()
    return GenerationSummary(written=written, skipped=skipped, batches=runs)


def _process_state(device: Optional[str]):
    """(process index, number of processes, device) from accelerate when launched by it or by
    torchrun; one process otherwise."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        from accelerate import PartialState
    except ImportError:
        if launched:
            raise InvalidArgumentError("several processes need accelerate to share the work: pip install 'nitro-ar[train]'") from None
        state = None
    else:
        state = PartialState(cpu=device == "cpu")
    if state is None or state.num_processes == 1:
        chosen = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, chosen
    return state.process_index, state.num_processes, torch.device(device) if device and device != "cuda" else state.device


def _model_family(args) -> str:
    """"nitro_ar" or "nitro_e" for ``args.model`` (a local path or repository; only the header
    of the weights is read)."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint import detect_model_type, resolve_checkpoint

    file, saved = resolve_checkpoint(args.model, None, args.variant, filename=args.filename, revision=args.revision,
                                     cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    if saved is not None:
        return saved.get("model_type", "nitro_ar")
    from .errors import CheckpointError

    try:
        with safe_open(str(file), framework="pt") as handle:
            return detect_model_type(handle.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from err


def run_cli(args) -> int:
    """``nitro-ar generate``: the arguments of :func:`nitro_ar.cli.build_parser`'s generate parser."""
    from .cli import DTYPES
    from .pipeline import NitroARPipeline, NitroEPipeline

    prompts: List[dict] = [{"prompt": p} for p in (args.prompt or [])]
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise InvalidArgumentError("give --prompt (repeatable) or --prompts-file (text, one prompt per line, or JSONL)")
    if args.layout == "geneval" and args.prompt:
        raise InvalidArgumentError("--layout geneval reads its prompts from --prompts-file evaluation_metadata.jsonl")
    process_index, num_processes, device = _process_state(args.device)
    family = _model_family(args)
    pipe_cls = NitroEPipeline if family == "nitro_e" else NitroARPipeline
    names = {"steps": "steps" if family == "nitro_e" else "ar_steps", "head_steps": "head_steps", "cfg": "cfg"}
    gen_kwargs = {names[k]: getattr(args, k) for k in names if getattr(args, k) is not None}
    if family == "nitro_e" and "head_steps" in gen_kwargs:
        raise InvalidArgumentError("--head-steps applies to Nitro-AR only")
    model_kwargs = {"variant": args.variant} if args.variant and family == "nitro_ar" else {}
    if args.filename:
        model_kwargs["filename"] = args.filename
    vae = None if args.output_type == "latent" else args.vae
    pipe = pipe_cls.from_pretrained(
        args.model, args.text_encoder, vae, dtype=DTYPES[args.dtype], device=device, revision=args.revision,
        cache_dir=args.cache_dir, local_files_only=args.local_files_only, **model_kwargs,
    )
    backend = args.backend or ("auto" if args.fast else "reference")
    if backend != "reference":
        from . import fast

        fast.accelerate(pipe.model, backend=None if backend == "auto" else backend, graphs=args.graphs)
    settings = dict(model=str(args.model), variant=args.variant, filename=args.filename, revision=args.revision,
                    text_encoder=str(args.text_encoder), vae=str(vae), dtype=args.dtype, backend=backend)
    summary = generate_to_folder(
        pipe, prompts, args.out, images_per_prompt=args.images_per_prompt, batch_size=args.batch_size, seed=args.seed,
        layout=args.layout, output_type="latent" if args.output_type == "latent" else "pil",
        negative_prompt=args.negative_prompt, process_index=process_index, num_processes=num_processes,
        overwrite=args.overwrite, settings=settings, progress=not args.quiet, **gen_kwargs,
    )
    if not args.quiet:
        print(f"process {process_index + 1}/{num_processes}: {summary.written} written, {summary.skipped} already present, "
              f"{summary.batches} batches -> {args.out}")
    return 0

