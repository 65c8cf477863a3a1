"""python -m fastattn.bench: run the benchmark suite (bench/suite/, pytest-benchmark) and write its reports.

    python -m fastattn.bench [--quick] [--out DIR] [--device auto|cpu|cuda] [-k EXPR] [--time-limit S]

Writes into DIR (default ./bench-out): bench.json (pytest-benchmark's JSON, with the machine
description and the command), bench.md (one table per case: time, speed-up and memory ratio
against the reference measured in the same run) and PNG plots of time and peak memory against
L and V (log scale). --quick shrinks every sweep to a few small sizes (minutes on a 2-core
CPU); --size tiny is the smallest run that still exercises every case (the suite's own test).

The suite lives in the repository's bench/suite/ folder, beside this package (an editable
install, as the README's commands make); an installed wheel without the repository cannot run it.
The one-off studies beside it (bench/studies/) are scripts of their own, not run here.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

SIZES = ("full", "quick", "tiny")
# pytest-benchmark timing per size: full keeps its defaults (1 s of rounds per case); quick and
# tiny trade precision for minutes (tiny only checks that every case runs and reports).
TIMING_ARGS = {
    "full": [],
    "quick": ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3"],
    "tiny": ["--benchmark-max-time=0.0001", "--benchmark-min-rounds=1", "--benchmark-warmup=off"],
}


def suite_dir() -> Path:
    """The repository's bench/suite/ folder (raises with what to do when this is not a checkout)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "suite"
    if not (path / "conftest.py").exists():
        raise FileNotFoundError(f"the benchmark suite is not at {path}: `python -m fastattn.bench` needs the "
                                "repository checkout (git clone, then pip install -e \".[test]\")")
    return path


def run(size: str = "full", out: Path = Path("bench-out"), device: str = "auto", keyword: Optional[str] = None,
        extra_pytest_args: tuple[str, ...] = (), command: Optional[str] = None,
        time_limit: Optional[float] = None) -> int:
    """Run the suite in a child pytest (the sizes are chosen at collection, from the environment),
    then write bench.md and the plots from its JSON. Returns pytest's exit code.

    time_limit: seconds after which no further case starts (the rest skip with that reason)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    bench = suite_dir()
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    env = dict(os.environ, FASTATTN_BENCH_SIZE=size)
    env.pop("FASTATTN_BENCH_DEADLINE", None)
    # Run from a pytest-xdist worker (the test suite's), the child would inherit the worker's
    # variables and pytest-benchmark would turn timing off as if it were a worker itself.
    for name in [n for n in env if n.startswith("PYTEST_XDIST_")]:
        del env[name]
    if time_limit is not None:
        env["FASTATTN_BENCH_DEADLINE"] = repr(time.time() + time_limit)  # read by bench/suite/conftest.py
    if env.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastattn.bench: TRITON_INTERPRET is dropped for the run (the interpreter is no performance provider)")
    args = [sys.executable, "-m", "pytest", str(bench), "--benchmark-only", f"--benchmark-json={json_path}",
            f"--bench-device={device}", "-q", "-rs", "-p", "no:cacheprovider", *TIMING_ARGS[size]]
    if keyword:
        args += ["-k", keyword]
    args += list(extra_pytest_args)
    print("fastattn.bench:", shlex.join(args[1:]), flush=True)
    code = subprocess.call(args, cwd=bench.parents[1], env=env)  # the repository root
    if not json_path.exists() or json_path.stat().st_size == 0:
        print(f"fastattn.bench: pytest wrote no JSON (exit code {code})", file=sys.stderr)
        return code or 1
    data = json.loads(json_path.read_text(encoding="utf-8"))
    data["fastattn_command"] = command or f"python -m fastattn.bench --size {size} --out {out}"
    data["fastattn_size"] = size
    json_path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    sys.path.insert(0, str(bench))
    from report import write_reports  # bench/suite/report.py: reports live with the suite

    for path in write_reports(json_path, out):
        print(f"fastattn.bench: wrote {path}")
    return code


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastattn.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sweeps: minutes on a 2-core CPU (= --size quick)")
    ap.add_argument("--size", choices=SIZES, default=None, help="sweep sizes (default full; see --quick)")
    ap.add_argument("--out", type=Path, default=Path("bench-out"), help="folder of the JSON, table and plots")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="benchmark device: auto = CUDA when available")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression selecting cases")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="start no case later than S seconds into the run (the rest skip); the reports "
                         "still cover what ran")
    args, rest = ap.parse_known_args(argv)
    if args.quick and args.size not in (None, "quick"):
        ap.error("--quick and --size disagree")
    if args.time_limit is not None and not args.time_limit > 0:
        ap.error(f"--time-limit must be a positive number of seconds, got {args.time_limit:g}")
    size = "quick" if args.quick else (args.size or "full")
    command = "python -m fastattn.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    return run(size, args.out, args.device, args.keyword, tuple(rest), command.strip(), args.time_limit)


if __name__ == "__main__":
    raise SystemExit(main())
