"""fastattn.distributed against the single-process ops, on gloo process groups of 1, 2 and 3 CPU
processes, in float64: loss and every gradient of vocab_parallel_cross_entropy equal
full_item_cross_entropy (backend "torch") on the whole table; vocab_parallel_topk equals
topk_items; a bad shard is the same ValueError on every rank; ItemShard tiles the table.

Each group is spawned once and runs all its checks (a spawn costs seconds: torch is imported per
process); a child's error is re-raised here with its traceback, and a group that does not finish
within GROUP_TIMEOUT_S fails the test instead of hanging it. The ranks use backend "auto" (the
C++ kernels, which take float64 on CPU).
"""
from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastattn
from fastattn import SoftTarget
from fastattn.distributed import (ItemShard, gather_rows, shard_rows, sharded_embedding, vocab_parallel_cross_entropy,
                                  vocab_parallel_topk)
from fastattn.distributed.collectives import gather_from_shards
from fastattn.distributed.embedding import ShardedItemEmbedding
from fastattn.evaluation import full_ranking_ranks

F64 = torch.float64
GROUP_TIMEOUT_S = 150
TOL = dict(rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------ process groups
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, suite: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        SUITES[suite](rank, world)
    finally:
        dist.destroy_process_group()


def _run_group(world: int, suite: str) -> None:
    """Run SUITES[suite] on `world` spawned gloo ranks; re-raise a child's error, fail on a hang."""
    context = mp.start_processes(_child, args=(world, _free_port(), suite), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    try:
        # join() raises ProcessRaisedException (the child's traceback) when a rank fails, after
        # terminating the others.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {world}-rank group '{suite}' did not finish within {GROUP_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


# ------------------------------------------------------------------------------ data and checks
def _data(num_items: int, dim: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (rows, dim), table (V, dim), bias (V,) float64, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, dim, generator=g, dtype=F64), torch.randn(num_items, dim, generator=g, dtype=F64),
            torch.randn(num_items, generator=g, dtype=F64))


def _hard_target(num_items: int, rows: int, seed: int, ignored: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_items, (rows,), generator=g)
    target[torch.randperm(rows, generator=g)[:ignored]] = -100
    return target


def _soft_target(num_items: int, rows: int, seed: int) -> SoftTarget:
    """Rows with a dense base and 0-3 sparse entries (duplicates included); row 1 has mass 0."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (rows,), generator=g)
    counts[1] = 2
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=indptr[1:])
    indices = torch.randint(0, num_items, (int(indptr[-1]),), generator=g)
    raw = torch.rand(int(indptr[-1]), generator=g, dtype=F64) + 0.1
    base_share = torch.where(counts > 0, torch.rand(rows, generator=g, dtype=F64) * 0.5, 1.0)
    row_of = torch.repeat_interleave(torch.arange(rows), counts)
    row_sum = torch.zeros(rows, dtype=F64).index_add(0, row_of, raw)
    values = raw / row_sum[row_of] * (1 - base_share[row_of])
    base = base_share / num_items
    values[indptr[1]:indptr[2]] = 0.0  # row 1: mass 0, ignored
    base[1] = 0.0
    return SoftTarget(base, indptr, indices, values)


def _same_on_every_rank(t: torch.Tensor) -> None:
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, t.contiguous())
    for piece in pieces:
        assert torch.equal(piece, t), "ranks disagree"


def _check_ce(shard: ItemShard, data: tuple[torch.Tensor, ...], target: Any, *, use_bias: bool = True,
              shape: Optional[tuple[int, ...]] = None, backend: str = "auto", **options: Any) -> None:
    """Loss and gradients of hidden, the table shard and the bias shard against the whole-table op."""
    hidden, table, bias = data
    if shape is not None:
        hidden = hidden.reshape(*shape, hidden.shape[-1])
    ref_h, ref_e, ref_b = (t.clone().requires_grad_() for t in (hidden, table, bias))
    my_h = hidden.clone().requires_grad_()
    my_e, my_b = shard_rows(table, shard).requires_grad_(), shard_rows(bias, shard).requires_grad_()
    ref = fastattn.full_item_cross_entropy(ref_h, ref_e, target, bias=ref_b if use_bias else None,
                                           backend="torch", **options)
    got = vocab_parallel_cross_entropy(my_h, my_e, target, shard=shard, bias_shard=my_b if use_bias else None,
                                       backend=backend, **options)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, **TOL)
    _same_on_every_rank(got.detach())
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    (ref * upstream).sum().backward()
    (got * upstream).sum().backward()
    torch.testing.assert_close(my_h.grad, ref_h.grad, **TOL)
    _same_on_every_rank(my_h.grad)
    assert my_e.grad is not None and my_e.grad.shape == (shard.size, table.shape[1])
    torch.testing.assert_close(my_e.grad, ref_e.grad[shard.start:shard.stop], **TOL)
    if use_bias:
        torch.testing.assert_close(my_b.grad, ref_b.grad[shard.start:shard.stop], **TOL)
    for grad in (my_h.grad, my_e.grad, my_b.grad if use_bias else my_h.grad):
        assert torch.isfinite(grad).all()


def _cross_entropy_cases(rank: int, world: int, num_items: int) -> None:
    shard = ItemShard(num_items, rank, world)
    data = _data(num_items, 6, 10, seed=num_items)
    hard = _hard_target(num_items, 10, seed=1)
    for reduction in ("mean", "sum", "none"):
        _check_ce(shard, data, hard, use_bias=False, reduction=reduction)
        _check_ce(shard, data, hard, label_smoothing=0.2, reduction=reduction)  # exact over the global catalog
        _check_ce(shard, data, _soft_target(num_items, 10, seed=2), label_smoothing=0.1, temperature=0.6,
                  reduction=reduction)
        _check_ce(shard, data, torch.full((10,), -100), reduction=reduction)  # every row ignored
    _check_ce(shard, data, hard.reshape(2, 5), shape=(2, 5), temperature=0.5, label_smoothing=0.1, reduction="none")
    _check_ce(shard, data, hard.masked_fill(hard == -100, 3), ignore_index=3, temperature=1.7)
    _check_ce(shard, data, _soft_target(num_items, 10, seed=3), backend="torch")
    nan_rows = (data[0].clone().index_fill_(0, (hard == -100).nonzero()[:, 0], float("nan")), *data[1:])
    _check_ce(shard, nan_rows, hard)  # an ignored row's NaN reaches nothing
    _check_table_grad_only(shard, data, hard)
    _float32_case(shard)


def _float32_case(shard: ItemShard) -> None:
    """float32 and bfloat16 inputs (float32 loss): the same values within float32 rounding; bfloat16
    gradients within 2 bfloat16 ulps (each rank's fused dH is rounded to bfloat16 before the sum)."""
    hidden, table, bias = (t.float() for t in _data(shard.num_items, 8, 6, seed=21))
    target = _hard_target(shard.num_items, 6, seed=22, ignored=1)
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-5)), (torch.bfloat16, dict(rtol=1e-2, atol=1e-2))):
        h, e, b = (t.to(dtype).clone().requires_grad_() for t in (hidden, table, bias))
        ref = fastattn.full_item_cross_entropy(h, e, target, bias=b, label_smoothing=0.1)
        ref.backward()
        my_h = h.detach().clone().requires_grad_()
        my_e, my_b = shard_rows(e.detach(), shard).requires_grad_(), shard_rows(b.detach(), shard).requires_grad_()
        got = vocab_parallel_cross_entropy(my_h, my_e, target, shard=shard, bias_shard=my_b, label_smoothing=0.1)
        got.backward()
        assert got.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(got, ref, **tol)
        torch.testing.assert_close(my_h.grad.float(), h.grad.float(), **tol)
        torch.testing.assert_close(my_e.grad.float(), e.grad[shard.start:shard.stop].float(), **tol)


