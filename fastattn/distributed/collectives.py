"""The collectives of the vocab-parallel ops, with the backward that REPLICATED losses need.

Every rank computes the same loss from the same rows and calls backward on it, so an upstream
gradient that reaches a collective's output is already the same on every rank. Megatron-LM's
pair of autograd functions then gives exact gradients:

- `copy_to_shards(x)`: forward identity; backward all-reduce-sum. Applied once to `hidden`: each
  rank's shard contributes a partial dL/dH, and the sum over ranks is the whole gradient.
- `gather_from_shards(x)`: forward all-gather (W, *x.shape); backward this rank's slice of the
  (replicated) gradient. torch.distributed.nn.functional.all_gather's backward instead sums the
  gradient over ranks (a reduce-scatter), right for a loss computed once but W times too large
  for a replicated one.

`count_traffic()` records each collective's payload, for the benchmark's bytes per step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

__all__ = ["all_gather_tensor", "copy_to_shards", "count_traffic", "gather_from_shards", "group_rank",
           "group_size"]

# (collective, payload bytes of this rank's tensor, world size) while count_traffic() is open.
_TRAFFIC: list[list[tuple[str, int, int]]] = []


@contextlib.contextmanager
def count_traffic() -> Iterator[list[tuple[str, int, int]]]:
    """Record (collective name, this rank's payload in bytes, world size) of every collective run
    inside the block, the backward's all-reduce included, into the yielded list."""
    log: list[tuple[str, int, int]] = []
    _TRAFFIC.append(log)
    try:
        yield log
    finally:
        _TRAFFIC.remove(log)


def _record(name: str, t: torch.Tensor, world: int) -> None:
    for log in _TRAFFIC:
        log.append((name, t.numel() * t.element_size(), world))


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fastattn.distributed needs an initialised process group "
                           "(torch.distributed.init_process_group)")


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    _require_initialized()
    return dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    _require_initialized()
    return dist.get_rank(group)


def all_gather_tensor(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> list[torch.Tensor]:
    """Every rank's `x` (same shape and dtype on all ranks), in group rank order. No autograd."""
    world = group_size(group)
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world)]
    _record("all_gather", x, world)
    dist.all_gather(out, x, group=group)
    return out


class _CopyToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()  # all_reduce works in place; the incoming buffer is autograd's
        _record("all_reduce", grad, group_size(ctx.group))
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _GatherFromShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.rank = group_rank(group)
        return torch.stack(all_gather_tensor(x, group))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[ctx.rank], None


def copy_to_shards(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """x unchanged; its gradient is summed over the ranks of `group` in the backward (every rank
    must reach this backward: use the output in the loss on every rank)."""
    return _CopyToShards.apply(x, group)


def gather_from_shards(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """(W, *x.shape): every rank's x in rank order; backward keeps this rank's slice of the
    gradient (exact when the loss is replicated, i.e. computed alike on every rank)."""
    return _GatherFromShards.apply(x, group)
