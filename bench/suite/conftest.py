"""pytest set-up of the benchmark suite (bench/suite/).

- Collects `bench_*.py` here without touching the repo's pytest config: pyproject.toml keeps
  testpaths = ["tests"] and the default test_*.py pattern, so `pytest` / `pytest tests` never
  see the benchmarks, while `pytest bench/suite` (or `pytest bench/`) does: this conftest is only
  loaded then. The suite's own options (--bench-device) need bench/suite, or a file in it, on the
  command line: pytest reads a conftest's options only from the folders it is given and their
  parents, and `pytest bench/` finds this one during collection, with the defaults.
- Skips the cases that would start after FASTATTN_BENCH_DEADLINE (a Unix time, set by
  `python -m fastattn.bench --time-limit`): a run with a fixed slot, a lent GPU's, still ends
  with its JSON and reports of what it measured.
- Puts the machine description into the header and into the JSON's machine_info, and writes
  a markdown table next to `--benchmark-json PATH` (PATH with .md).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from fastattn.ops import autotune

# bench/suite/ is not a package; pytest's default import mode puts it on sys.path, but
# --import-mode=importlib does not, and the suites import their helpers as `_common`.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from _common import describe_machine, machine_description, resolve_device
from report import markdown_report


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-device", choices=("auto", "cpu", "cuda"), default="auto",
        help="device of the benchmarks: auto = CUDA when available, else CPU",
    )


def pytest_configure(config: pytest.Config) -> None:
    # torch.compile's own imports use torch.jit.script_method; the deprecation is torch's to fix,
    # and 14 copies of it would bury the tables.
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_runtest_setup(item: pytest.Item) -> None:
    deadline = os.environ.get("FASTATTN_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the run's time limit (python -m fastattn.bench --time-limit) was reached before this case")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Optional[pytest.Module]:
    # Files named on the command line are already collected by pytest's own hook whatever
    # their name; collecting them here too would run every benchmark twice.
    is_bench = file_path.suffix == ".py" and file_path.name.startswith("bench_")
    if is_bench and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"fastattn bench machine: {describe_machine()}"]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    machine_info["fastattn"] = machine_description()


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    # What the timings ran with: fixed tiles, or the choices FASTATTN_AUTOTUNE=1 made (per key).
    output_json["fastattn_autotune"] = {
        "enabled": autotune.enabled(),
        "choices": [{"key": repr(key), "choice": repr(choice)} for key, choice in autotune.choices().items()],
    }
    json_file = config.getoption("benchmark_json", None)
    if json_file is not None:
        # pytest-benchmark 5 hands over a Path (older versions an opened file): Path.name is only the
        # file name, so read .name from file objects alone, or the .md lands in the working directory.
        path = json_file if isinstance(json_file, (str, os.PathLike)) else json_file.name
        md_path = Path(path).with_suffix(".md")
        md_path.write_text(markdown_report(output_json), encoding="utf-8")


@pytest.fixture(scope="session")
def bench_device(pytestconfig: pytest.Config) -> torch.device:
    return resolve_device(pytestconfig.getoption("--bench-device"))