def _check_table_grad_only(shard: ItemShard, data: tuple[torch.Tensor, ...], target: torch.Tensor) -> None:
    """hidden without gradient (frozen encoder): the table gradient alone, and no backward collective;
    the table also used outside the loss (tied input embeddings): the gradients add up."""
    hidden, table, _ = data
    ref_e = table.clone().requires_grad_()
    loss = fastattn.full_item_cross_entropy(hidden, ref_e, target, backend="torch", label_smoothing=0.3)
    (loss + (ref_e[:, 0] ** 2).sum()).backward()
    my_e = shard_rows(table, shard).requires_grad_()
    loss = vocab_parallel_cross_entropy(hidden, my_e, target, shard=shard, label_smoothing=0.3)
    (loss + (my_e[:, 0] ** 2).sum()).backward()
    torch.testing.assert_close(my_e.grad, ref_e.grad[shard.start:shard.stop], **TOL)


def _topk_cases(rank: int, world: int, num_items: int) -> None:
    shard = ItemShard(num_items, rank, world)
    hidden, table, bias = _data(num_items, 5, 8, seed=11)
    g = torch.Generator().manual_seed(12)
    exclude = torch.randint(-1, num_items, (8, 3), generator=g)  # history, -1 padded
    for k in sorted({1, min(num_items, 5), num_items}):
        for kwargs in (dict(), dict(bias=bias, exclude=exclude)):
            ref = fastattn.topk_items(hidden, table, k, backend="torch", **kwargs)
            mine = dict(exclude=kwargs.get("exclude"),
                        bias_shard=shard_rows(bias, shard) if "bias" in kwargs else None)
            got = vocab_parallel_topk(hidden, shard_rows(table, shard), k, shard=shard, **mine)
            torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=0)
            assert torch.equal(got[1], ref[1]), (got[1], ref[1])
            _same_on_every_rank(got[1])
    # Exact ties across shards (small integers): equal scores go to the lower global id.
    tie_h = torch.randint(-1, 2, (2, 3, 4), generator=g).to(F64)
    tie_e = torch.randint(-1, 2, (num_items, 4), generator=g).to(F64)
    tie_e[-1] = tie_e[0] * (1 + 1e-12)  # float64 ranks it apart from item 0; float32 scores tie
    ref = fastattn.topk_items(tie_h, tie_e, num_items, backend="torch")
    got = vocab_parallel_topk(tie_h, shard_rows(tie_e, shard), num_items, shard=shard)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def _bad_shard_cases(rank: int, world: int) -> None:
    """Every rank raises the same ValueError; the group stays in step (a good call follows)."""
    num_items = 7
    hidden, table, bias = _data(num_items, 4, 5, seed=5)
    target = _hard_target(num_items, 5, seed=6, ignored=0)
    good = ItemShard(num_items, rank, world)

    def expect(match: str, shard: ItemShard, weight: torch.Tensor, h: torch.Tensor = hidden,
               topk: bool = False) -> None:
        with pytest.raises(ValueError, match=match):
            if topk:
                vocab_parallel_topk(h, weight, 2, shard=shard)
            else:
                vocab_parallel_cross_entropy(h, weight, target[:h.shape[0]], shard=shard)

    last = world - 1
    wrong_rank = ItemShard(num_items, 0, world) if rank == 1 else good  # rank 1 passes rank 0's shard
    expect("rank 1 passed the shard of rank 0", wrong_rank, shard_rows(table, wrong_rank))
    wrong_count = ItemShard(num_items + world, rank, world) if rank == last else good
    expect("disagree on num_items", wrong_count, table[wrong_count.start:wrong_count.stop].clone()
           if rank != last else torch.zeros(wrong_count.size, 4, dtype=F64))
    short = shard_rows(table, good)[:-1] if rank == 0 else shard_rows(table, good)
    expect("item_weight_shard: rank 0 holds", good, short)
    expect("item_weight_shard: rank 0 holds", good, short, topk=True)
    expect("hidden rows N differs", good, shard_rows(table, good), h=hidden[:4] if rank == last else hidden)
    too_wide = ItemShard(num_items, rank, world + 1)
    expect(f"world_size={world + 1}\\) but the group has {world}", too_wide, shard_rows(table, too_wide))
    with pytest.raises(ValueError, match="table_shard: rank 0 holds"):
        gather_rows(short, good)
    _check_ce(good, (hidden, table, bias), target)  # still in step


