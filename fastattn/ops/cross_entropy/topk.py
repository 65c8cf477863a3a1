"""Exact top-k items of the full catalog, chunked over items (never an N×V buffer)."""
from __future__ import annotations

from typing import Optional

import torch

from .chunked import item_chunks


@torch.no_grad()
def chunked_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, bias: Optional[torch.Tensor],
                 exclude: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N,D), weight (V,D), exclude (N,M) int64 (< 0: unused) → scores (N,k) fp32, indices (N,k).

    Scores are h·E_j + b_j. Rows with fewer than k eligible items get score -inf and index -1
    in the tail.
    """
    n, v = hidden.shape[0], weight.shape[0]
    h32 = hidden.float()
    best_scores = torch.full((n, 0), float("-inf"), device=hidden.device)
    best_index = torch.zeros((n, 0), dtype=torch.int64, device=hidden.device)
    rows = torch.arange(n, device=hidden.device)
    for start, stop in item_chunks(n, v):
        scores = h32 @ weight[start:stop].float().T
        if bias is not None:
            scores += bias[start:stop].float()
        if exclude is not None:
            hit = (exclude >= start) & (exclude < stop)
            scores[rows[:, None].expand_as(exclude)[hit], exclude[hit] - start] = float("-inf")
        top = scores.topk(min(k, stop - start), dim=1)
        merged_scores = torch.cat([best_scores, top.values], dim=1)
        merged_index = torch.cat([best_index, top.indices + start], dim=1)
        keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_index = keep.values, merged_index.gather(1, keep.indices)
    best_index = torch.where(torch.isinf(best_scores), torch.full_like(best_index, -1), best_index)
    return best_scores, best_index
