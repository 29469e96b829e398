"""Launch-config lists and the persisted tuning cache (nitro_ar.kernels.tuning)."""
import json
import multiprocessing
import os
import warnings

import pytest
import torch

from nitro_ar.errors import TuningCacheError
from nitro_ar.kernels import tuning
from nitro_ar.kernels.backend import HIP_MAX_WARPS, HIP_ONLY_KEYS, DeviceInfo, validate_config

OPS = tuning.registered_ops()
FAKE_GPU = DeviceInfo("cuda", "Fake GPU 9000 80GB", "sm_90")
# Representative architectures whose defaults must be valid for their vendor.
ARCHES = {"cuda": ["sm_80", "sm_90", "sm_100"], "hip": ["gfx90a", "gfx942", "gfx950"]}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty user cache and no packaged files; parsed tables and warnings forgotten."""
    monkeypatch.setenv(tuning.ENV_TUNING_DIR, str(tmp_path / "user"))
    monkeypatch.setattr(tuning, "PACKAGED_DIR", tmp_path / "packaged")
    tuning.clear_cache()
    yield tmp_path / "user"
    tuning.clear_cache()


def test_kernel_ops_are_registered():
    assert {"modulated_norm", "modulated_norm_backward"} <= set(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_hip_configs_valid_for_hip(name):
    op = OPS[name]
    configs = op.configs("hip") + [op.default("hip", arch) for arch in ARCHES["hip"]]
    assert configs
    for config in configs:
        validate_config(config, "hip")
        assert config.get("num_warps", 4) <= HIP_MAX_WARPS
        assert config.get("num_stages", 1) <= 2, f"HIP has 64 KiB of LDS; deep pipelines overflow it: {config}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_cuda_configs_free_of_hip_keys(name):
    op = OPS[name]
    configs = op.configs("cuda") + [op.default("cuda", arch) for arch in ARCHES["cuda"]]
    assert configs
    for config in configs:
        validate_config(config, "cuda")
        assert not set(HIP_ONLY_KEYS) & set(config), config


def test_broken_kernel_module_leaves_the_others(monkeypatch):
    monkeypatch.setattr(tuning, "KERNEL_MODULES", ["nitro_ar.kernels.no_such_kernel", *tuning.KERNEL_MODULES])
    assert "modulated_norm" in tuning.registered_ops()


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.ENV_TUNING_DIR, str(tmp_path))
    assert tuning.cache_dir() == tmp_path
    monkeypatch.delenv(tuning.ENV_TUNING_DIR)
    assert tuning.cache_dir().parts[-3:] == (".cache", "nitro_ar", "tuning")


def test_file_name_keys_device_and_triton():
    name = tuning.tuning_file_name(FAKE_GPU)
    assert name.startswith("Fake_GPU_9000_80GB__triton-") and name.endswith(".json")


def test_cpu_gets_the_interpreter_default(cache):
    op = OPS["modulated_norm"]
    assert tuning.get_config("modulated_norm", torch.device("cpu"), "any") == op.default("cpu", "cpu")
    assert not cache.exists()


def test_missing_file_warns_once(cache):
    op = OPS["modulated_norm"]
    with pytest.warns(UserWarning, match="no tuned kernel configs"):
        assert tuning.get_config("modulated_norm", FAKE_GPU, "d1024_r512") == op.default("cuda", "sm_90")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuning.get_config("modulated_norm_backward", FAKE_GPU, "d1024_r512")


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"ops": {"modulated_norm": 3}}', ""])
def test_corrupt_file_warns_once_and_uses_defaults(cache, content):
    cache.mkdir(parents=True)
    (cache / tuning.tuning_file_name(FAKE_GPU)).write_text(content)
    op = OPS["modulated_norm"]
    with pytest.warns(UserWarning, match="unreadable"):
        assert tuning.get_config("modulated_norm", FAKE_GPU, "d1024_r512") == op.default("cuda", "sm_90")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.get_config("modulated_norm", FAKE_GPU, "d1024_r512") == op.default("cuda", "sm_90")


def test_stored_winner_is_used_and_corrupt_file_is_replaced(cache):
    cache.mkdir(parents=True)
    (cache / tuning.tuning_file_name(FAKE_GPU)).write_text("{not json")
    winner = dict(TILE_ELEMENTS=1024, num_warps=2, num_stages=1)
    with pytest.warns(UserWarning, match="replacing unreadable"):
        path = tuning.store_configs(FAKE_GPU, {"modulated_norm": {"d1024_r512": {"config": winner, "ms": 0.01}}})
    document = json.loads(path.read_text())
    assert document["device"] == FAKE_GPU.name and document["arch"] == "sm_90"
    assert tuning.get_config("modulated_norm", FAKE_GPU, "d1024_r512") == winner
    # other buckets and ops still get their defaults
    assert tuning.get_config("modulated_norm", FAKE_GPU, "d64_r64") == OPS["modulated_norm"].default("cuda", "sm_90")


def test_user_cache_wins_over_packaged_files(cache, tmp_path):
    packaged = {"modulated_norm": {"shipped": {"config": dict(TILE_ELEMENTS=4096, num_warps=8, num_stages=1)},
                                   "both": {"config": dict(TILE_ELEMENTS=4096, num_warps=8, num_stages=1)}}}
    tuning.store_configs(FAKE_GPU, packaged, directory=tmp_path / "packaged")
    mine = dict(TILE_ELEMENTS=1024, num_warps=2, num_stages=1)
    tuning.store_configs(FAKE_GPU, {"modulated_norm": {"both": {"config": mine}}})
    assert tuning.get_config("modulated_norm", FAKE_GPU, "both") == mine
    assert tuning.get_config("modulated_norm", FAKE_GPU, "shipped")["TILE_ELEMENTS"] == 4096


def test_config_invalid_for_vendor_is_ignored(cache):
    hip_config = dict(TILE_ELEMENTS=1024, num_warps=2, num_stages=1, waves_per_eu=2)
    tuning.store_configs(FAKE_GPU, {"modulated_norm": {"b": {"config": hip_config}}})
    with pytest.warns(UserWarning, match="HIP-only"):
        assert tuning.get_config("modulated_norm", FAKE_GPU, "b") == OPS["modulated_norm"].default("cuda", "sm_90")


def _write_buckets(directory, worker, count, start):
    """One process of the concurrency test: ``count`` separate merges into the shared file."""
    start.wait()
    for index in range(count):
        config = dict(TILE_ELEMENTS=1024, num_warps=2, num_stages=1)
        tuning.store_configs(FAKE_GPU, {"modulated_norm": {f"w{worker}_b{index}": {"config": config, "ms": index}}},
                             directory=directory)


def test_concurrent_writers_keep_every_entry(tmp_path):
    """Processes released together each merge their own buckets: none is lost, the file stays valid."""
    workers, count = 4, 10
    # fork starts in milliseconds; the children only touch files, never torch.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    start = context.Barrier(workers)
    processes = [context.Process(target=_write_buckets, args=(tmp_path, worker, count, start))
                 for worker in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    document = json.loads((tmp_path / tuning.tuning_file_name(FAKE_GPU)).read_text())
    buckets = document["ops"]["modulated_norm"]
    assert set(buckets) == {f"w{worker}_b{index}" for worker in range(workers) for index in range(count)}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU that is not there: one registered toy op whose timings favour 4 warps and whose
    8-warp config fails, as an out-of-resources config would."""

    def bench(shape, config, device):
        if config["num_warps"] == 8:
            raise RuntimeError("out of resources")
        return shape["rows"] / config["num_warps"]

    op = tuning.TunableOp(
        name="toy",
        configs=lambda vendor: [dict(num_warps=warps, num_stages=1) for warps in (1, 2, 4, 8)],
        default=lambda vendor, arch: dict(num_warps=1, num_stages=1),
        shapes=lambda shape_set: [dict(rows=64), dict(rows=128)] if shape_set == "nitro-ar" else [dict(rows=4096)],
        bucket=lambda shape: "small" if shape["rows"] < 1000 else "large",
        bench=bench,
    )
    monkeypatch.setitem(tuning._REGISTRY, op.name, op)
    monkeypatch.setattr(tuning, "registered_ops", lambda: {op.name: op})
    monkeypatch.setattr(tuning, "device_info", lambda device: FAKE_GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return op


def test_run_autotune_records_the_fastest_config_per_bucket(cache, fake_gpu):
    results = tuning.run_autotune(None, "all", "cuda")
    assert set(results["toy"]) == {"small", "large"}
    assert all(entry["config"]["num_warps"] == 4 for entry in results["toy"].values())
    assert results["toy"]["small"]["ms"] == pytest.approx((64 + 128) / 2 / 4)
    assert tuning.get_config("toy", FAKE_GPU, "large") == dict(num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="unknown ops"):
        tuning.run_autotune(["no_such_op"], "all", "cuda")


def test_cli_tunes_on_a_gpu(cache, fake_gpu, capsys):
    assert tuning.main(["--ops", "toy", "--shapes", "nitro-e"]) == 0
    assert "large" in capsys.readouterr().out
    assert (cache / tuning.tuning_file_name(FAKE_GPU)).exists()


def test_run_autotune_needs_a_gpu(cache):
    with pytest.raises(RuntimeError, match="autotuning needs a CUDA or ROCm GPU"):
        tuning.run_autotune(None, "all", torch.device("cpu"))
    assert not cache.exists()


# Without a GPU even the default device must be refused; with one, only an explicit CPU device.
CLI_ARGS = [["--device", "cpu"], ["--ops", "modulated_norm", "--shapes", "nitro-e", "--device", "cpu"]]
if not torch.cuda.is_available():
    CLI_ARGS += [[], ["--shapes", "nitro-ar"]]


@pytest.mark.parametrize("argv", CLI_ARGS, ids=lambda argv: " ".join(argv) or "defaults")
def test_cli_on_cpu_exits_nonzero_and_writes_nothing(cache, capsys, argv):
    assert tuning.main(argv) != 0
    assert "autotuning needs a CUDA or ROCm GPU" in capsys.readouterr().err
    assert not cache.exists()


# --------------------------------------------------------------------------------------------
# malformed files and entries (property-based), strict JSON, crash safety of the writer
# --------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 64), st.floats(allow_nan=True), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)
# A file whose ops / bucket / entry level (or the whole document) is arbitrary JSON.
documents = st.one_of(
    json_values,
    st.builds(lambda ops: {"ops": ops}, json_values),
    st.builds(lambda buckets: {"ops": {"modulated_norm": buckets}}, json_values),
    st.builds(lambda entry: {"ops": {"modulated_norm": {"d1024_r512": entry}}}, json_values),
    st.builds(lambda config, ms: {"ops": {"modulated_norm": {"d1024_r512": {"config": config, "ms": ms}}}},
              st.dictionaries(st.sampled_from(["TILE_ELEMENTS", "num_warps", "num_stages", "waves_per_eu"]), json_values),
              json_values),
)


def _strict(text):
    def refuse(constant):
        raise ValueError(f"bare {constant} in the file")
    return json.loads(text, parse_constant=refuse)


@FUZZ
@given(document=documents, raw=st.booleans())
def test_malformed_tuning_files_never_stop_get_config(cache, document, raw):
    tuning.clear_cache()
    cache.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document) if not raw else json.dumps(document)[: max(1, len(json.dumps(document)) // 2)]
    (cache / tuning.tuning_file_name(FAKE_GPU)).write_text(text)
    default = OPS["modulated_norm"].default("cuda", "sm_90")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = tuning.get_config("modulated_norm", FAKE_GPU, "d1024_r512")
    assert isinstance(config, dict)
    if config != default:  # a tuned entry was used: it must be a well-formed, valid one
        entry = document["ops"]["modulated_norm"]["d1024_r512"]
        assert tuning._entry_problem(entry) is None and config == entry["config"]
        validate_config(config, "cuda")


def test_malformed_entry_warns_once_and_the_others_still_work(cache):
    good = dict(TILE_ELEMENTS=1024, num_warps=2, num_stages=1)
    cache.mkdir(parents=True)
    (cache / tuning.tuning_file_name(FAKE_GPU)).write_text(json.dumps({"ops": {"modulated_norm": {
        "bad": {"config": {"num_warps": "four"}}, "worse": [1, 2], "good": {"config": good, "ms": 0.1}}}}))
    default = OPS["modulated_norm"].default("cuda", "sm_90")
    for bucket in ("bad", "worse"):
        with pytest.warns(UserWarning, match=f"malformed tuned entry of modulated_norm \\[{bucket}\\]"):
            assert tuning.get_config("modulated_norm", FAKE_GPU, bucket) == default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.get_config("modulated_norm", FAKE_GPU, "good") == good


@pytest.mark.parametrize("ms", [float("nan"), float("inf"), -1.0, "fast"])
def test_non_finite_timings_are_refused_and_nothing_is_written(cache, ms):
    config = dict(TILE_ELEMENTS=1024, num_warps=2, num_stages=1)
    with pytest.raises(TuningCacheError, match=r"modulated_norm \[b\].*'ms'"):
        tuning.store_configs(FAKE_GPU, {"modulated_norm": {"b": {"config": config, "ms": ms}}})
    assert not (cache / tuning.tuning_file_name(FAKE_GPU)).exists()


def test_merging_over_a_file_with_bare_nan_writes_strict_json(cache):
    """Files of older versions hold bare NaN timings: their entries are dropped on the next write."""
    cache.mkdir(parents=True)
    path = cache / tuning.tuning_file_name(FAKE_GPU)
    path.write_text('{"ops": {"modulated_norm": {"old": {"config": {"num_warps": 2}, "ms": NaN}}}}')
    config = dict(TILE_ELEMENTS=1024, num_warps=2, num_stages=1)
    with pytest.warns(UserWarning, match=r"dropping malformed entries.*modulated_norm \[old\]"):
        tuning.store_configs(FAKE_GPU, {"modulated_norm": {"new": {"config": config, "ms": 0.5}}})
    assert _strict(path.read_text())["ops"] == {"modulated_norm": {"new": {"config": config, "ms": 0.5}}}


def test_nan_timings_never_win_autotuning(cache, fake_gpu):
    # The NaN comes first: min() over timings with a NaN first would keep it.
    fake_gpu.bench = lambda shape, config, device: float("nan") if config["num_warps"] == 1 else 1.0 / config["num_warps"]
    results = tuning.run_autotune(["toy"], "nitro-ar", "cuda")
    assert results["toy"]["small"] == {"config": dict(num_warps=8, num_stages=1), "ms": 1.0 / 8}
    _strict((cache / tuning.tuning_file_name(FAKE_GPU)).read_text())


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_tuning_file_mode_follows_the_umask_and_no_temporary_is_left(cache, mask):
    old = os.umask(mask)
    try:
        path = tuning.store_configs(FAKE_GPU, {"modulated_norm": {"b": {"config": dict(num_warps=2), "ms": 1.0}}})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.name + ".lock"])
