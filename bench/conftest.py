"""Benchmark fixtures, and the report written after a benchmark run.

Convention: a pytest-benchmark ``group`` is one case (op and shape, or model and batch), and
each implementation in it is named by an ``impl`` parameter or ``extra_info["impl"]``:
"eager" (the reference), "compile", "fast", "fast+graphs", "sdpa", ...

After ``pytest bench --benchmark-only`` the results land in ``bench/out/<device>.json``
(untracked; device, torch/triton versions, commit, every benchmark with its extra info and the
versions it ran with, speed-ups of each implementation over the eager reference in the same
group) and a PNG chart of the speed-ups beside it (log axis, each bar labelled). A partial run
replaces only its own records. ``NITRO_AR_BENCH_RESULTS`` names another folder:
``make bench UPDATE_RESULTS=1`` (and ``make gpu-check``) set it to the committed ``bench/results/``.
"""
import datetime
import json
import os
import re
from pathlib import Path

import pytest
import torch

from benchutil import ON_GPU, bench_device, commit, device_name


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


def _results_dir() -> Path:
    return Path(os.environ.get("NITRO_AR_BENCH_RESULTS") or Path(__file__).parent / "out")


def _impl_and_case(bench) -> tuple:
    """(implementation, case): a benchmark group is one case compared side by side; the
    implementation is ``extra_info["impl"]`` or the ``impl`` parameter (default "eager")."""
    impl = bench.extra_info.get("impl") or (bench.params or {}).get("impl") or "eager"
    return str(impl), bench.group or bench.name


def speedups(records: list) -> dict:
    """{case: {impl: eager_mean / impl_mean}} for every timed case that has an eager run (records
    with ``extra_info["timed"] = False``, counts such as kernels per image, have no speed-up)."""
    by_case = {}
    for rec in records:
        if rec.get("extra_info", {}).get("timed", True):
            by_case.setdefault(rec["case"], {})[rec["impl"]] = rec["mean_s"]
    out = {}
    for case, impls in by_case.items():
        base = impls.get("eager")
        if base:
            out[case] = {impl: round(base / t, 3) for impl, t in impls.items() if impl != "eager" and t > 0}
    return {k: v for k, v in out.items() if v}


def _chart(table: dict, title: str, file: Path) -> None:
    """Horizontal bars of every speed-up on a log axis (a 28x bar and a 0.9x bar both stay
    readable), each labelled with its value; green at or above 1x, red below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [(case, impl, s) for case, impls in sorted(table.items()) for impl, s in sorted(impls.items())]
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.32 * len(rows) + 1)))
    labels = [f"{case} [{impl}]" for case, impl, _ in rows]
    values = [s for _, _, s in rows]
    # Bars grow from 1x (no change): right for speed-ups, left for slow-downs.
    bars = ax.barh(range(len(rows)), [v - 1.0 for v in values], left=1.0,
                   color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_xscale("log")
    low, high = min(values + [1.0]), max(values + [1.0])
    ax.set_xlim(low / 1.6, high * 1.9)  # room for the labels beyond the longest bars
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200) if low / 1.6 <= t <= high * 1.9])
    ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], padding=3, fontsize=7)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up over the eager reference (x, log scale)")
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or bs.disabled or not bs.benchmarks:
        return
    records = []
    for bench in bs.benchmarks:
        if not bench.stats:
            continue
        impl, case = _impl_and_case(bench)
        records.append(dict(name=bench.name, group=bench.group, case=case, impl=impl, mean_s=bench.stats.mean,
                            min_s=bench.stats.min, rounds=bench.stats.rounds, extra_info=dict(bench.extra_info)))
    if not records:
        return
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = bench_device()
    name = device_name(dev)
    versions = dict(torch=torch.__version__, triton=triton_version, hip=getattr(torch.version, "hip", None),
                    cuda=torch.version.cuda, commit=commit(),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for rec in records:
        rec.update(versions)
    out_dir = _results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    file = out_dir / f"{stem}.json"
    # A partial run (one file, -k) updates its own records and keeps the others.
    try:
        previous = json.loads(file.read_text()).get("results", []) if file.is_file() else []
    except (OSError, ValueError):
        previous = []
    fresh = {rec["name"] for rec in records}
    records = [rec for rec in previous if rec.get("name") not in fresh] + records
    report = dict(device=name, **versions, config="full size" if ON_GPU else "reduced configs (CPU)",
                  results=records, speedups=speedups(records))
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, file)
    if report["speedups"]:
        _chart(report["speedups"], f"nitro-ar on {name} (torch {torch.__version__}, triton {triton_version})", out_dir / f"{stem}.png")
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write_line(f"\nnitro-ar: results written to {out_dir / stem}.json (+ .png); speed-ups over eager:")
        for case, impls in sorted(report["speedups"].items()):
            terminal.write_line(f"  {case}: " + ", ".join(f"{k} {v:.2f}x" for k, v in sorted(impls.items())))
