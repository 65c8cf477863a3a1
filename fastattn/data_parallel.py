"""Data-parallel training: `torchrun --nproc-per-node N -m fastattn train ...` (issue 19, item 4).

torchrun starts N copies of the command with WORLD_SIZE, RANK and LOCAL_RANK in their environment;
`launch` reads them and opens the process group (gloo on the CPU, NCCL on CUDA with one GPU per
process: cuda:LOCAL_RANK), and closes it when the run ends or fails. Without torchrun (or with
WORLD_SIZE=1) nothing here touches torch.distributed: a single process runs exactly as before.

What a `Group` of W processes splits, and how the results equal one process's:

- Training: every process builds the same global batches (same batching, same seed) and keeps the
  rows r, r+W, r+2W, ... of each (`Group.share`; strided, so length-bucketed batches split evenly).
  The model runs in DistributedDataParallel (`Group.wrap`), which averages the gradients over the
  processes; process r scales its loss (a mean over its n_r targets) by W·n_r/N, N the batch's
  targets over all processes, so the average is the gradient of the global batch's mean loss.
  n_r and N come from the host-side batch that every process holds: no collective and no device
  sync per step. A process whose share is empty (a batch with fewer rows than processes) runs one
  row of the batch with weight 0, so every process takes part in every gradient all-reduce.
  The logged losses are Σ_r (n_r/N)·loss_r, summed over the processes whenever the loop reads them
  (`Group.reduce_sums`). Exact for losses that are means over the batch's targets (SASRec, DIF-SR);
  for loss terms with other denominators (MAN's, AutoCDSR's, MQSA-TED's extra terms) the target-
  weighted mean of the per-process values, and AutoCDSR's Pareto weights are solved per process.
- Evaluation: each process scores the same rows of every evaluation batch (`Group.take`); the
  ranks, their positions in the split and their domains are gathered (`Group.gather`) and put back
  in the split's order, so the metrics are computed from the very ranks one process would have.
  With the item table split (`--item-shards`), the shares are padded to equal sizes and the full
  ranking runs through `vocab_parallel_topk` (`ShardedItemEmbedding.rank_targets`).
- RNG (dropout, sampled negatives): with W > 1 every process reseeds torch at the start of each
  epoch from (seed, epoch, rank) (`Group.seed_epoch`), so the processes draw different masks and a
  resumed run repeats the uninterrupted one at the same world size without saving W RNG states;
  a single process keeps its one RNG stream, saved in the checkpoint, as before.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .data.batch import TrainBatch

__all__ = ["SINGLE", "TIMEOUT", "Group", "LossTerms", "group_from_env", "launch", "process_device", "select_rows"]

# how long a process waits for the others at a collective (rank 0 writing a checkpoint, a slow
# evaluation share) before the run fails instead of hanging
TIMEOUT = timedelta(minutes=30)
Batch = TypeVar("Batch")


class LossTerms(torch.nn.Module):
    """forward(batch) = terms(batch), the model's `loss_terms` (compiled or not): the module
    DistributedDataParallel wraps (its hooks run around `forward`; a recommender's entry point
    is `loss_terms`). The model is a submodule (DDP syncs its parameters); the model's own
    state_dict, what checkpoints hold, has no wrapper prefix."""

    def __init__(self, model: torch.nn.Module, terms: Callable[[TrainBatch], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.model = model
        self.terms = terms

    def forward(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        return self.terms(batch)


@dataclass(frozen=True)
class Group:
    """This process's place in a run: rank r of `world` processes; `device` is where collectives
    exchange tensors (the process's GPU for NCCL, cpu for gloo). world = 1: a single process, for
    which every method is the identity (no torch.distributed call)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    # --item-shards: the model's item table is split over the processes (`shard_item_table`); the
    # loss is then the global batch's on every process (see `share` and `wrap`)
    item_sharded: bool = False
    # the DistributedDataParallel wrappers made by `wrap`, released by `launch` (see `_release`)
    wrapped: list[torch.nn.Module] = field(default_factory=list, compare=False, repr=False)

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, locks --out and writes the outputs."""
        return self.rank == 0

    def take(self, batch: Batch) -> tuple[Batch, torch.Tensor]:
        """(this process's rows of `batch`, their int64 indices in it): rows rank, rank+W, ...
        (possibly none). With the item table split, every process gets ⌈B/W⌉ rows (the sharded
        lookup and ranking are collectives with equal shapes): its own first, then copies of row 0,
        which the index leaves out."""
        n = int(batch.items.shape[0])  # type: ignore[attr-defined]
        index = torch.arange(self.rank, n, self.world, dtype=torch.int64)
        if not self.item_sharded:
            return select_rows(batch, index), index
        padded = torch.cat([index, torch.zeros(-(-n // self.world) - index.numel(), dtype=torch.int64)])
        return select_rows(batch, padded), index

    def share(self, batch: TrainBatch) -> tuple[TrainBatch, Optional[float]]:
        """(this process's rows of a global training batch, n_r / N: its share of the batch's
        targets); (batch, None) for a single process. With no row of its own a process gets the
        batch's first row and share 0 (it still joins the gradient all-reduce)."""
        if not self.parallel:
            return batch, None
        per_row = (batch.targets != 0).sum(1)  # a CPU tensor: counting reads no device
        if self.item_sharded:
            return self._equal_share(batch, per_row)
        mine, index = self.take(batch)
        if index.numel() == 0:
            return select_rows(batch, torch.zeros(1, dtype=torch.int64)), 0.0
        return mine, int(per_row[index].sum()) / max(1, int(per_row.sum()))

    def _equal_share(self, batch: TrainBatch, per_row: torch.Tensor) -> tuple[TrainBatch, float]:
        """With the item table split: ⌈B/W⌉ rows on every process (the sharded lookup and the loss's
        all-gather need equal shapes), rows rank, rank+W, ... then copies of row 0 without targets."""
        mine, index = self.take(batch)
        if index.numel() < mine.items.shape[0]:
            targets = mine.targets.clone()
            targets[index.numel():] = 0
            mine = dataclasses.replace(mine, targets=targets)
        return mine, int(per_row[index].sum()) / max(1, int(per_row.sum()))

    def reduce_sums(self, sums: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The running loss sums added over the processes (one all-reduce); unchanged for one process."""
        if not self.parallel or not sums:
            return dict(sums)
        packed = torch.stack(list(sums.values())).to(self.device)
        dist.all_reduce(packed)
        return dict(zip(sums, packed.unbind()))

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-D `values` of every process (lengths may differ), concatenated in rank order, on the CPU."""
        if not self.parallel:
            return values
        count = torch.tensor([values.numel()], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        padded = torch.zeros(max(sizes), dtype=values.dtype, device=self.device)
        padded[:values.numel()] = values.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()

    def barrier(self) -> None:
        """Wait for every process (e.g. while rank 0 writes a checkpoint)."""
        if self.parallel:
            dist.barrier()

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """With W > 1: seed torch (CPU and CUDA) from (seed, epoch, rank) — each process its own
        stream, reproducible per epoch (module docstring). A single process keeps its stream."""
        if self.parallel:
            state = np.random.SeedSequence([int(seed), int(epoch), self.rank]).generate_state(1, np.uint64)
            torch.manual_seed(int(state[0]))

    def wrap(self, model: torch.nn.Module, terms: Callable[[TrainBatch], dict[str, torch.Tensor]]
             ) -> Callable[[TrainBatch], dict[str, torch.Tensor]]:
        """`terms` (the model's `loss_terms`, compiled or not) in DistributedDataParallel; `terms`
        itself for a single process.

        static_graph: a model may leave parameters out of its loss (DIF-SR's attribute heads with
        --aap-weight 0), always the same ones — a step reads no tensor value on the host
        (tests/test_no_host_sync.py), so which parameters a loss uses cannot depend on the data —
        which DDP then learns in the first step instead of searching the graph every step."""
        if not self.parallel:
            return terms
        from torch.nn.parallel import DistributedDataParallel

        module = LossTerms(model, terms)
        if self.item_sharded:  # each process's own rows of the table: not DDP's to broadcast or average
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                module, [f"model.{name}" for name, p in model.named_parameters() if _is_item_shard(model, p)])
        # device_ids=None: batches are already on the device (DDP would rebuild the dataclasses)
        wrapper = DistributedDataParallel(module, device_ids=None, static_graph=True)
        if self.item_sharded:
            # the loss is the global batch's on every process, so each process's gradient of the
            # shared parameters is its rows' part of the whole: summed, not averaged
            wrapper.register_comm_hook(None, _sum_gradients)
        self.wrapped.append(wrapper)
        return wrapper

    def loss_scale(self, share: Optional[float]) -> Optional[float]:
        """What the step multiplies the loss by before the backward: W·n_r/N when each process's
        loss is the mean over its own targets (DDP averages), none with the item table split (the
        loss is already the global mean on every process) or for a single process."""
        if share is None or self.item_sharded:
            return None
        return share * self.world


SINGLE = Group()


def _sum_gradients(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: all-reduce SUM of a gradient bucket (the default hook averages)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


# DDP compares the annotations with the real classes; this module's annotations are strings
_sum_gradients.__annotations__ = {"state": object, "bucket": dist.GradBucket,
                                  "return": torch.futures.Future[torch.Tensor]}


def _is_item_shard(model: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    from .distributed.embedding import ShardedItemEmbedding

    table = getattr(model, "item_embedding", None)
    return isinstance(table, ShardedItemEmbedding) and param is table.weight


def shard_item_table(model: torch.nn.Module, group: Group, backend: str) -> None:
    """Replace `model.item_embedding` (an Embedding(V + 1, D) with padding row 0) by this process's
    `ShardedItemEmbedding` rows (`--item-shards`), before the optimizer is built. The lookup
    exchange: "unique" on gloo (fewer bytes, measured), "dense" on NCCL (no host sync)."""
    from .distributed import ItemShard
    from .distributed.embedding import ShardedItemEmbedding

    table = model.item_embedding
    shard = ItemShard(table.weight.shape[0] - 1, group.rank, group.world)
    lookup = "unique" if torch.device(group.device).type == "cpu" else "dense"
    model.item_embedding = ShardedItemEmbedding(table.weight, shard, None, lookup, backend)


def whole_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with the item shard's per-row state (Adam's moments) gathered into the
    whole table's (V + 1, ...), row 0 zero: what one process's optimizer holds (a collective)."""
    state = optimizer.state_dict()
    return _map_item_state(model, state, lambda table, v: table.whole_state(v))


def shard_optimizer_state(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `whole_optimizer_state`: this process's rows of a whole-table optimizer state."""
    return _map_item_state(model, state, lambda table, v: table.shard_state(v))


def _map_item_state(model: torch.nn.Module, state: dict[str, Any], change: Callable[[Any, torch.Tensor], torch.Tensor]
                    ) -> dict[str, Any]:
    params = list(model.parameters())
    where = [i for i, p in enumerate(params) if _is_item_shard(model, p)]
    if not where:
        return state
    index, table = where[0], model.item_embedding
    per_param = dict(state["state"])
    if index in per_param:
        per_param[index] = {k: change(table, v) if isinstance(v, torch.Tensor) and v.dim() == 2 else v
                            for k, v in per_param[index].items()}
    return {**state, "state": per_param}


def select_rows(batch: Batch, index: torch.Tensor) -> Batch:
    """A TrainBatch / EvalBatch of the rows `index` of `batch` (every tensor field, and every
    tensor of a tuple field, indexed on dim 0; None stays None). The width stays the batch's."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(batch):  # type: ignore[arg-type]
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value[index]
        elif isinstance(value, tuple):
            changes[f.name] = tuple(t[index] for t in value)
    return dataclasses.replace(batch, **changes)  # type: ignore[type-var]


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        raise ValueError(f"torchrun's environment: {name}={environ.get(name)!r} is not an integer "
                         "(start data-parallel runs with torchrun --nproc-per-node N -m fastattn train ...)") from None


def group_from_env(environ: Optional[Mapping[str, str]] = None) -> Group:
    """The Group torchrun's variables describe (WORLD_SIZE, RANK); SINGLE without them or with
    WORLD_SIZE=1. ValueError on one line for values torchrun would not set."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return SINGLE
    world = _env_int(environ, "WORLD_SIZE")
    if world == 1:
        return SINGLE
    rank, local = _env_int(environ, "RANK"), _env_int(environ, "LOCAL_RANK")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"torchrun's environment: RANK={rank}, LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    return Group(rank, world)


def process_device(name: str, environ: Optional[Mapping[str, str]] = None) -> torch.device:
    """The device of this process for --device `name` in a data-parallel run: cpu, or cuda:LOCAL_RANK
    for --device cuda; ValueError naming --device for cuda:N (the local rank picks the GPU) or a
    process without a GPU of its own."""
    environ = os.environ if environ is None else environ
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device {name}: under torchrun each process uses the GPU of its local rank; "
                         "pass --device cuda")
    local, count = _env_int(environ, "LOCAL_RANK"), torch.cuda.device_count()
    if local >= count:
        raise ValueError(f"--device cuda: process {local} of this node has no GPU of its own ({count} CUDA "
                         f"device(s)); start at most {count} processes per node (--nproc-per-node)")
    return torch.device("cuda", local)


@contextlib.contextmanager
def launch(device_name: str) -> Iterator[tuple[Group, torch.device]]:
    """(group, device) of this process for the block. Under torchrun (WORLD_SIZE > 1): the process
    group is opened (gloo on cpu, NCCL on cuda:LOCAL_RANK, `TIMEOUT`) and destroyed when the block
    ends, also on an error. Otherwise (SINGLE, torch.device(device_name)), no process group."""
    group = group_from_env()
    if not group.parallel:
        yield SINGLE, torch.device(device_name)
        return
    device = process_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            rank=group.rank, world_size=group.world)
    group = dataclasses.replace(group, device=str(device))
    try:
        yield group, device
    finally:
        for wrapper in group.wrapped:
            _release(wrapper)
        dist.destroy_process_group()


def _release(wrapper: torch.nn.Module) -> None:
    """Drop the C++ reducer of a DistributedDataParallel wrapper (and its logger, which holds it)
    while the process group is still registered. Left to go whenever the wrapper goes (after the
    run, or with an exception's traceback), it would destroy the gloo group itself, and that
    destructor joins gloo's threads while holding the GIL, which a thread finishing a collective
    may be waiting for: a deadlock seen here at the end of runs (pytorch/pytorch#56297). The group
    itself goes in destroy_process_group, whose destructor releases the GIL."""
    for name in ("logger", "reducer"):
        wrapper.__dict__.pop(name, None)
