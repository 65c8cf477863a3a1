"""The torch backend of top-k: eager torch ops over chunks of items (never an N×V buffer),
following the ranking rule of `fastattn.ops.topk`. Sync-free and of static shapes (no boolean
indexing), so torch.compile traces it whole and a CUDA step never waits on the host."""
from __future__ import annotations

from typing import Optional

import torch

from .._common import in_compute_dtype, item_chunks


@torch.no_grad()
def chunked_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, bias: Optional[torch.Tensor],
                 exclude: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N,D), weight (V,D), exclude (N,M) int64 (< 0: unused) → scores (N,k) fp32, indices (N,k).

    Ranks by the module's rule (ineligible: excluded, NaN or -inf; ties: lower item id first).
    Extra memory is a few (N, chunk) buffers: the chunk's scores and two int64 prefix counts.
    """
    n, v = hidden.shape[0], weight.shape[0]
    h = in_compute_dtype(hidden)
    best_scores = torch.full((n, 0), float("-inf"), dtype=h.dtype, device=hidden.device)
    best_index = torch.zeros((n, 0), dtype=torch.int64, device=hidden.device)
    for start, stop in item_chunks(n, v):
        scores = h @ weight[start:stop].to(h.dtype).T
        if bias is not None:
            scores += bias[start:stop].to(h.dtype)
        # -0.0 → +0.0 (CUDA's radix sort would order it below +0.0, breaking the tie rule); NaN → ineligible.
        scores = torch.where(scores.isnan(), float("-inf"), scores + 0.0)
        if exclude is not None:
            # Excluded ids of this chunk → -inf by a scatter (amin with +inf leaves the rest as is),
            # not by boolean indexing, whose result size depends on the data.
            hit = (exclude >= start) & (exclude < stop)
            col = (exclude - start).clamp(0, stop - start - 1)
            scores.scatter_reduce_(1, col, torch.where(hit, float("-inf"), float("inf")).to(scores.dtype),
                                   reduce="amin")
        top_scores, top_index = _chunk_best(scores, k, start)
        best_scores, best_index = _ranked(torch.cat([best_scores, top_scores], 1),
                                          torch.cat([best_index, top_index], 1), k)
    best_index = torch.where(best_scores == float("-inf"), -1, best_index)
    return best_scores.float(), best_index


def _chunk_best(scores: torch.Tensor, k: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, c) best entries of each row of scores (N, c) (item ids start.. start+c), in item
    order: all above the k-th best score, then the lowest ids among those equal to it (topk alone
    may pick any of them). Sync-free: exactly that many are taken per row."""
    n, c = scores.shape
    k = min(k, c)
    kth = scores.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above, tied = scores > kth, scores == kth
    take = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
    slot = torch.where(take, take.cumsum(1) - 1, k)  # the rest go to a spare column k, dropped
    ids = torch.arange(start, start + c, device=scores.device).expand(n, c)
    return (scores.new_empty(n, k + 1).scatter_(1, slot, scores)[:, :k],
            ids.new_empty(n, k + 1).scatter_(1, slot, ids)[:, :k])


def _ranked(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k first of (scores, index) (N, m), both (N, m), by score descending then id ascending."""
    order = index.argsort(dim=1, stable=True)
    scores, index = scores.gather(1, order), index.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), index.gather(1, order)
