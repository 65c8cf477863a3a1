"""Evaluation protocols (docs/training.md, "Evaluation protocol"): leave-one-out, full ranking with the
history masked.

Full ranking scores every item of the catalog for every evaluated user through
`fastattn.topk_items` (chunked over items: never an N×|items| matrix) and finds the held-out
item among the top max(K). The sampled protocol of the SASRec paper (the target among 100
random negatives) is available too and every key it reports is prefixed with ``sampled_``
so the two are never confused.

Cross-domain data (batches with `target_domain`): the same full ranking, and the metrics again
for the users of each target domain d under keys prefixed ``domain{d}_`` (``domain1_NDCG@10``,
with ``domain{d}_users``); d is the data set's domain id (0..num_domains-1). The ranking is over
the whole catalog in both cases (in KuaiRand the domain is the event type, not a property of
the item, so there is no per-domain candidate set to restrict to).

Metrics, for the 0-based rank r of the target (r = ∞ when it is not in the top K)::

    HR@K   = mean[r < K]
    NDCG@K = mean[r < K] / log2(r + 2)      (one relevant item, so IDCG = 1)
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional, Protocol, Sequence

import numpy as np
import torch

from .data.batch import EvalBatch
from .distributed.embedding import ShardedItemEmbedding
from .functional import topk_items
from .models.base import SequentialRecommender

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)
SAMPLED_NEGATIVES = 100


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Validated, sorted cut-offs; raises ValueError naming `ks`."""
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return tuple(sorted(set(ks)))


def metrics_from_ranks(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                       prefix: str = "") -> dict[str, float]:
    """HR@K and NDCG@K from 0-based target ranks (int, (n,)); a miss is any rank >= max(ks).

    Returns {"HR@5": ..., "NDCG@5": ..., ...} in float (0.0 for an empty set of ranks). A negative
    or NaN rank raises ValueError naming `ranks` (it would count as a hit).
    """
    ks = check_ks(ks)
    r = torch.as_tensor(np.asarray(ranks), dtype=torch.float64).reshape(-1)
    if r.numel() and not bool((r >= 0).all()):
        raise ValueError(f"ranks must be 0-based ranks >= 0, got min {r.min().item()}")
    out: dict[str, float] = {}
    n = max(1, r.numel())
    for k in ks:
        hit = r < k
        gain = torch.where(hit, 1.0 / torch.log2(r.clamp(min=0) + 2.0), torch.zeros_like(r))
        out[f"{prefix}HR@{k}"] = float(hit.sum().item()) / n
        out[f"{prefix}NDCG@{k}"] = float(gain.sum().item()) / n
    return out


def full_ranking_ranks(user_vectors: torch.Tensor, item_weight: torch.Tensor, target: torch.Tensor,
                       exclude: Optional[torch.Tensor], k: int, bias: Optional[torch.Tensor] = None,
                       backend: str = "auto") -> torch.Tensor:
    """0-based rank of each target among all items not excluded; k (a miss) when not in the top k.

    user_vectors (B, D), item_weight (V, D), target (B,) int64, exclude (B, M) int64 (-1 unused).
    An excluded target (the user consumed it before) counts as a miss, as in RecBole.
    """
    _, index = topk_items(user_vectors, item_weight, k, bias=bias, exclude=exclude, backend=backend)
    found = index == target.unsqueeze(1)
    return torch.where(found.any(1), found.to(torch.int64).argmax(1), torch.full_like(target, k))


def sampled_ranks(user_vectors: torch.Tensor, item_weight: torch.Tensor, target: torch.Tensor,
                  exclude: Optional[torch.Tensor], generator: torch.Generator,
                  bias: Optional[torch.Tensor] = None, negatives: int = SAMPLED_NEGATIVES) -> torch.Tensor:
    """0-based rank of the target among `negatives` uniformly drawn items (SASRec paper protocol).

    Negatives are drawn from items 1..V-1 that are neither the target nor in `exclude`
    (rejection sampling, redrawn until clean: `draw_negatives`); ties count against the target
    (pessimistic). As in `topk_items`, a NaN score is ineligible: a NaN negative never beats the
    target, and a target scoring NaN gets rank `negatives` (a miss at every cut-off <= negatives).
    """
    neg = draw_negatives(target, exclude, item_weight.shape[0], generator, negatives)
    return score_sampled(user_vectors, item_weight, target, neg, bias)


