"""Adversarial input at the public entry points ends in a named error (the nitro_ar.errors
family), never a raw traceback: malformed config.json, damaged checkpoints, command lines.
Property-based (hypothesis); every case also checks that nothing half-written is left."""
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from factories import tiny_ar, tiny_ar_config
from nitro_ar import NitroAR, NitroARConfig, NitroEConfig
from nitro_ar.cli import main
from nitro_ar.errors import CheckpointError, ConfigError, NitroARError
from nitro_ar.kernels import atomic_files

ROOT = Path(__file__).resolve().parents[1]
# One block per group: loading is construction-bound, and the errors do not depend on depth.
SMALL = dict(block_groups=(1, 1, 1))
# The suite's profile (12 examples) for cases that load a model; more where a case is cheap.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CHEAP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON values of every kind, kept small (a huge but well-typed size would only be slow).
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model: its folder, config dict and state dict."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    model = tiny_ar("gan", **SMALL)
    model.save_pretrained(folder)
    return folder, json.loads((folder / "config.json").read_text()), model.state_dict()


def no_temporaries(folder):
    return not [p for p in Path(folder).rglob("*") if atomic_files.is_temp(p)]


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def _expected_ok(field, value) -> bool:
    """Whether ``value`` is an accepted value of NitroARConfig ``field`` (type and range only)."""
    kind = {f.name: f.type for f in NitroARConfig.__dataclass_fields__.values()}[field]
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok and (value > 0 if field in ("shift", "scaling_factor") else True)
    if kind == "bool":
        return isinstance(value, bool)
    return True


SCALAR_FIELDS = sorted(name for name, f in NitroARConfig.__dataclass_fields__.items() if f.type in ("int", "float", "bool"))


@CHEAP
@given(field=st.sampled_from(SCALAR_FIELDS), value=json_values)
def test_config_fields_of_the_wrong_type_or_range_are_named(field, value):
    data = tiny_ar_config("joint_gan").to_dict()
    data[field] = value
    if _expected_ok(field, value):
        try:
            NitroARConfig.from_dict(data)
        except ConfigError:
            pass  # well-typed but inconsistent with another field (e.g. heads x width)
        return
    with pytest.raises(ConfigError) as err:
        NitroARConfig.from_dict(data)
    assert f"{field}=" in str(err.value) and "expected" in str(err.value)


@CHEAP
@given(document=json_values)
def test_any_json_document_as_a_config_is_a_config_error_or_a_config(document):
    for cls in (NitroARConfig, NitroEConfig):
        try:
            config = cls.from_dict(document)
        except ConfigError:
            continue
        assert isinstance(config, cls)


def test_shift_zero_and_nan_are_refused():
    for value in (0, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"shift=.* expected a finite number > 0"):
            NitroARConfig(shift=value)
    with pytest.raises(ConfigError, match="block_groups"):
        NitroARConfig.from_dict({"block_groups": "4,16,4"})
    with pytest.raises(ConfigError, match="unknown NitroEConfig fields: \\['colour'\\]"):
        NitroEConfig.from_dict({"colour": 1})


@FUZZ
@given(mutation=st.one_of(
    st.tuples(st.just("set"), st.sampled_from(SCALAR_FIELDS + ["block_groups", "qk_norm", "variant", "asa_pattern"]),
              json_values),
    st.tuples(st.just("drop"), st.sampled_from(SCALAR_FIELDS), st.none()),
    st.tuples(st.just("whole"), st.none(), json_values),
    st.tuples(st.just("text"), st.none(), st.sampled_from(["", "{", "nul\x00", "[1, 2", "\xff\xfe"]))))
def test_malformed_config_json_gives_a_named_error(saved, tmp_path_factory, mutation):
    folder, config, _ = saved
    work = tmp_path_factory.mktemp("cfg")
    for name in ("model.safetensors",):
        os.link(folder / name, work / name)
    kind, key, value = mutation
    data = dict(config)
    if kind == "set":
        data[key] = value
    elif kind == "drop":
        data.pop(key, None)
    if kind == "text":
        (work / "config.json").write_text(value, errors="surrogateescape")
    else:
        (work / "config.json").write_text(json.dumps(value if kind == "whole" else data))
    try:
        model = NitroAR.from_pretrained(work)
    except NitroARError as err:
        assert isinstance(err, (ConfigError, CheckpointError)) and str(err)
        if isinstance(err, ConfigError) and kind == "set" and isinstance(data.get(key), (int, float)):
            assert str(work / "config.json") in str(err)
    else:  # the mutation was harmless (e.g. a sampling default changed): the weights are intact
        assert model.config.inner_dim == 64


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def _write_state(state, file):
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return file


