"""Vocab-parallel exact top-k: each rank ranks its own rows of the table, the ranks' candidates
are all-gathered and merged.

A rank's top-min(k, V_r) (fastattn.topk_items on its shard, ids offset to global, padded to k
with (-inf, -1)) holds every item of the global top-k that lies in its shard, so the merged
top-k is exact. Ties: topk_items puts equal scores in ascending item id; the ranks' candidates
are concatenated in rank order (ascending id ranges), so a stable descending sort keeps equal
scores in ascending global id — the same order as topk_items on the whole table.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .._autocast import autocast_device, autocast_inputs, autocast_off
from ..functional import topk_items
from .collectives import all_gather_tensor
from .cross_entropy import check_table
from .shard import ItemShard, _check_shard_type, _dtype_code, check_layout

__all__ = ["vocab_parallel_topk"]

# The dtype of topk_items' scores: float32 for every input dtype (float64 inputs included, though
# its docstring says float64 for them; the merge itself runs in float64 for those).
_SCORE_DTYPE = torch.float32


def _check_exclude(exclude: object, hidden: torch.Tensor, num_items: int) -> None:
    if not isinstance(exclude, torch.Tensor) or exclude.dtype != torch.int64:
        raise TypeError("exclude must be an int64 tensor of global item ids (-1 for unused slots)")
    if exclude.shape[:-1] != hidden.shape[:-1] or exclude.dim() != hidden.dim():
        raise ValueError(f"exclude must have shape {(*hidden.shape[:-1], 'M')}, got {tuple(exclude.shape)}")
    if exclude.device != hidden.device:
        raise ValueError(f"exclude is on {exclude.device} but hidden is on {hidden.device}")
    message = f"exclude holds item ids >= {num_items} (the number of items)"
    if exclude.device.type == "cpu":
        if exclude.numel() and bool((exclude >= num_items).any()):
            raise ValueError(message)
    else:  # no host sync on a device: an asynchronous device assert, as fastattn.topk_items does
        torch._assert_async((exclude < num_items).all(), message)


def _local_topk(h2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                exclude: Optional[torch.Tensor], shard: ItemShard) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's top-min(k, V_r) per row with global ids, padded to (N, k) with (-inf, -1).
    Scores in the ranking dtype (float64 for float64 inputs, else float32)."""
    n, size = h2.shape[0], weight.shape[0]
    dtype = torch.float64 if h2.dtype == torch.float64 else torch.float32
    scores = torch.full((n, k), float("-inf"), dtype=dtype, device=h2.device)
    ids = torch.full((n, k), -1, dtype=torch.int64, device=h2.device)
    take = min(k, size)
    if take == 0 or n == 0:
        return scores, ids
    local_exclude = None
    if exclude is not None:  # global ids → this shard's ids, -1 (ignored) for the other shards'
        inside = (exclude >= shard.start) & (exclude < shard.stop)
        local_exclude = torch.where(inside, exclude - shard.start, -1)
    got, index = topk_items(h2, weight, take, bias=bias, exclude=local_exclude)
    if dtype == torch.float64:
        # topk_items ranks float64 inputs in float64 but returns float32 scores: the merge needs the
        # float64 ones (two items whose scores round to one float32 must keep their order).
        safe = index.clamp_min(0)
        exact = (h2[:, None, :] * weight[safe]).sum(-1) + (bias[safe] if bias is not None else 0.0)
        got = torch.where(index >= 0, exact, float("-inf"))
    scores[:, :take] = got
    ids[:, :take] = torch.where(index >= 0, index + shard.start, -1)
    return scores, ids


def vocab_parallel_topk(
    hidden: torch.Tensor,
    item_weight_shard: torch.Tensor,
    k: int,
    *,
    shard: ItemShard,
    group: Optional[dist.ProcessGroup] = None,
    bias_shard: Optional[torch.Tensor] = None,
    exclude: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fastattn.topk_items` over a V-row item table split by rows over the ranks.

    Every rank passes the same hidden (..., D), k in [1, V] and exclude (optional int64 (..., M)
    GLOBAL item ids to skip per row; entries < 0 ignored), and its own rows item_weight_shard
    (V_r, D), bias_shard (V_r,) or None, with shard = ItemShard(V, rank, W). Returns (scores,
    global item ids), each (..., k), best first, the same on every rank and equal to
    topk_items on the whole table: score h·E_j + b_j (float32, as topk_items returns; ranked in
    float64 for float64 inputs), excluded, NaN and -inf items ineligible, equal scores in ascending item id, (-inf, -1) after
    the last eligible item. No gradient.

    Communication: the shard check (as vocab_parallel_cross_entropy), then all-gathers of
    (N, k) scores (float64 for float64 inputs, else float32) and (N, k) int64 ids.
    """
    amp = autocast_device(hidden)
    if amp is not None:  # torch.autocast: cast inputs, rerun with autocast off (fastattn/_autocast.py)
        with autocast_off(amp):
            hidden, item_weight_shard, bias_shard = autocast_inputs((hidden, item_weight_shard, bias_shard), amp)
            return vocab_parallel_topk(hidden, item_weight_shard, k, shard=shard, group=group,
                                       bias_shard=bias_shard, exclude=exclude)
    check_table(hidden, item_weight_shard, bias_shard)
    _check_shard_type(shard)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= shard.num_items:
        raise ValueError(f"k must be an int in [1, {shard.num_items}] (the number of items), got {k!r}")
    if exclude is not None:
        _check_exclude(exclude, hidden, shard.num_items)
    lead_shape, h2 = hidden.shape[:-1], hidden.reshape(-1, hidden.shape[-1])
    check_layout(shard, group, hidden.device, table_name="item_weight_shard", table_rows=item_weight_shard.shape[0],
                 bias_rows=-1 if bias_shard is None else bias_shard.shape[0],
                 consistent={"hidden rows N": h2.shape[0], "hidden size D": h2.shape[1],
                             "hidden dtype": _dtype_code(hidden.dtype), "k": k})
    with torch.no_grad():
        scores, ids = _local_topk(h2.detach(), item_weight_shard.detach(),
                                  None if bias_shard is None else bias_shard.detach(), k,
                                  None if exclude is None else exclude.reshape(h2.shape[0], exclude.shape[-1]), shard)
        every_scores = torch.cat(all_gather_tensor(scores, group), dim=1)  # (N, W·k), rank order
        every_ids = torch.cat(all_gather_tensor(ids, group), dim=1)
        order = torch.sort(every_scores, dim=1, descending=True, stable=True).indices[:, :k]
        top_scores, top_ids = every_scores.gather(1, order).to(_SCORE_DTYPE), every_ids.gather(1, order)
    return top_scores.reshape(*lead_shape, k), top_ids.reshape(*lead_shape, k)
