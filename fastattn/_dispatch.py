"""Backend choice. "auto" picks the fastest backend that can run; an explicit backend that
cannot run raises `BackendUnavailable` naming the reason — never a silent fallback."""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

from .ops import cpp_extension

BACKENDS = ("auto", "triton", "cpp", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says why."""


# Decided once at import for torch.compile's trace (importlib cannot run there); eager calls look again.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_interpreted() -> bool:
    """Triton runs kernels on CPU tensors only in interpreter mode (set before import)."""
    if torch.compiler.is_compiling():
        return _TRITON_INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """None if the Triton kernels can run on these tensors, else the reason they cannot."""
    if not _TRITON_INSTALLED:
        return "triton is not installed (it ships Linux wheels only: pip install triton)"
    device = tensors[0].device
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return (f"the Triton kernels need CUDA tensors (got {device.type}); on a CPU they run only "
                "in the interpreter, with TRITON_INTERPRET=1 set before triton is imported")
    if any(t.dtype == torch.float64 for t in tensors):
        return "the Triton kernels take float32, float16 or bfloat16 (float64 runs on backend='torch')"
    return None


# The C++ extension's availability, decided once at import: loading it is not traceable
# (importlib, lru_cache), so torch.compile reads this constant. Eager calls ask the loader each
# time (cached there), which lets a test stand in for a missing compiler.
_CPP_BUILD_REASON = cpp_extension.cpp_unavailable_reason()


def _cpp_build_reason() -> str | None:
    if torch.compiler.is_compiling():
        return _CPP_BUILD_REASON
    return cpp_extension.cpp_unavailable_reason()


def cpp_unavailable_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """None if the C++ CPU kernels can run on these tensors, else the reason they cannot."""
    if tensors[0].device.type != "cpu":
        return f"the C++ kernels run on CPU tensors (got {tensors[0].device.type})"
    return _cpp_build_reason()


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor], extra_reason: str | None = None) -> str:
    """Return "triton", "cpp" or "torch" for these inputs.

    "auto": Triton for CUDA tensors, the C++ kernels for CPU tensors (built on first use), else
    the torch implementation. extra_reason: an op-specific reason the Triton kernels cannot
    take these inputs (e.g. a head dim too wide), or None.

    No size enters the choice: on a CPU the C++ kernels measured faster than the torch ones at
    every size of every op (attention L 1–2048 with 1 and 2 threads, cross-entropy and top-k at
    every catalog size; docs/benchmarks.md, "backend="auto" on a CPU: the crossover per op").
    An op that loses somewhere gets its measured crossover here, never a silent slow path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton" or (backend == "auto" and tensors[0].device.type == "cuda"):
        reason = triton_unavailable_reason(tensors) or extra_reason
        if reason is None:
            return "triton"
        if backend == "triton":
            raise BackendUnavailable(f"backend='triton' cannot run: {reason}")
        return "torch"
    reason = cpp_unavailable_reason(tensors)
    if reason is None:
        return "cpp"
    if backend == "cpp":
        raise BackendUnavailable(f"backend='cpp' cannot run: {reason}")
    return "torch"
