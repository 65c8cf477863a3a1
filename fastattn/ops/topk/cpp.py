"""The C++ top-k kernel (csrc/cross_entropy.cpp, operator `fastattn::topk_items`) and its fake."""
from __future__ import annotations

from typing import Optional

import torch

from ..cpp_extension import cpp_ops, cpp_unavailable_reason


@torch.no_grad()
def cpp_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, bias: Optional[torch.Tensor],
             exclude: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N,D), weight (V,D), bias (V,) | None, exclude (N,M) int64 (< 0: unused) → scores (N,k)
    float32 and indices (N,k) int64, best first, by the ranking rule of `fastattn.ops.topk`."""
    return cpp_ops().topk_items(hidden, weight, k, bias, exclude)


def _register_fake() -> None:
    @torch.library.register_fake("fastattn::topk_items")
    def _topk_items_fake(hidden: torch.Tensor, weight: torch.Tensor, k: int, bias: Optional[torch.Tensor],
                         exclude: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        return hidden.new_empty((n, k), dtype=torch.float32), hidden.new_empty((n, k), dtype=torch.int64)


# Once per process, at import: the operator must exist before its fake can be attached.
if cpp_unavailable_reason() is None:
    _register_fake()