def draw_negatives(target: torch.Tensor, exclude: Optional[torch.Tensor], num_items: int,
                   generator: torch.Generator, negatives: int = SAMPLED_NEGATIVES) -> torch.Tensor:
    """(B, negatives) int64 on target's device: items of 1..num_items-1 that are neither the row's
    target nor in its `exclude` (B, M), drawn from the CPU `generator` (rejection sampling)."""
    if not isinstance(negatives, int) or isinstance(negatives, bool) or negatives < 1:
        raise ValueError(f"negatives must be an int >= 1, got {negatives!r}")
    b = target.shape[0]
    if num_items - 1 <= negatives:
        raise ValueError(f"the sampled protocol needs more than {negatives + 1} items, the catalog has {num_items - 1}")
    device = target.device
    neg = torch.randint(1, num_items, (b, negatives), generator=generator).to(device)
    forbidden = target.unsqueeze(1) if exclude is None else torch.cat([target.unsqueeze(1), exclude], 1)
    for _ in range(100):
        bad = (neg.unsqueeze(2) == forbidden.unsqueeze(1)).any(2)
        if not bool(bad.any()):
            break
        redraw = torch.randint(1, num_items, (int(bad.sum()),), generator=generator).to(device)
        neg[bad] = redraw
    else:
        raise ValueError("the sampled protocol could not draw 100 negatives outside the users' histories "
                         "(catalog too small for it)")
    return neg