def _shard_cases(rank: int, world: int) -> None:
    for num_items in (1, world - 1 or 1, world, 7, 10):
        shard = ItemShard(num_items, rank, world)
        table = torch.arange(num_items * 3, dtype=F64).reshape(num_items, 3)
        assert torch.equal(gather_rows(shard_rows(table, shard), shard), table)
        vector = torch.arange(num_items, dtype=torch.float32)
        assert torch.equal(gather_rows(shard_rows(vector, shard), shard), vector)


def _suite(rank: int, world: int) -> None:
    _shard_cases(rank, world)
    for num_items in ((7, 10) if world == 2 else (2, 7)):  # odd V; with 3 ranks V=2 leaves rank 2 empty
        _cross_entropy_cases(rank, world, num_items)
        _topk_cases(rank, world, num_items)
    _bad_shard_cases(rank, world)
    # No rows at all: a loss of 0 with zero gradients, as full_item_cross_entropy.
    _check_ce(ItemShard(7, rank, world), _data(7, 3, 0, seed=9), torch.zeros(0, dtype=torch.int64))


def _rank_batch(rank: int, num_items: int, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s ids (left padded with 0, repeats included) and a fixed cotangent for them."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(1, num_items + 1, shape, generator=g)
    ids[:, : rank + 1] = 0  # padding, a different amount per rank
    ids[0, -1] = ids[1, -1]  # a repeated item
    return ids, torch.randn(*shape, 3, generator=g, dtype=F64)


def _lookup_cases(rank: int, world: int, num_items: int) -> None:
    """sharded_embedding equals F.embedding on the whole table, and the table shard's gradient
    equals that of one process doing every rank's lookups; composed with gather_from_shards and
    vocab_parallel_cross_entropy (the --item-shards training step), the replicated loss and the
    gradients summed over ranks equal one process's on the concatenated batch."""
    shape = (3, 5)
    shard = ItemShard(num_items, rank, world)
    g = torch.Generator().manual_seed(7)
    table = torch.randn(num_items + 1, 3, generator=g, dtype=F64)
    table[0] = 0.0  # the padding row
    mix = torch.randn(3, 3, generator=g, dtype=F64)  # a stand-in for the encoder: shared parameters
    batches = [_rank_batch(r, num_items, shape) for r in range(world)]
    ids, cotangent = batches[rank]
    for lookup in ("dense", "unique"):
        # lookups only: forward values and the shard's gradient
        ref_table = table.clone().requires_grad_()
        sum(((torch.nn.functional.embedding(i, ref_table) * c).sum() for i, c in batches)).backward()
        weight = shard_rows(table[1:], shard).requires_grad_()
        got = sharded_embedding(ids, weight, shard=shard, lookup=lookup)
        torch.testing.assert_close(got, table[ids], **TOL)
        (got * cotangent).sum().backward()
        torch.testing.assert_close(weight.grad, shard_rows(ref_table.grad[1:], shard), **TOL)
        # the training step: local encoder, gathered rows, replicated vocab-parallel loss
        targets = [torch.where(i > 0, (i * 3) % num_items, -100) for i, _ in batches]  # item rows 0..V-1
        ref_table, ref_mix = table.clone().requires_grad_(), mix.clone().requires_grad_()
        ref_rows = torch.cat([torch.nn.functional.embedding(i, ref_table) @ ref_mix for i, _ in batches])
        ref_loss = fastattn.full_item_cross_entropy(ref_rows.reshape(-1, 3), ref_table[1:], torch.cat(targets).reshape(-1),
                                                    backend="torch")
        ref_loss.backward()
        weight, my_mix = shard_rows(table[1:], shard).requires_grad_(), mix.clone().requires_grad_()
        rows = sharded_embedding(ids, weight, shard=shard, lookup=lookup) @ my_mix
        every = gather_from_shards(rows, None).reshape(-1, 3)
        every_target = torch.stack(targets).reshape(-1)
        loss = vocab_parallel_cross_entropy(every, weight, every_target, shard=shard)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(weight.grad, shard_rows(ref_table.grad[1:], shard), **TOL)
        mix_grad = my_mix.grad.clone()
        dist.all_reduce(mix_grad)  # what DistributedDataParallel sums for a replicated loss
        torch.testing.assert_close(mix_grad, ref_mix.grad, **TOL)
    bad = ids.clone()
    bad[0, 0] = num_items + 1
    with pytest.raises(ValueError, match=f"ids must lie in 0..{num_items}"):
        sharded_embedding(bad, shard_rows(table[1:], shard), shard=shard)


def _module_cases(rank: int, world: int, num_items: int) -> None:
    """ShardedItemEmbedding (the --item-shards table): the lookup equals the whole table's; its
    evaluation ranking (`rank_targets`, through vocab_parallel_topk) equals full_ranking_ranks on
    the whole table for each rank's rows, history exclusion (padding 0, unused -1, an excluded
    target) and k above the catalog included; state_dict is the whole table and loads back."""
    shard = ItemShard(num_items, rank, world)
    g = torch.Generator().manual_seed(11)
    table = torch.randn(num_items + 1, 4, generator=g, dtype=F64)
    table[0] = 0.0
    module = ShardedItemEmbedding(table, shard, lookup="unique")
    ids, _ = _rank_batch(rank, num_items, (3, 5))
    torch.testing.assert_close(module(ids), table[ids], **TOL)
    batches = []
    for r in range(world):  # every rank's rows: vectors, targets, exclude (b, M), the same b and M
        gr = torch.Generator().manual_seed(200 + r)
        vectors = torch.randn(4, 4, generator=gr, dtype=F64)
        target = torch.randint(1, num_items + 1, (4,), generator=gr)
        exclude = torch.randint(-1, num_items + 1, (4, 3), generator=gr)
        exclude[:, 0] = 0  # the padding item, as EvalBatch.exclude
        exclude[0, 1] = target[0]  # an excluded target is a miss
        batches.append((vectors, target, exclude))
    vectors, target, exclude = batches[rank]
    for k in sorted({1, min(3, num_items), num_items + 1}):  # evaluation caps k at V + 1 table rows
        got = module.rank_targets(vectors, target, exclude, k)
        want = full_ranking_ranks(vectors, table, target, exclude, k, backend="torch")
        assert torch.equal(got, want), (k, got, want)
        assert got[0] == k
    state = module.state_dict()
    torch.testing.assert_close(state["weight"], table, **TOL)
    other = ShardedItemEmbedding(torch.zeros_like(table), shard)
    other.load_state_dict(state)
    torch.testing.assert_close(other.weight, module.weight, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="the model's whole table is"):
        other.load_state_dict({"weight": table[:-1]})


def _lookup_suite(rank: int, world: int) -> None:
    for num_items in ((9, 1) if world == 2 else (2, 10)):  # V = 1 or 2 < W: a rank holds no row
        _lookup_cases(rank, world, num_items)
        _module_cases(rank, world, num_items)


SUITES: dict[str, Callable[[int, int], None]] = {"suite": _suite, "lookup": _lookup_suite}


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_ops_on_gloo_ranks(world: int) -> None:
    _run_group(world, "suite")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_lookup_and_training_step_on_gloo_ranks(world: int) -> None:
    _run_group(world, "lookup")


def test_single_process_group_equals_the_whole_table_ops() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        _shard_cases(0, 1)
        _cross_entropy_cases(0, 1, 9)
        _topk_cases(0, 1, 9)
        with pytest.raises(ValueError, match="world_size=2\\) but the group has 1"):
            vocab_parallel_cross_entropy(torch.randn(2, 3, dtype=F64), torch.randn(5, 3, dtype=F64),
                                         torch.zeros(2, dtype=torch.int64), shard=ItemShard(9, 0, 2))
    finally:
        dist.destroy_process_group()


def test_item_shards_are_balanced_and_tile_the_table() -> None:
    for num_items in range(1, 40):
        for world in range(1, 9):
            shards = [ItemShard(num_items, r, world) for r in range(world)]
            sizes = [s.size for s in shards]
            assert shards[0].start == 0 and shards[-1].stop == num_items
            assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
            assert max(sizes) - min(sizes) <= 1 and max(sizes) == shards[0].max_size
            assert sizes == sorted(sizes, reverse=True)
    assert ItemShard(2, 2, 3).size == 0
    for args, error in (((0, 0, 1), "num_items"), ((5, 2, 2), "rank"), ((5, 0, 0), "world_size")):
        with pytest.raises(ValueError, match=error):
            ItemShard(*args)
    with pytest.raises(TypeError, match="num_items"):
        ItemShard(5.0, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="table has 4 rows but shard.num_items is 5"):
        shard_rows(torch.zeros(4, 2), ItemShard(5, 0, 1))


def test_argument_errors_before_any_communication() -> None:
    """No process group at all: argument errors are raised before the first collective."""
    h, e, t = torch.randn(3, 4), torch.randn(2, 4), torch.zeros(3, dtype=torch.int64)
    shard = ItemShard(4, 0, 2)
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(h, e, t, shard=shard, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(h, e, t, shard=shard, label_smoothing=1.5)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_cross_entropy(h, e, t, shard=shard, temperature=0.0)
    with pytest.raises(TypeError, match="item_weight_shard has dtype"):
        vocab_parallel_cross_entropy(h, e.double(), t, shard=shard)
    with pytest.raises(ValueError, match="item_weight_shard must have shape"):
        vocab_parallel_cross_entropy(h, torch.randn(2, 5), t, shard=shard)
    with pytest.raises(TypeError, match="shard must be"):
        vocab_parallel_cross_entropy(h, e, t, shard=(0, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        vocab_parallel_topk(h, e, 5, shard=shard)
    with pytest.raises(ValueError, match="exclude holds item ids >= 4"):
        vocab_parallel_topk(h, e, 2, shard=shard, exclude=torch.full((3, 1), 4))
    with pytest.raises(RuntimeError, match="initialised process group"):
        vocab_parallel_cross_entropy(h, e, t, shard=shard)