@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_truncated_checkpoint_is_a_checkpoint_error(saved, tmp_path_factory, cut):
    _, _, state = saved
    file = _write_state(state, tmp_path_factory.mktemp("cut") / "m.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError):
        NitroAR.from_pretrained(file)


@FUZZ
@given(data=st.data())
def test_damaged_tensors_are_named(saved, tmp_path_factory, data):
    _, _, state = saved
    state = dict(state)
    key = data.draw(st.sampled_from(sorted(state)))
    damage = data.draw(st.sampled_from(["nan", "inf", "int", "shape", "drop", "extra"]))
    tensor = state[key].clone()
    if damage in ("nan", "inf"):
        tensor.view(-1)[data.draw(st.integers(0, tensor.numel() - 1))] = float(damage)
        state[key] = tensor
    elif damage == "int":
        state[key] = tensor.to(torch.int32)
    elif damage == "shape":
        state[key] = torch.zeros(*[s + 1 for s in tensor.shape]) if tensor.dim() else torch.zeros(2)
    elif damage == "drop":
        del state[key]
    else:
        state["extra.weight"] = tensor
    file = _write_state(state, tmp_path_factory.mktemp("bad") / "m.safetensors")
    try:
        NitroAR.from_pretrained(file, config=tiny_ar_config("gan", **SMALL))
    except CheckpointError as err:
        assert (key if damage != "extra" else "extra.weight") in str(err)
        if damage in ("nan", "inf"):
            assert "non-finite" in str(err)
    else:
        pytest.fail(f"{damage} damage of {key} was accepted")
    # Without a config the structure is inferred first: still a named error, never a KeyError.
    with pytest.raises(CheckpointError):
        NitroAR.from_pretrained(file)


def test_nan_weights_load_when_allowed(saved, tmp_path):
    _, _, state = saved
    state = dict(state, **{"x_proj.bias": torch.full_like(state["x_proj.bias"], float("nan"))})
    file = _write_state(state, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"non-finite weights.*x_proj\.bias.*allow_nonfinite=True"):
        NitroAR.from_pretrained(file)
    assert NitroAR.from_pretrained(file, allow_nonfinite=True).x_proj.bias.isnan().all()


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("x_proj.weight"), "no tensor x_proj.weight"),
    (lambda s: s.update({"x_proj.weight": torch.zeros(64)}), r"x_proj.weight has shape \(64,\)"),
    (lambda s: s.update({"block_groups.0.0.attn.norm_q.weight": torch.zeros(0)}), "norm_q.weight has shape"),
    (lambda s: s.update({"block_groups.0.0.attn.norm_q.weight": torch.zeros(48)}), "no valid configuration"),
    (lambda s: s.pop("context_embedder.weight"), "no tensor context_embedder.weight"),
])
def test_config_inference_validates_before_reading_shapes(saved, tmp_path, change, message):
    _, _, state = saved
    state = dict(state)
    change(state)
    with pytest.raises(CheckpointError, match=message):
        NitroAR.from_pretrained(_write_state(state, tmp_path / "m.safetensors"))


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def garbage(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "garbage.safetensors").write_bytes(b"\x00garbage")
    (folder / "prompts.txt").write_bytes(b"\xff\xfe\x00")
    return folder


TOKENS = ["generate", "convert", "info", "--model", "--text-encoder", "--vae", "--prompt", "a fox", "--steps",
          "--head-steps", "--cfg", "--seed", "--device", "--dtype", "--variant", "--prompts-file", "--to", "nan", "inf",
          "0", "-1", "2.9", "11", "bf16", "fp8", "gan", "joint", "cpu", "gpu:x", "official", "@GARBAGE", "@PROMPTS",
          "@MISSING", "@DIR", "-v", "--verbose", "--bogus", "--"]


def _run_cli(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.sampled_from(TOKENS), min_size=0, max_size=8))
def test_command_lines_end_in_one_error_line(garbage, capsys, tokens):
    paths = {"@GARBAGE": garbage / "garbage.safetensors", "@PROMPTS": garbage / "prompts.txt",
             "@MISSING": garbage / "missing", "@DIR": garbage}
    argv = [str(paths.get(token, token)) for token in tokens]
    before = sorted(p.name for p in garbage.iterdir())
    code, lines = _run_cli(argv, capsys)
    if code == 0:  # e.g. `info` alone, or `--help`
        return
    assert len(lines) == 1 and lines[0].startswith("nitro-ar: error: "), (argv, lines)
    assert "Traceback" not in lines[0] and code == 2, (argv, code, lines)
    assert sorted(p.name for p in garbage.iterdir()) == before


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--model", "@MISSING", "--text-encoder", "/no/such/llama", "--prompt", "a"], "no checkpoint at"),
    (["generate", "--model", "@GARBAGE", "--text-encoder", "@DIR", "--vae", "@GARBAGE", "--prompt", "a"],
     "not a readable safetensors"),
    (["generate", "--model", "m", "--text-encoder", "x", "--vae", "y", "--cfg", "nan"], "--cfg: 'nan' is not accepted"),
    (["generate", "--model", "m", "--text-encoder", "x", "--vae", "y", "--steps", "0"], "--steps: '0' is not accepted"),
    (["info", "@GARBAGE"], "not a readable safetensors"),
    (["info", "--device", "gpu:x"], "--device: 'gpu:x' is not accepted"),
    (["-v", "autotune", "--device", "cpu"], "autotune: autotuning needs a CUDA or ROCm GPU"),
    (["-v", "--verbose", "convert", "@MISSING", "@DIR/out"], "no checkpoint at"),
])
def test_named_cli_errors(garbage, capsys, argv, expected):
    argv = [a.replace("@DIR", str(garbage)).replace("@GARBAGE", str(garbage / "garbage.safetensors"))
            .replace("@MISSING", str(garbage / "missing")) for a in argv]
    code, lines = _run_cli(argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nitro-ar: error: "), lines
    assert re.search(expected, lines[0]), lines[0]


def test_debug_shows_the_traceback(garbage):
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        main(["--debug", "info", str(garbage / "garbage.safetensors")])


def test_verbose_train_reaches_the_trainer_and_fails_in_one_line(tmp_path):
    """`nitro-ar -v train ...` used to die with "'Namespace' object has no attribute 'func'"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "nitro_ar.cli", "-v", "train", "--data-dir", str(tmp_path / "none"),
                           "--output-dir", str(tmp_path / "out"), "--max-steps", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nitro-ar: error: max_steps must be >= 1, got 0" in lines[0], lines
