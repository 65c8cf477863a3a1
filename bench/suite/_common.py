"""Helpers shared by the benchmark suites (attention, cross-entropy).

Nothing here knows about a particular op: a suite builds a forward closure and its inputs,
and `run_benchmark` warms it up, measures peak memory once, then hands a synchronized step
of the chosen mode (fwd, bwd or fwd+bwd) to pytest-benchmark.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import time
from typing import Any, Callable, Optional, Sequence

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

MODES = ("fwd", "bwd", "fwd+bwd")
_MB = 2.0 ** 20

Forward = Callable[[], torch.Tensor]
Step = Callable[[], None]


# --------------------------------------------------------------------------- sweep sizes

# "full" (default): the sizes the reports are made with; "quick": a few small sizes, so that
# `python -m fastattn.bench --quick` runs the whole suite in minutes on a 2-core CPU; "tiny":
# the smallest sizes that still exercise every case (tests/test_bench_suite.py). Chosen by
# FASTATTN_BENCH_SIZE, which `python -m fastattn.bench` sets; read at collection time, since
# the sizes are pytest parameters.
SIZES = ("full", "quick", "tiny")


def bench_size() -> str:
    size = os.environ.get("FASTATTN_BENCH_SIZE", "full")
    if size not in SIZES:
        raise ValueError(f"FASTATTN_BENCH_SIZE must be one of {SIZES}, got {size!r}")
    return size


def sweep(full: Sequence[Any], quick: Sequence[Any], tiny: Sequence[Any]) -> tuple[Any, ...]:
    """The sweep of the current size mode (see SIZES)."""
    return tuple({"full": full, "quick": quick, "tiny": tiny}[bench_size()])


# --------------------------------------------------------------------------- device and timing


def resolve_device(choice: str = "auto") -> torch.device:
    """"auto" → CUDA when present, else CPU; "cuda" without a GPU skips rather than crashes."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device=cuda but torch sees no CUDA device")
    return torch.device(choice)


def triton_unavailable(device: torch.device) -> Optional[str]:
    """Why Triton kernels (ours or a library's) are no performance provider here, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return ("TRITON_INTERPRET is set: the Triton interpreter is a correctness tool, not a "
                "performance provider (run the benchmarks without it)")
    if device.type != "cuda":
        return "the Triton kernels need a CUDA GPU (on CPU they only run in the interpreter)"
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels: CUDA launches are asynchronous, so an unsynchronized timer
    would measure launch time only. A no-op on CPU, where ops run eagerly."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(mode: str, forward: Forward, inputs: Sequence[torch.Tensor], device: torch.device) -> Step:
    """A callable that runs one `mode` pass and waits for it to finish.

    Gradients are taken with `torch.autograd.grad` instead of `.backward()` so repeated rounds
    do not accumulate into `.grad` (an extra add per input that no provider should pay for) and
    no state survives a round. In "bwd" the graph is built here, once, outside the timed
    region, and every round re-runs the backward with retain_graph=True.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    inputs = tuple(inputs)
    if mode == "fwd":
        def step() -> None:
            forward()
            synchronize(device)
        return step

    out = forward()
    # A fixed upstream gradient: random, so no provider can shortcut a zero or constant dout.
    gen = torch.Generator(device=out.device).manual_seed(1234)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
    if mode == "bwd":
        def step() -> None:
            torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
            synchronize(device)
        return step

    out = None  # fwd+bwd rebuilds the graph every round; do not keep one alive beside it

    def step() -> None:
        torch.autograd.grad(forward(), inputs, grad_out)
        synchronize(device)
    return step


# --------------------------------------------------------------------------- training steps
# A training step (loss, backward, optimizer) is timed as a whole, not through make_step's modes.

HEAVY_SECONDS = 1.0  # a call or step slower than this gets HEAVY_ROUNDS fixed rounds instead of pytest-benchmark's calibration
HEAVY_ROUNDS = 3


