"""Vocab-parallel ops on `torch.distributed`: the item table split by rows over the ranks of a
process group (any initialised group; NCCL and gloo), results equal to the single-process ops.

- `ItemShard(num_items, rank, world_size)`: this rank's rows [start, stop) (balanced: sizes differ
  by at most one; empty when V < W); `shard_rows(table, shard)` and `gather_rows(table_shard,
  shard, group)` (the whole table back, e.g. for a checkpoint).
- `vocab_parallel_cross_entropy(hidden, item_weight_shard, target, shard=...)`: equals
  `fastattn.full_item_cross_entropy` on the whole table (hard and soft targets, global label
  smoothing, temperature, bias, ignore_index) with O(N) forward communication and the dH
  all-reduce backward; dE stays on its rank.
- `vocab_parallel_topk(hidden, item_weight_shard, k, shard=...)`: equals `fastattn.topk_items`.
- `sharded_embedding(ids, item_weight_shard, shard=...)`: each rank's own ids looked up in the
  sharded table (all ranks' ids exchanged; "dense" or "unique" exchange), exact gradients.

Layering: beside fastattn.functional (uses it and torch.distributed only). The math and the
communication are in docs/distributed.md.
"""
from __future__ import annotations

from .cross_entropy import vocab_parallel_cross_entropy
from .embedding import sharded_embedding
from .shard import ItemShard, gather_rows, shard_rows
from .topk import vocab_parallel_topk

__all__ = ["ItemShard", "gather_rows", "shard_rows", "sharded_embedding", "vocab_parallel_cross_entropy",
           "vocab_parallel_topk"]
