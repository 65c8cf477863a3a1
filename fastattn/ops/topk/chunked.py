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
    if h.dtype == torch.float32 and v < _ID_SPAN:
        return _keyed_topk(h, weight, k, bias, exclude)
    best_scores = torch.full((n, 0), float("-inf"), dtype=h.dtype, device=hidden.device)
    best_index = torch.zeros((n, 0), dtype=torch.int64, device=hidden.device)
    for start, stop in item_chunks(n, v):
        scores = _chunk_scores(h, weight, bias, exclude, start, stop)
        top_scores, top_index = _chunk_best(scores, k, start)
        best_scores, best_index = _ranked(torch.cat([best_scores, top_scores], 1),
                                          torch.cat([best_index, top_index], 1), k)
    best_index = torch.where(best_scores == float("-inf"), -1, best_index)
    return best_scores.float(), best_index


def _chunk_scores(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], exclude: Optional[torch.Tensor],
                  start: int, stop: int) -> torch.Tensor:
    """Scores (N, stop-start) of items start..stop in h's dtype, ineligible ones -inf, -0.0 as +0.0."""
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
    return scores


# float32 scores: one int64 key per (row, item) carries the whole ranking rule, so a single
# topk per chunk (and one per merge) replaces the tie-breaking passes and sorts of the float64
# path. key = ordered(score bits) · 2^32 + (2^32 − 1 − id): higher score first, then lower id.
# ordered() maps float32 bit patterns to int32s in the floats' order (negatives: magnitude bits
# flipped). Item ids must fit 32 bits.
_ID_SPAN = 1 << 32
_MAGNITUDE_BITS = 0x7FFFFFFF


def _keyed_topk(h: torch.Tensor, weight: torch.Tensor, k: int, bias: Optional[torch.Tensor],
                exclude: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n, v = h.shape[0], weight.shape[0]
    best = torch.empty((n, 0), dtype=torch.int64, device=h.device)
    for start, stop in item_chunks(n, v):
        bits = _chunk_scores(h, weight, bias, exclude, start, stop).view(torch.int32)
        ordered = torch.where(bits < 0, bits ^ _MAGNITUDE_BITS, bits).to(torch.int64)
        low = (_ID_SPAN - 1) - torch.arange(start, stop, device=h.device)
        keys = ordered * _ID_SPAN + low
        top = keys.topk(min(k, stop - start), dim=1).values
        best = torch.cat([best, top], 1).topk(min(k, best.shape[1] + top.shape[1]), dim=1).values
    ordered = torch.div(best, _ID_SPAN, rounding_mode="floor")  # the score part (low ≥ 0)
    index = (_ID_SPAN - 1) - (best - ordered * _ID_SPAN)
    bits = torch.where(ordered < 0, ordered ^ _MAGNITUDE_BITS, ordered).to(torch.int32)
    scores = bits.view(torch.float32)
    return scores, torch.where(scores == float("-inf"), -1, index)


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
