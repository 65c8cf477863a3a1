"""Value checks that never synchronise a device.

Reading a CUDA tensor's value on the host (`bool(t.any())`, `.item()`, `int(t.max())`) waits for
every queued kernel; in a training step that leaves the GPU idle between launches and forbids
CUDA-graph capture. So a check of tensor *values* (not shapes) runs only where it is free:

- CPU tensors, eagerly: checked at once; a failure raises `error(detail())` (one line, it may
  quote the offending value).
- CUDA tensors, and CPU tensors while torch.compile traces: `torch._assert_async`, a device-side
  assert with the fixed `message` (it fails the step at the device's next sync, and keeps a
  compiled graph whole).
- Any other device (meta): nothing is read and nothing is checked.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["check_values", "eager_host_checks", "is_finite_number"]


def is_finite_number(x: float) -> bool:
    """math.isfinite for a Python float that torch.compile may trace as a SymFloat (Dynamo marks a
    float argument dynamic once it recompiles, and cannot trace math.isfinite): comparisons only."""
    return bool(x == x and abs(x) != math.inf)


def eager_host_checks(device: torch.device) -> bool:
    """True where reading a tensor value costs nothing: CPU tensors, outside torch.compile tracing."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def check_values(ok: Callable[[], torch.Tensor], device: torch.device, message: str, *,
                 error: type[Exception] = ValueError, detail: Optional[Callable[[], str]] = None) -> None:
    """Require the 0-dim bool tensor ok() to be True, without a device sync (module docstring).

    ok is only called where the check runs; detail() (default: message) is only called on a CPU failure.
    """
    if eager_host_checks(device):
        if not bool(ok()):
            raise error(detail() if detail is not None else message)
    elif device.type in ("cuda", "cpu"):
        torch._assert_async(ok(), message)
