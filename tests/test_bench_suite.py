"""The benchmark suite cannot rot: `python -m fastattn.bench --size tiny` runs every case and reports,
the report arithmetic is right, and the performance section of docs/benchmarks.md is the committed
results'. The suite is bench/suite/ (bench/studies/ holds the one-off studies, not tested here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "suite"))

import report  # noqa: E402  (bench/suite/report.py)

# Every op the suite must measure (bench/README.md / issue 9): a missing one means a suite file broke.
EXPECTED_OPS = {
    "dif_attention", "attention", "dif_attention+acd", "full_item_cross_entropy", "soft_cross_entropy",
    "topk_items", "recbole_sasrec", "torch_mha_sasrec",
    *(f"train_step_{m}" for m in ("sasrec", "difsr", "mqsa_ted", "man", "autocdsr", "autocdsr_plus")),
}


STRAY_BEFORE: list = []


def _stat(path: Path) -> object:
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    STRAY_BEFORE.append(_stat(ROOT / "bench.md"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fastattn.bench", "--size", "tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_tiny_suite_writes_nothing_into_the_checkout(tiny_run: Path) -> None:
    # The per-run .md belongs beside the JSON; pytest-benchmark 5 passes the JSON path as a Path,
    # whose .name once sent the report to the suite's working directory (the repo root).
    assert (tiny_run / "bench.md").exists()
    assert _stat(ROOT / "bench.md") == STRAY_BEFORE[0], "the bench run wrote bench.md into the repository root"


def test_tiny_suite_runs_every_op_and_reports(tiny_run: Path) -> None:
    data = json.loads((tiny_run / "bench.json").read_text())
    ops = {b["extra_info"]["op"] for b in data["benchmarks"]}
    assert EXPECTED_OPS <= ops, f"ops missing from the suite: {sorted(EXPECTED_OPS - ops)}"
    for b in data["benchmarks"]:
        info = b["extra_info"]
        assert {"provider", "mode", "device", "peak_mem_mb"} <= info.keys(), b["name"]
        assert b["stats"]["median"] > 0
    assert data["machine_info"]["fastattn"]["torch"]
    assert data["fastattn_size"] == "tiny" and data["fastattn_command"].startswith("python -m fastattn.bench")
    md = (tiny_run / "bench.md").read_text()
    assert "Machine: " in md and "speed-up vs torch" in md and "speed-up vs naive" in md
    # the compiled training step of every model, against its eager step (issue 16)
    compiled = {b["extra_info"]["op"] for b in data["benchmarks"] if b["extra_info"]["provider"] == "compiled"}
    assert compiled == {f"train_step_{m}" for m in ("sasrec", "difsr", "mqsa_ted", "man", "autocdsr", "autocdsr_plus")}
    assert "speed-up vs eager" in md
    plots = {p.name for p in tiny_run.glob("*.png")}
    assert "dif_attention-fwd_bwd-vs-L.png" in plots and "full_item_cross_entropy-fwd_bwd-vs-V.png" in plots


def _case(group: str, provider: str, median: float, peak: float, **info: object) -> dict:
    return {"name": f"{group}-{provider}", "group": group, "stats": {"median": median, "min": median, "rounds": 3},
            "extra_info": {"op": "op", "provider": provider, "mode": "fwd", "peak_mem_mb": peak, **info}}


def _json(*cases: dict) -> dict:
    machine = {"cpu_model": "CPU X", "cpu_cores": 4, "cpu_cores_usable": 4, "torch_threads": 4, "gpu": "GPU Y",
               "torch": "2.x", "triton": "3.x", "cuda": "12"}
    return {"benchmarks": list(cases), "machine_info": {"fastattn": machine}, "fastattn_command": "python -m fastattn.bench"}


def test_ratios_are_against_the_reference_of_the_same_run() -> None:
    data = _json(_case("g L=8", "torch", 0.4, 100.0, L=8), _case("g L=8", "cpp", 0.1, 25.0, L=8),
                 _case("h", "sdpa", 0.2, 1.0))
    md = report.markdown_report(data)
    assert "CPU X" in md and "GPU Y" in md  # the JSON's machine, not the one reading it
    assert "| cpp | 100.000 | 100.000 | 4.00× | 25.0 | 4.00× | 3 |" in md
    assert "| torch | 400.000 | 400.000 | 1.00× | 100.0 | 1.00× | 3 |" in md
    assert "| sdpa | 200.000 | 200.000 | — | 1.0 | — | 3 |" in md  # no reference in its group: no ratio
    summary = "\n".join(report.summary_table(data, "x.json"))
    assert "| g L=8 | torch | 400.0 ms | cpp 4.00×, 4.00× |" in summary


def test_plots_sweep_l_and_v(tmp_path: Path) -> None:
    data = _json(*(_case(f"g L={n}", p, n * t, n * 1.0, L=n) for n in (8, 64) for p, t in (("torch", 2.0), ("cpp", 1.0))),
                 _case("one", "torch", 1.0, 1.0, V=10))  # a single size: no plot
    paths = report.plots(data, tmp_path)
    assert [p.name for p in paths] == ["op-fwd-vs-L.png"] and paths[0].stat().st_size > 0


def test_docs_update_replaces_only_the_marked_section(tmp_path: Path) -> None:
    results = tmp_path / "results" / "suite-cpu"
    results.mkdir(parents=True)
    cases = (_case("g", "torch", 0.4, 4.0, mode="fwd+bwd"), _case("g", "cpp", 0.2, 1.0, mode="fwd+bwd"),
             _case("f", "torch", 0.4, 4.0), _case("f", "cpp", 0.2, 1.0))  # fwd alone: not in the README
    (results / "bench.json").write_text(json.dumps(_json(*cases)))
    (tmp_path / "docs").mkdir()
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.write_text(f"before\n{report.DOCS_BEGIN}\nold\n{report.DOCS_END}\nafter\n")
    assert report.update_docs(docs, tmp_path / "results")
    text = docs.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old" not in text
    assert "| g | torch | 400.0 ms | cpp 2.00×, 4.00× |" in text and "| f |" not in text
    assert not report.update_docs(docs, tmp_path / "results")  # idempotent
    with pytest.raises(ValueError, match="no performance markers"):
        (tmp_path / "plain.md").write_text("x")
        report.update_docs(tmp_path / "plain.md")


def test_docs_update_links_plots_from_the_file_and_takes_the_old_marker(tmp_path: Path) -> None:
    """Plot links are relative to the file written (docs/ is one level down), and a section still
    under an older begin marker (README.md's `--readme README.md` one) is found and re-marked."""
    results = tmp_path / "bench" / "results" / "suite-cpu"
    results.mkdir(parents=True)
    cases = [_case(f"g L={n}", p, n * t, 1.0, L=n, mode="fwd+bwd") for n in (8, 64) for p, t in (("torch", 2.0), ("cpp", 1.0))]
    (results / "bench.json").write_text(json.dumps(_json(*cases)))
    report.plots(_json(*cases), results)
    (tmp_path / "docs").mkdir()
    docs = tmp_path / "docs" / "benchmarks.md"
    old = "<!-- performance: generated by `python bench/report.py --readme README.md` from bench/results; edit there -->"
    docs.write_text(f"# Benchmarks\n{old}\nold\n{report.DOCS_END}\n")
    assert report.update_docs(docs, tmp_path / "bench" / "results")
    text = docs.read_text()
    assert old not in text and report.DOCS_BEGIN in text
    assert "](../bench/results/suite-cpu/op-fwd_bwd-vs-L.png)" in text


def test_docs_performance_section_is_generated_from_committed_results() -> None:
    docs = ROOT / "docs" / "benchmarks.md"
    assert docs.exists(), "docs/benchmarks.md (the README's former Benchmarks section) is missing"
    text = docs.read_text()
    stale = "docs/benchmarks.md's performance section is stale: run `python bench/suite/report.py --docs docs/benchmarks.md`"
    assert report.DOCS_BEGIN in text, stale
    start = text.index(report.DOCS_BEGIN)
    end = text.index(report.DOCS_END) + len(report.DOCS_END)
    assert text[start:end] == report.docs_section(target=docs), stale


def test_bench_folder_collects_the_suite_and_no_study() -> None:
    """`pytest bench/` collects bench/suite/bench_*.py (suite/conftest.py) and nothing of
    bench/studies/, whose one-off scripts are no pytest files."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=dict(os.environ, FASTATTN_BENCH_SIZE="tiny"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    suite = {f"bench/suite/{p.name}" for p in (ROOT / "bench" / "suite").glob("bench_*.py")}
    assert files == suite and len(suite) >= 6, sorted(files ^ suite)
    assert not list((ROOT / "bench" / "studies").glob("test_*.py"))
    assert not list((ROOT / "bench" / "studies").glob("bench_*.py"))


def test_bench_module_errors() -> None:
    from fastattn import bench

    with pytest.raises(ValueError, match="size must be one of"):
        bench.run(size="huge")
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--size", "tiny"])


def test_time_limit_skips_the_cases_past_it_and_keeps_the_rest() -> None:
    """`--time-limit`: bench/suite/conftest.py skips every case that would start after the deadline,
    naming the reason, and the cases before it run (here: a deadline already passed, so none)."""
    env = dict(os.environ, FASTATTN_BENCH_SIZE="tiny", FASTATTN_BENCH_DEADLINE="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "bench" / "suite" / "bench_cross_entropy.py"), "-q",
                           "-rs", "-p", "no:cacheprovider", "--bench-device=cpu", "-k", "topk and naive"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "time limit (python -m fastattn.bench --time-limit) was reached" in proc.stdout
    assert " passed" not in proc.stdout


def test_time_limit_estimate_skips_a_case_that_would_overrun(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import _common  # bench/suite/_common.py

    monkeypatch.setenv("FASTATTN_BENCH_DEADLINE", repr(time.time() + 10))
    assert _common._past_deadline(0.01, None) is None  # 7 calls of 10 ms fit in 10 s
    reason = _common._past_deadline(3.0, 3)  # 5 calls of 3 s do not
    assert reason is not None and "would pass during this case" in reason
    monkeypatch.delenv("FASTATTN_BENCH_DEADLINE")
    assert _common._past_deadline(100.0, 3) is None  # no limit set


def test_bench_cli_rejects_a_non_positive_time_limit() -> None:
    proc = subprocess.run([sys.executable, "-m", "fastattn.bench", "--time-limit", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--time-limit must be a positive number of seconds" in proc.stderr
