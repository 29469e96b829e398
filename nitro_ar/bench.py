"""``nitro-ar bench``: run the benchmark suite of a source checkout and print the speed-ups.

The suite lives in the repository's ``bench/`` folder (pytest-benchmark); this wraps
``pytest bench --benchmark-only`` for a one-line report. Results go to the untracked ``bench/out/``
(``NITRO_AR_BENCH_RESULTS=bench/results`` updates the committed ones).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List, Optional


def find_bench_dir() -> Optional[Path]:
    """The ``bench/`` folder beside the installed package (an editable install or checkout)."""
    candidate = Path(__file__).resolve().parent.parent / "bench"
    return candidate if (candidate / "conftest.py").is_file() else None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nitro-ar bench", description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="keyword", help="only benchmarks matching this pytest -k expression")
    parser.add_argument("--bench-dir", help="the bench/ folder (default: the source checkout's)")
    args, rest = parser.parse_known_args(argv)
    bench_dir = Path(args.bench_dir) if args.bench_dir else find_bench_dir()
    if bench_dir is None:
        print("nitro-ar bench: the benchmark suite ships with the source checkout; clone the repository and "
              "`pip install -e .[dev]`, or pass --bench-dir", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "--benchmark-only", "-q", "-p", "no:cacheprovider"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    return subprocess.call(cmd + rest)


if __name__ == "__main__":
    sys.exit(main())
