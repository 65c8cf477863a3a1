"""Opt-in autotuning of the Triton launches over small, listed sets of tile configurations.

By default (FASTATTN_AUTOTUNE unset or "0") every launcher takes its fixed, deterministic choice:
the first candidate of each list, which is the tile table of its op (chosen spill-free from
ptxas, docs/gpu-resources.md). With FASTATTN_AUTOTUNE=1, or inside `autotune(True)`, the first
call of a key on a CUDA device times each candidate and keeps the fastest for the process:

    key = (op, dtype, dot precision, head/hidden dims, flags, bucketed sizes, GPU capability)

Sizes are bucketed to powers of two, so a ragged last batch reuses its neighbours' choice.
Timing runs the candidate's launches once to compile them, then `REPEATS` times between two
CUDA events; the median of `ROUNDS` such rounds is the candidate's time. A candidate the GPU
cannot hold (Triton's OutOfResources: too much shared memory) is skipped. Nothing is timed while
torch.compile traces (fake tensors run nothing) or a CUDA graph is being captured: those calls
use the cached choice or, before any, the fixed one. Different choices can round differently,
so a tuned run is reproducible only with the same cache (`choices()` lists it).
"""
from __future__ import annotations

import contextlib
import os
import statistics
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Optional, Sequence, TypeVar

import torch

ENV = "FASTATTN_AUTOTUNE"
REPEATS = 3
ROUNDS = 3

Candidate = TypeVar("Candidate")
Timer = Callable[[Callable[[], None]], float]

_override: Optional[bool] = None
_timer_override: Optional[Timer] = None
_choices: dict[Hashable, object] = {}


def enabled() -> bool:
    """Whether launchers tune: `autotune(...)` if inside one, else FASTATTN_AUTOTUNE ("0"/unset
    or "1"; anything else raises ValueError naming the variable)."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV, "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV} must be 0 (fixed tiles) or 1 (autotune), got {value!r}")
    return value == "1"


@contextmanager
def autotune(on: bool = True, timer: Optional[Timer] = None) -> Iterator[None]:
    """Tune (or not) inside the block, whatever FASTATTN_AUTOTUNE says. timer: a replacement
    clock, ms per call of its argument (tests: it also lets CPU tensors under Triton's
    interpreter be tuned; the default times CUDA events)."""
    global _override, _timer_override
    previous = _override, _timer_override
    _override, _timer_override = bool(on), timer
    try:
        yield
    finally:
        _override, _timer_override = previous


def choices() -> dict[Hashable, object]:
    """The tuned choices of this process, by key (a copy)."""
    return dict(_choices)


def clear() -> None:
    """Forget every tuned choice (the next call of each key tunes again)."""
    _choices.clear()


def size_bucket(n: int) -> int:
    """n rounded up to a power of two (0 stays 0): the size part of a key."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def device_capability(t: torch.Tensor) -> tuple[int, int]:
    """(major, minor) of t's CUDA device; (0, 0) elsewhere."""
    if t.device.type != "cuda" or not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(t.device)


def cuda_event_timer(run: Callable[[], None]) -> float:
    """Milliseconds per call of `run` (CUDA work on the current stream): compiled and warmed by
    one call, then the median of ROUNDS rounds of REPEATS calls between two events."""
    run()
    rounds = []
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPEATS):
            run()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) / REPEATS)
    return statistics.median(rounds)


def _can_time(probe: torch.Tensor, any_device: bool) -> bool:
    """Whether a call on `probe` may run timing launches: never while torch.compile traces or a
    CUDA graph is captured; on CUDA tensors, or any with a replacement timer (`any_device`)."""
    if torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(probe):
        return False
    if probe.device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return any_device and probe.device.type != "meta"


def _out_of_resources() -> tuple[type[BaseException], ...]:
    from triton.runtime.errors import OutOfResources
    return (OutOfResources,)


def choose(key: Hashable, candidates: Sequence[Candidate], run: Callable[[Candidate], None],
           probe: torch.Tensor) -> Candidate:
    """The candidate launchers use for `key`: candidates[0] (the fixed choice) unless tuning is
    enabled and `probe` (an input of the call) is a real CUDA tensor outside tracing and graph
    capture; then the fastest `run(candidate)` by `cuda_event_timer` (or the `autotune` block's
    timer), cached per key."""
    if not candidates:
        raise ValueError("choose() needs at least one candidate")
    if key in _choices:
        return _choices[key]  # type: ignore[return-value]
    if len(candidates) == 1 or not enabled():
        return candidates[0]
    if not _can_time(probe, any_device=_timer_override is not None):
        return candidates[0]
    timer = _timer_override or cuda_event_timer
    times: list[tuple[float, int]] = []
    skipped = []
    # The events must be recorded on the probe's device (under DDP without set_device the
    # current device is cuda:0 in every process; the launches run on the tensors' device).
    on_device = torch.cuda.device(probe.device) if probe.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        for index, candidate in enumerate(candidates):
            try:
                times.append((timer(lambda: run(candidate)), index))
            except _out_of_resources() as exc:  # more shared memory than this GPU has: not a choice
                skipped.append(f"{candidate}: {exc}")
    if not times:
        raise RuntimeError(f"autotune: no candidate of {key} fits this GPU:\n" + "\n".join(skipped))
    best = candidates[min(times)[1]]
    _choices[key] = best
    return best