def training_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
                  fused_adam: bool = False) -> Step:
    """One synchronized step: zero_grad(set_to_none), loss_fn().backward(), Adam (lr 1e-3)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused_adam or None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
        synchronize(device)
    return step


def time_training_step(benchmark: BenchmarkFixture, step: Step, device: torch.device, group: str,
                       info: dict[str, Any]) -> None:
    """Warm up, record peak memory and metadata (mode "train_step"), then time `step`."""
    skip_reason = None
    try:
        warmup = _timed_call(step)  # first-call allocations, Adam state, Triton compilation
    except torch.OutOfMemoryError as exc:
        skip_reason = f"out of memory on {device}: {_first_line(exc)}"
    # Skip outside the except block: a chained error would keep the failed step's tensors alive.
    if skip_reason is not None:
        pytest.skip(skip_reason)
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark.extra_info["mode"] = "train_step"
    benchmark.extra_info["device"] = str(device)
    start = time.perf_counter()
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory_mb(step, device), 3)
    # The faster of the two untimed calls estimates a step: the warm-up may include compilation
    # (CUDA), the peak-memory call runs under the profiler (CPU).
    if min(warmup, time.perf_counter() - start) > HEAVY_SECONDS:
        benchmark.pedantic(step, rounds=HEAVY_ROUNDS, iterations=1)
    else:
        benchmark(step)


def _timed_call(step: Step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- peak memory


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """MiB allocated at the peak of one `fn()` call, above what was allocated when it started.

    So inputs (and in "bwd" the saved graph) are not counted; the result is the working memory
    of the call itself, comparable across providers and across devices.

    - CUDA: the caching allocator's own counters (memory_allocated / max_memory_allocated).
    - CPU: torch keeps no allocator statistics, and RSS is process-wide and monotonic, so one
      call runs under torch.profiler(profile_memory=True): every allocation and free of the CPU
      allocator (eager ops, autograd, Inductor buffers alike) is an event with a signed byte
      count; the peak of their running sum in time order is the peak extra memory.
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / _MB
    return _cpu_peak_bytes(fn) / _MB


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto_results is the raw event stream; the aggregated EventList has no allocation order.
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    peak = current = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


# --------------------------------------------------------------------------- torch.compile


