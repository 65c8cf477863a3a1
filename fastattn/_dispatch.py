"""Backend choice. "auto" picks the fastest backend that can run; an explicit backend that
cannot run raises `BackendUnavailable` naming the reason — never a silent fallback."""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

BACKENDS = ("auto", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says why."""


def triton_interpreted() -> bool:
    """Triton runs kernels on CPU tensors only in interpreter mode (set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """None if the Triton kernels can run on these tensors, else the reason they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it ships Linux wheels only: pip install triton)"
    device = tensors[0].device
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return (f"the Triton kernels need CUDA tensors (got {device.type}); on a CPU they run only "
                "in the interpreter, with TRITON_INTERPRET=1 set before triton is imported")
    if any(t.dtype == torch.float64 for t in tensors):
        return "the Triton kernels take float32, float16 or bfloat16 (float64 runs on backend='torch')"
    return None


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor], extra_reason: str | None = None) -> str:
    """Return "triton" or "torch" for these inputs.

    extra_reason: an op-specific reason the Triton kernels cannot take these inputs (e.g. a
    head dim too wide), or None.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    reason = triton_unavailable_reason(tensors) or extra_reason
    if backend == "triton":
        if reason is not None:
            raise BackendUnavailable(f"backend='triton' cannot run: {reason}")
        return "triton"
    if backend == "auto" and tensors[0].device.type == "cuda" and reason is None:
        return "triton"
    return "torch"
