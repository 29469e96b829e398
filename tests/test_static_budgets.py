"""Static GPU budgets of every kernel, checked on CPU: 0 spills and shared memory / LDS within
the device limit, for NVIDIA sm_90 (H100: 227 KiB per block) and AMD gfx942 (MI300X: 64 KiB),
at the default configs and the full-size models' shapes (tests/compile_kernels.py compiles them
through the real launchers). The figures are recorded in bench/results/static-<target>.json by
``python -m tests.compile_kernels --write``; these tests compare with the limits, not the file.
"""
import pytest

from compile_kernels import TARGETS, gfx942_usage, shared_bytes, spills


def _describe(entry):
    flags = ", ".join(f"{k}={v}" for k, v in sorted(entry["constexprs"].items()))
    return f"{entry['kernel']}[warps={entry['num_warps']}, {flags}] at {entry['sites'][0]}"


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_no_kernel_spills(static_reports, target):
    offenders = [f"{_describe(e)}: {spills(e)}" for e in static_reports[target]["kernels"] if spills(e)]
    assert not offenders, "\n".join(offenders)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_shared_memory_within_device_limit(static_reports, target):
    limit = TARGETS[target].shared_per_block
    offenders = [f"{_describe(e)}: {shared_bytes(e)} B > {limit} B" for e in static_reports[target]["kernels"]
                 if shared_bytes(e) > limit]
    assert not offenders, "\n".join(offenders)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_kernel_runs_at_least_one_block_per_multiprocessor(static_reports, target):
    """Registers, shared memory and warps leave room for a block (sm_90) / a wave per SIMD
    (gfx942): occupancy is recorded and positive for every compiled kernel."""
    report = static_reports[target]
    assert report["kernels"]
    offenders = [_describe(e) for e in report["kernels"] if not e["occupancy"]]
    assert not offenders, "\n".join(offenders)


AMDGCN_METADATA = """
; Occupancy: 4
  .amdhsa_kernel demo
      .agpr_count:     6
      .group_segment_fixed_size: 8192
      .private_segment_fixed_size: 16
      .sgpr_count:     40
      .sgpr_spill_count: 0
      .vgpr_count:     120
      .vgpr_spill_count: 3
"""


class _Kernel:
    asm = {"amdgcn": AMDGCN_METADATA}

    class metadata:
        shared = 4096


def test_amdgcn_metadata_is_read_and_spills_counted():
    entry = gfx942_usage(_Kernel, TARGETS["gfx942"])
    assert (entry["vgprs"], entry["agprs"], entry["sgprs"], entry["lds_bytes"]) == (120, 6, 40, 8192)
    assert entry["waves_per_simd"] == 4 and entry["occupancy"] == 0.5
    assert spills(entry) == 3 + 16  # spilled VGPRs and scratch bytes both break the budget
    assert spills(dict(entry, vgpr_spills=0, scratch_bytes=0)) == 0