def compile_for_bench(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile(fn) as a benchmark provider; pair it with `COMPILE_FAILURE` in skip_on.

    - dynamic=False: each benchmarked shape gets its own specialized kernels, the best case
      for the compiled baseline.
    - fail_on_recompile_limit_hit: past dynamo's recompile limit torch would silently run the
      function eagerly, and eager timings would be reported as compiled ones.
    Compilation happens on the first call, i.e. in `run_benchmark`'s untimed warm-up.
    """
    import torch._dynamo

    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False)


# torch.compile takes 10–30 s per shape and mode to compile (more on CUDA, with autotuning): it is
# benchmarked in training mode (fwd+bwd) only, so the whole suite fits a lent GPU's few minutes.
COMPILE_MODES = ("fwd+bwd",)
COMPILE_MODE_SKIP = ("torch.compile is benchmarked in fwd+bwd only (compiling every shape for every mode "
                     "would take most of the suite's time)")

# Any error in the first (compiling) call means torch.compile cannot serve here: skip, not fail.
COMPILE_FAILURE: tuple[type[BaseException], str] = (Exception, "torch.compile failed on this machine")


# --------------------------------------------------------------------------- the benchmark call


def run_benchmark(
    benchmark: BenchmarkFixture,
    *,
    mode: str,
    forward: Forward,
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    group: str,
    extra_info: dict[str, Any],
    skip_on: Sequence[tuple[type[BaseException], str]] = (),
    check: Optional[Callable[[], None]] = None,
    warmup: int = 2,
    rounds: Optional[int] = None,
) -> None:
    """Warm up, check, record peak memory and metadata, then time `mode` with pytest-benchmark.

    Warm-up matters: the first call compiles (torch.compile, Triton autotuning) and grows the
    CUDA caching allocator, and neither belongs in a steady-state timing.
    skip_on: (exception type, reason) pairs; such an error during warm-up means the provider
        cannot run here, so the case is skipped with the reason instead of failing. Running out
        of memory always skips.
    check: optional untimed correctness check run after warm-up (a wrong provider must not
        produce a timing); it raises on a mismatch.
    warmup: calls before the check; 0 where nothing warms up (CPU eager ops): the untimed
        peak-memory call then is the only call before the timed rounds.
    rounds: a fixed number of timed rounds (one call each) instead of pytest-benchmark's
        calibration (which spends an extra call), for cases whose call takes seconds.
    FASTATTN_BENCH_WARM_ONLY=1 (bench/gpu.sh's warm stage): one call, then return: the kernels
    are compiled and cached, nothing is checked or timed.
    """
    skip_reason = None
    per_call = 0.0
    warm_only = os.environ.get("FASTATTN_BENCH_WARM_ONLY", "0") not in ("", "0")
    try:
        step = make_step(mode, forward, inputs, device)
        for _ in range(1 if warm_only else warmup):
            per_call = _timed_call(step)  # the last one: compiled, allocator grown
    except torch.OutOfMemoryError as exc:
        skip_reason = f"out of memory on {device}: {_first_line(exc)}"
    except Exception as exc:
        skip_reason = next((f"{reason}: {type(exc).__name__}: {_first_line(exc)}"
                            for exc_type, reason in skip_on if isinstance(exc, exc_type)), None)
        if skip_reason is None:
            raise
    # Skip outside the except block: a skip raised inside it would chain the error, whose
    # traceback keeps the failed call's tensors (GBs of GPU memory) alive for the session.
    if skip_reason is not None:
        pytest.skip(skip_reason)
    if warm_only:  # bench/gpu.sh's warm stage: one call compiles every kernel of the case; no timing
        return
    if rounds is None and per_call > HEAVY_SECONDS:
        rounds = HEAVY_ROUNDS  # calibration would add calls of seconds each
    if (reason := _past_deadline(per_call, rounds)) is not None:
        pytest.skip(reason)
    if check is not None:
        check()
    benchmark.group = group
    benchmark.extra_info.update(extra_info)
    benchmark.extra_info["mode"] = mode
    benchmark.extra_info["device"] = str(device)
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory_mb(step, device), 3)
    if rounds is None:
        benchmark(step)
    else:
        benchmark.pedantic(step, rounds=rounds, iterations=1)


def _past_deadline(per_call: float, rounds: Optional[int]) -> Optional[str]:
    """Why this case would end past FASTATTN_BENCH_DEADLINE (`python -m fastattn.bench
    --time-limit`, bench/suite/conftest.py), or None. Estimated from one warm call: the check, the
    peak-memory call and the timed rounds (pytest-benchmark's minimum of 5 when calibrating). A
    case of seconds per call (a library at V=1M) is skipped here instead of overrunning a slot."""
    deadline = os.environ.get("FASTATTN_BENCH_DEADLINE")
    if not deadline or per_call <= 0:
        return None
    calls = 2 + (rounds if rounds is not None else 5)
    left = float(deadline) - time.time()
    if per_call * calls <= left:
        return None
    return (f"the run's time limit (--time-limit) would pass during this case: ~{calls} more calls of "
            f"{per_call:.2f} s, {max(left, 0):.0f} s left")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# --------------------------------------------------------------------------- machine description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def machine_description() -> dict[str, Any]:
    """What a reader needs to trust (or discount) a number: hardware and software versions."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(affinity) if affinity is not None else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def describe_machine(d: Optional[dict[str, Any]] = None) -> str:
    """One line of a machine description (default: this machine's) for report headers."""
    d = machine_description() if d is None else d
    gpu = d["gpu"] or "no GPU"
    return (f"{d['cpu_model']} ({d['cpu_cores_usable']}/{d['cpu_cores']} cores, {d['torch_threads']} torch "
            f"threads), {gpu}; torch {d['torch']}, triton {d['triton']}, CUDA {d['cuda']}")
