"""Row shards of the item table and the one collective that checks them on every rank.

`ItemShard(V, rank, W)` holds rows [start, stop) of the (V, D) table: the first V mod W ranks
take ⌈V/W⌉ rows, the others ⌊V/W⌋, so the shards tile [0, V) in rank order and differ by at
most one row (a rank holds no row when V < W).

`check_layout` all-gathers a few int64 per rank (the shard, the table's rows, the shapes that
must agree) before any other collective, and every rank derives the same error message from
the gathered table: a wrong shard on one rank is a ValueError on all ranks, not a hang.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .collectives import all_gather_tensor

__all__ = ["ItemShard", "check_layout", "gather_rows", "shard_rows"]

_FLOAT_CODES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_SHARD_FIELDS = ("num_items", "shard.rank", "shard.world_size", "start", "stop", "table rows", "bias rows")


@dataclass(frozen=True)
class ItemShard:
    """Rank `rank`'s contiguous rows [start, stop) of a table of `num_items` rows split over
    `world_size` ranks: sizes ⌈V/W⌉ for the first V mod W ranks, ⌊V/W⌋ after (may be 0)."""

    num_items: int
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("num_items", "rank", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ItemShard.{name} must be an int, got {value!r}")
        if self.num_items < 1:
            raise ValueError(f"ItemShard.num_items must be >= 1, got {self.num_items}")
        if self.world_size < 1:
            raise ValueError(f"ItemShard.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ItemShard.rank must lie in [0, world_size={self.world_size}), got {self.rank}")

    @property
    def start(self) -> int:
        base, extra = divmod(self.num_items, self.world_size)
        return self.rank * base + min(self.rank, extra)

    @property
    def stop(self) -> int:
        base, extra = divmod(self.num_items, self.world_size)
        return self.start + base + (1 if self.rank < extra else 0)

    @property
    def size(self) -> int:
        """stop − start: the rows this rank holds."""
        return self.stop - self.start

    @property
    def max_size(self) -> int:
        """⌈V/W⌉: the largest shard of this split (rank 0's)."""
        return -(-self.num_items // self.world_size)


def _check_shard_type(shard: object) -> ItemShard:
    if not isinstance(shard, ItemShard):
        raise TypeError(f"shard must be a fastattn.distributed.ItemShard, got {type(shard).__name__}")
    return shard


def shard_rows(table: torch.Tensor, shard: ItemShard) -> torch.Tensor:
    """This rank's rows of a full table: table (V, ...) → a contiguous copy of table[start:stop]
    (a copy, so the full table can be freed; wrap it in nn.Parameter to train it)."""
    _check_shard_type(shard)
    if not isinstance(table, torch.Tensor) or table.dim() < 1:
        raise TypeError(f"table must be a tensor of shape (V, ...), got {type(table).__name__}")
    if table.shape[0] != shard.num_items:
        raise ValueError(f"table has {table.shape[0]} rows but shard.num_items is {shard.num_items}")
    return table[shard.start:shard.stop].detach().clone(memory_format=torch.contiguous_format)


def gather_rows(table_shard: torch.Tensor, shard: ItemShard, group: Optional[dist.ProcessGroup] = None
                ) -> torch.Tensor:
    """The full table (V, ...) on every rank from each rank's rows (V_r, ...), e.g. for a
    checkpoint. Uneven shards are padded to ⌈V/W⌉ rows for one all-gather. No gradient.
    Communication: W·⌈V/W⌉ rows received per rank (plus the layout check)."""
    _check_shard_type(shard)
    if not isinstance(table_shard, torch.Tensor) or table_shard.dim() < 1:
        raise TypeError(f"table_shard must be a tensor of shape (V_r, ...), got {type(table_shard).__name__}")
    trailing = tuple(table_shard.shape[1:])
    check_layout(shard, group, table_shard.device, table_name="table_shard", table_rows=table_shard.shape[0],
                 consistent={"table_shard.dim()": table_shard.dim(), "row numel": _numel(trailing),
                             "dtype": _dtype_code(table_shard.dtype)})
    with torch.no_grad():
        padded = table_shard.detach().new_zeros((shard.max_size, *trailing))
        padded[:table_shard.shape[0]] = table_shard
        pieces = all_gather_tensor(padded.contiguous(), group)
        sizes = [ItemShard(shard.num_items, r, shard.world_size).size for r in range(shard.world_size)]
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _dtype_code(dtype: torch.dtype) -> int:
    return _FLOAT_CODES.get(dtype, 99)


def check_layout(shard: ItemShard, group: Optional[dist.ProcessGroup], device: torch.device, *,
                 table_name: str, table_rows: int, bias_rows: int = -1,
                 consistent: Optional[dict[str, int]] = None) -> None:
    """Raise the same ValueError on every rank unless the ranks' shards tile [0, V) in rank order,
    each table holds its shard's rows and the `consistent` values agree across ranks.

    One all-gather of (7 + len(consistent)) int64 per rank on `device` (NCCL needs a CUDA
    tensor), and one host read of the result (a sync on CUDA). Every rank must call it with the
    same `consistent` keys (they come from the same code path)."""
    _check_shard_type(shard)
    consistent = dict(consistent or {})
    local = [shard.num_items, shard.rank, shard.world_size, shard.start, shard.stop, table_rows, bias_rows,
             *consistent.values()]
    rows = all_gather_tensor(torch.tensor(local, dtype=torch.int64, device=device), group)
    table = torch.stack(rows).tolist()
    message = layout_error(table, table_name, list(consistent))
    if message is not None:
        raise ValueError(message)


def layout_error(table: list[list[int]], table_name: str, consistent_names: list[str]) -> Optional[str]:
    """The first problem in the gathered layout (one row per rank: _SHARD_FIELDS then the
    consistent values), or None. A pure function of the table: every rank gets the same text."""
    world = len(table)
    for r, row in enumerate(table):
        num_items, rank, world_size, start, stop, rows, bias_rows = row[:len(_SHARD_FIELDS)]
        if world_size != world:
            return f"shard: rank {r} passed ItemShard(world_size={world_size}) but the group has {world} ranks"
        if rank != r:
            return (f"shard: rank {r} passed the shard of rank {rank} (ItemShard.rank must be the rank in the "
                    f"group)")
        if rows != stop - start:
            return (f"{table_name}: rank {r} holds {rows} rows but its shard [{start}, {stop}) has "
                    f"{stop - start} (shard_rows gives a rank its rows)")
        if bias_rows not in (-1, stop - start):
            return f"bias_shard: rank {r} holds {bias_rows} entries but its shard [{start}, {stop}) has {stop - start}"
    counts = [row[0] for row in table]
    if len(set(counts)) > 1:
        return f"shard: the ranks disagree on num_items: {counts} (rank order)"
    bounds = [(row[3], row[4]) for row in table]
    tiled = bounds[0][0] == 0 and bounds[-1][1] == counts[0] and all(
        bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
    if not tiled:
        return f"shard: the ranks' rows {bounds} do not tile [0, {counts[0]}) in rank order"
    if any(row[6] == -1 for row in table) and any(row[6] != -1 for row in table):
        return "bias_shard: some ranks pass a bias shard and others pass None"
    for k, name in enumerate(consistent_names):
        values = [row[len(_SHARD_FIELDS) + k] for row in table]
        if len(set(values)) > 1:
            return f"{name} differs across ranks: {values} (rank order); every rank must pass the same rows"
    return None

