"""The autocast rule of the public ops, written once (`dif_attention`, `full_item_cross_entropy`, `topk_items`).

Under `torch.autocast(device_type, dtype)` each op behaves like torch's own matmul-like ops
(F.linear, F.scaled_dot_product_attention in torch 2.13): its floating inputs on that device type
are cast to `torch.get_autocast_dtype(device_type)`, float64 ones are left alone, integer and bool
ones untouched; the op then runs once more on the cast inputs with autocast disabled, so the
kernels (and the torch reference paths, whose matmuls autocast would otherwise recast) accumulate
in float32 as they do outside autocast. The casts are differentiable: gradients reach float32
parameters in float32. Outputs: attention in the autocast dtype, the cross-entropy loss and
top-k scores in float32 (as F.cross_entropy, on autocast's float32 list).
"""
from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import torch

T = TypeVar("T")


def autocast_device(first: object) -> Optional[str]:
    """first's device type when autocast is enabled for it, else None (also for a non-tensor, which
    the op's own validation then rejects)."""
    if not isinstance(first, torch.Tensor):
        return None
    device_type = first.device.type
    # is_autocast_available guards is_autocast_enabled, which raises for device types without
    # autocast (meta). Dynamo before torch 2.13 cannot trace it (a C builtin): a compiled graph
    # holds cuda/cpu tensors, which have autocast, so it is asked in eager mode only.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    return device_type if torch.is_autocast_enabled(device_type) else None


def autocast_inputs(tensors: Sequence[T], device_type: str) -> list[T]:
    """tensors with every float16/bfloat16/float32 tensor on `device_type` cast to the autocast dtype
    (torch's rule for matmul-like ops); others (float64, integer, bool, None, other devices) as given."""
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if _eligible(t, device_type) else t for t in tensors]  # type: ignore[attr-defined]


def autocast_off(device_type: str) -> torch.autocast:
    """Context manager running the op body on already cast inputs, with autocast disabled."""
    return torch.autocast(device_type, enabled=False)


def _eligible(t: object, device_type: str) -> bool:
    return (isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.dtype != torch.float64
            and t.device.type == device_type)