def score_sampled(user_vectors: torch.Tensor, item_weight: torch.Tensor, target: torch.Tensor,
                  neg: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0-based rank of each target among its negatives `neg` (B, N) (see `sampled_ranks`)."""
    candidates = torch.cat([target.unsqueeze(1), neg], 1)
    scores = torch.einsum("bd,bcd->bc", user_vectors.float(), item_weight[candidates].float())
    if bias is not None:
        scores = scores + bias[candidates].float()
    ranks = (scores[:, 1:] >= scores[:, :1]).sum(1)
    return torch.where(scores[:, 0].isnan(), torch.full_like(ranks, neg.shape[1]), ranks)


class RowShare(Protocol):
    """The part of every evaluation batch one process of a data-parallel run scores
    (`fastattn.data_parallel.Group`)."""

    def take(self, batch: EvalBatch) -> tuple[EvalBatch, torch.Tensor]:
        """(this process's rows of `batch`, their int64 indices in it)."""
        ...

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-D `values` of every process, concatenated (the same order for every call)."""
        ...


@torch.no_grad()
def evaluate_model(model: SequentialRecommender, batches: Iterable[EvalBatch], device: torch.device | str,
                   ks: Sequence[int] = DEFAULT_KS, sampled: bool = False, seed: int = 0,
                   backend: str = "auto", exclude_history: bool = True,
                   share: Optional[RowShare] = None) -> dict[str, float]:
    """Full-ranking HR@K / NDCG@K of `model` over `batches` (+ ``sampled_`` keys when `sampled`).

    exclude_history=False ranks the user's past items too (only the padding item, the first
    column of `EvalBatch.exclude`, stays out) — RecBole's protocol for sequential models.

    share: in a data-parallel run, this process scores only its rows of each batch
    (`RowShare.take`; the sampled negatives are still drawn for the whole batch, as one process
    draws them) and the ranks of all processes are gathered back into the batches' row order, so
    every process returns the metrics one process computes over all rows.

    The model is put in eval mode (no dropout) for the pass and restored afterwards.
    """
    ks = check_ks(ks)
    was_training = model.training
    model.eval()
    try:
        ranks, samp, domains = _all_ranks(model, batches, device, k=max(ks), sampled=sampled, seed=seed,
                                          backend=backend, exclude_history=exclude_history, share=share)
    finally:
        model.train(was_training)
    out = metrics_from_ranks(ranks, ks)
    if samp is not None:
        out.update(metrics_from_ranks(samp, ks, prefix="sampled_"))
    out["users"] = float(ranks.numel())
    if domains is not None:
        out.update(per_domain_metrics(ranks, domains, ks))
    return out


def _all_ranks(model: SequentialRecommender, batches: Iterable[EvalBatch], device: torch.device | str, k: int,
               sampled: bool, seed: int, backend: str, exclude_history: bool, share: Optional[RowShare]
               ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(full-ranking ranks, sampled ranks or None, target domains or None) of every row of `batches`."""
    generator = torch.Generator().manual_seed(seed)
    full, samp, domains, where = [], [], [], []
    sharded = _sharded_item_table(model)
    if sharded is not None:  # --item-shards: rank on the shards, never gather the table
        weight, bias = sharded.weight.detach(), None
        num_rows = sharded.shard.num_items + 1
    else:
        weight, bias = model.item_table()
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
        num_rows = weight.shape[0]
    k = min(k, num_rows)
    offset = 0
    for batch in batches:
        negatives, size = None, batch.target.shape[0]
        if share is not None:
            if sampled:  # drawn for the whole batch, as one process draws them: the same negatives
                negatives = draw_negatives(batch.target, batch.exclude, num_rows, generator)
            batch, rows = share.take(batch)
            where.append(rows + offset)
            offset += size
            negatives = None if negatives is None else negatives[rows]
            size = rows.numel()  # the share may be padded (item-sharded): ranks of its own rows only
        if batch.target_domain is not None:
            domains.append(batch.target_domain[:size].cpu())
        ranks, local_sampled = _batch_ranks(model, batch.to(device), _Table(weight, bias, sharded), k, backend,
                                            exclude_history, sampled, generator, negatives)
        full.append(ranks[:size])
        if local_sampled is not None:
            samp.append(local_sampled[:size])
    ranks = torch.cat(full) if full else torch.zeros(0, dtype=torch.int64)
    sampled_out = (torch.cat(samp) if samp else ranks) if sampled else None
    domain_out = torch.cat(domains) if domains and len(domains) == len(full) else None
    if share is not None:  # every process's rows, back in the batches' row order
        order = share.gather(torch.cat(where) if where else torch.zeros(0, dtype=torch.int64)).argsort()
        ranks = share.gather(ranks)[order]
        sampled_out = None if sampled_out is None else share.gather(sampled_out)[order]
        domain_out = None if domain_out is None else share.gather(domain_out)[order]
    return ranks, sampled_out, domain_out


class _Table(NamedTuple):
    """What a batch is ranked against: the whole table (V + 1, D) and bias, or with the table split
    over processes (`sharded`), this process's rows (their dtype is the user vectors')."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    sharded: Optional[ShardedItemEmbedding]


def _sharded_item_table(model: SequentialRecommender) -> Optional[ShardedItemEmbedding]:
    table = getattr(model, "item_embedding", None)
    return table if isinstance(table, ShardedItemEmbedding) else None


def _batch_ranks(model: SequentialRecommender, batch: EvalBatch, table: _Table, k: int, backend: str,
                 exclude_history: bool, sampled: bool, generator: torch.Generator,
                 negatives: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(full-ranking ranks, sampled ranks or None) of one batch's rows, on the CPU; `negatives`:
    drawn already (data-parallel), else drawn here from `generator`. A batch without rows (a
    process's empty share) runs no model."""
    if batch.target.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, (empty if sampled else None)
    weight, bias = table.weight, table.bias
    vectors = model.user_vectors(batch).to(weight.dtype)
    exclude = batch.exclude if exclude_history else batch.exclude[:, :1].contiguous()
    if table.sharded is not None:  # the sampled protocol is refused with --item-shards (train_config)
        return table.sharded.rank_targets(vectors, batch.target, exclude, k).cpu(), None
    full = full_ranking_ranks(vectors, weight, batch.target, exclude, k, bias, backend).cpu()
    if not sampled:
        return full, None
    if negatives is None:
        return full, sampled_ranks(vectors, weight, batch.target, batch.exclude, generator, bias).cpu()
    return full, score_sampled(vectors, weight, batch.target, negatives.to(vectors.device), bias).cpu()


def per_domain_metrics(ranks: torch.Tensor, domains: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
                       ) -> dict[str, float]:
    """HR@K / NDCG@K of the users of each target domain: ranks (n,), domains (n,) int64 →
    {"domain{d}_HR@5": ..., ..., "domain{d}_users": n_d} for every domain d present."""
    if ranks.shape != domains.shape:
        raise ValueError(f"ranks {tuple(ranks.shape)} and domains {tuple(domains.shape)} must have the same shape")
    out: dict[str, float] = {}
    for d in torch.unique(domains).tolist():
        chosen = ranks[domains == d]
        out.update(metrics_from_ranks(chosen, ks, prefix=f"domain{d}_"))
        out[f"domain{d}_users"] = float(chosen.numel())
    return out


def ndcg_at(rank: int, k: int) -> float:
    """NDCG@k of one user whose target sits at 0-based `rank` (helper for hand checks)."""
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0
