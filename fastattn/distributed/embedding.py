"""The input side of a row-sharded item table: looking up item ids that live on other ranks.

In data-parallel training with the item table split by rows (`ItemShard`), each rank embeds ITS
OWN batch, whose ids fall in every shard. Two exchanges give every rank E[ids] exactly:

- ``"dense"``: the ids of all ranks are all-gathered ((W·n,) int64); each rank writes the rows
  of its shard for ALL of them into a (W·n, D) buffer (zeros elsewhere), one all-reduce sums the
  buffers, and each rank keeps its own n rows. Backward: the (n, D) gradients are all-gathered and
  each rank adds the rows that fall in its shard into its gradient. Payload W·n·D both ways, no
  data-dependent size (no host sync on a GPU).
- ``"unique"``: the same all-gather of ids, then U = the distinct ids of the whole step; the
  (|U|, D) buffer is all-reduced (each row is written by its owner only, so the sum is an
  all-gather of the needed rows); backward, the (|U|, D) gradient sums of every rank are
  all-reduced and each owner keeps its rows. Payload |U|·D ≤ W·n·D: padding (id 0) and repeated
  items are sent once. `torch.unique` has a data-dependent size: one host sync per step on a GPU.

bench/studies/sharded_lookup.py measures both (bytes and time); docs/distributed.md has the
numbers and the choice. Both are exact: the forward is a copy, the backward a sum of the very
terms one process's `torch.nn.functional.embedding` backward adds.

Id 0 is the padding item: it has no row in the shards and embeds to zeros (the padding row of
the models' tables is zero and never trained). Ids 1..V map to shard rows of `ItemShard(V, ...)`
as id − 1 − start.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .collectives import _record, all_gather_tensor, group_rank, group_size
from .shard import ItemShard, _check_shard_type

__all__ = ["LOOKUPS", "ShardedItemEmbedding", "sharded_embedding"]

LOOKUPS = ("dense", "unique")


def _owned(ids: torch.Tensor, shard: ItemShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the ids whose rows this shard holds, their shard rows (0 elsewhere))."""
    rows = ids - 1 - shard.start
    inside = (ids >= 1) & (rows >= 0) & (rows < shard.size)
    return inside, torch.where(inside, rows, torch.zeros_like(rows))


def _all_reduce(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    _record("all_reduce", x, group_size(group))
    dist.all_reduce(x, group=group)
    return x


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ids: torch.Tensor, shard: ItemShard,
                group: Optional[dist.ProcessGroup], lookup: str) -> torch.Tensor:
        n, dim = ids.numel(), weight.shape[1]
        rank = group_rank(group)
        every = torch.cat(all_gather_tensor(ids.reshape(-1), group))  # (W·n,)
        keys = every if lookup == "dense" else torch.unique(every, return_inverse=True)
        if lookup == "dense":
            wanted, mine = every, slice(rank * n, (rank + 1) * n)
            local = None
        else:
            wanted, inverse = keys  # type: ignore[misc]
            local = inverse[rank * n:(rank + 1) * n]
            mine = local
        inside, rows = _owned(wanted, shard)
        buffer = torch.where(inside.unsqueeze(1), weight[rows] if shard.size else
                             torch.zeros(wanted.numel(), dim, dtype=weight.dtype, device=weight.device),
                             torch.zeros((), dtype=weight.dtype, device=weight.device))
        buffer = _all_reduce(buffer.contiguous(), group)
        ctx.save_for_backward(inside, rows, *(() if local is None else (local,)))
        ctx.meta = (shard, group, lookup, rank, n, weight.shape)
        return buffer[mine].reshape(*ids.shape, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None, None]:
        shard, group, lookup, rank, n, shape = ctx.meta
        inside, rows, *local = ctx.saved_tensors
        grad = grad.reshape(n, shape[1]).contiguous()
        if lookup == "dense":
            wanted_grad = torch.cat(all_gather_tensor(grad, group))  # (W·n, D): every rank's rows
        else:
            wanted_grad = torch.zeros(rows.numel(), shape[1], dtype=grad.dtype, device=grad.device)
            wanted_grad.index_add_(0, local[0], grad)
            wanted_grad = _all_reduce(wanted_grad, group)
        weight_grad = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
        if shape[0] == 0:  # an empty shard (V < W) still joined the collectives above
            return weight_grad, None, None, None, None
        keep = inside.unsqueeze(1).to(grad.dtype)
        weight_grad.index_add_(0, rows, wanted_grad * keep)  # rows of other shards add 0 at row 0
        return weight_grad, None, None, None, None


def sharded_embedding(ids: torch.Tensor, item_weight_shard: torch.Tensor, *, shard: ItemShard,
                      group: Optional[dist.ProcessGroup] = None, lookup: str = "dense") -> torch.Tensor:
    """E[ids] for this rank's `ids` (any shape, int64, 0 = padding → zeros, 1..V = items) from a
    table whose item rows 1..V are split by `shard` = ItemShard(V, rank, W): `item_weight_shard`
    (V_r, D) holds items start+1 .. stop. Returns (*ids.shape, D); its backward gives
    `item_weight_shard` the exact gradient of every rank's lookups of its rows.

    A collective: every rank of `group` calls it with ids of the SAME shape (pad a short share)
    and the same `lookup` ("dense" | "unique", module docstring)."""
    shard = _check_shard_type(shard)
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
        raise TypeError("ids must be an int64 tensor of item ids (0 = padding)")
    if not isinstance(item_weight_shard, torch.Tensor) or item_weight_shard.dim() != 2 \
            or item_weight_shard.shape[0] != shard.size:
        raise ValueError(f"item_weight_shard must be ({shard.size}, D) for {shard}, got "
                         f"{tuple(getattr(item_weight_shard, 'shape', ()))}")
    if ids.device != item_weight_shard.device:
        raise ValueError(f"ids are on {ids.device} but item_weight_shard is on {item_weight_shard.device}")
    message = f"ids must lie in 0..{shard.num_items} (0 = padding, 1..V = items)"
    if ids.device.type == "cpu":
        if ids.numel() and not bool(((ids >= 0) & (ids <= shard.num_items)).all()):
            raise ValueError(message)
    else:  # no host sync on a device
        torch._assert_async(((ids >= 0) & (ids <= shard.num_items)).all(), message)
    return _ShardedLookup.apply(item_weight_shard, ids, shard, group, lookup)


