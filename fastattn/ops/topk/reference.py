"""Dense reference of top-k: all N×V scores at once, then the ranking rule of `fastattn.ops.topk`."""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def topk_reference(hidden: torch.Tensor, weight: torch.Tensor, k: int, bias: Optional[torch.Tensor] = None,
                   exclude: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N,D), weight (V,D), bias (V,) | None, exclude (N,M) int64 (< 0 unused) → scores (N,k)
    float64 and indices (N,k) int64, ranked by the rule; scores computed in float64."""
    scores = hidden.double() @ weight.double().T
    if bias is not None:
        scores = scores + bias.double()
    scores = torch.where(scores.isnan(), float("-inf"), scores)
    if exclude is not None:
        for row, ids in enumerate(exclude.tolist()):
            scores[row, [i for i in ids if i >= 0]] = float("-inf")
    # Lower id first among equal scores: a stable sort by descending score keeps id order.
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    best = scores.gather(1, order)
    return best, torch.where(best == float("-inf"), -1, order)