class ShardedItemEmbedding(torch.nn.Module):
    """A model's item table `torch.nn.Embedding(V + 1, D, padding_idx=0)` with its item rows split
    over the ranks of `group` (`--item-shards`): `weight` is this rank's rows (V_r, D) of items
    start+1 .. stop; the padding row is zero and not stored.

    - training: forward(ids) = `sharded_embedding` (a collective: equal id shapes on every rank);
      `cross_entropy(rows, targets)` = the mean full-catalog cross-entropy of EVERY rank's rows
      (all-gathered; the same loss on every rank, exact gradients for each rank's rows and shard).
    - evaluation: forward(ids) is the same collective lookup (no gradient); `rank_targets` ranks
      every rank's user vectors against the whole catalog through `vocab_parallel_topk` — the
      table is never gathered on one rank.
    - state_dict: the whole (V + 1, D) table under `weight` (gathered: a collective), so a
      checkpoint is the single-process model's; load_state_dict takes a whole table and keeps
      this rank's rows.
    """

    def __init__(self, table: torch.Tensor, shard: ItemShard, group: Optional[dist.ProcessGroup] = None,
                 lookup: str = "dense", backend: str = "auto") -> None:
        super().__init__()
        if lookup not in LOOKUPS:
            raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
        if table.dim() != 2 or table.shape[0] != shard.num_items + 1:
            raise ValueError(f"table must be ({shard.num_items + 1}, D) (padding row + items), got {tuple(table.shape)}")
        self.shard, self.group, self.lookup, self.backend = shard, group, lookup, backend
        self.weight = torch.nn.Parameter(table.detach()[1 + shard.start:1 + shard.stop].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return sharded_embedding(ids, self.weight, shard=self.shard, group=self.group, lookup=self.lookup)

    def full_weight(self) -> torch.Tensor:
        """(V + 1, D), detached, row 0 zero: the whole table gathered from every rank (a collective)."""
        return self.whole_state(self.weight)

    @torch.no_grad()
    def rank_targets(self, vectors: torch.Tensor, target: torch.Tensor, exclude: Optional[torch.Tensor],
                     k: int) -> torch.Tensor:
        """0-based rank of each target among all items not excluded, k (a miss) when not in the top k
        — `fastattn.evaluation.full_ranking_ranks` on the whole table, as a collective: vectors
        (b, D), target (b,) in 1..V, exclude (b, M) item ids (0 and -1 unused), the same b and M on
        every rank. Every rank's rows are all-gathered and ranked on every shard
        (`vocab_parallel_topk`); each rank keeps the ranks of its own rows."""
        from .topk import vocab_parallel_topk

        every = torch.cat(all_gather_tensor(vectors, self.group))
        every_exclude = None
        if exclude is not None:  # table rows 1..V are the shards' global ids 0..V-1
            every_exclude = torch.cat(all_gather_tensor(torch.where(exclude > 0, exclude - 1, -1), self.group))
        _, index = vocab_parallel_topk(every, self.weight, min(k, self.shard.num_items), shard=self.shard,
                                       group=self.group, exclude=every_exclude)
        rank, rows = group_rank(self.group), vectors.shape[0]
        mine = index[rank * rows:(rank + 1) * rows]
        found = mine == (target - 1).unsqueeze(1)
        return torch.where(found.any(1), found.to(torch.int64).argmax(1), torch.full_like(target, k))

    def cross_entropy(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """rows (N, D) with targets (N,) in 0..V (0 = no target), the same N on every rank → the mean
        over every rank's targeted rows of logsumexp_j (h·E_j) − h·E_y, j over the V items."""
        from .collectives import gather_from_shards
        from .cross_entropy import vocab_parallel_cross_entropy

        every = gather_from_shards(rows, self.group).reshape(-1, rows.shape[-1])
        every_target = torch.cat(all_gather_tensor(targets.reshape(-1), self.group))
        return vocab_parallel_cross_entropy(every, self.weight, every_target - 1, shard=self.shard, group=self.group,
                                            ignore_index=-1, backend=self.backend)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.full_weight()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        table = state_dict[key]
        if tuple(table.shape) != (self.shard.num_items + 1, self.weight.shape[1]):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(table.shape)}, the "
                              f"model's whole table is {(self.shard.num_items + 1, self.weight.shape[1])}")
            return
        with torch.no_grad():
            self.weight.copy_(table[1 + self.shard.start:1 + self.shard.stop])

    def shard_state(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole-table tensor (V + 1, ...) (e.g. an Adam moment)."""
        return value[1 + self.shard.start:1 + self.shard.stop].clone()

    def whole_state(self, value: torch.Tensor) -> torch.Tensor:
        """The whole-table tensor (V + 1, ...) of a per-shard one (V_r, ...); row 0 zero (a collective)."""
        from .shard import gather_rows

        items = gather_rows(value.detach(), self.shard, self.group)
        return torch.cat([torch.zeros_like(items[:1]), items])
