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
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .data.batch import EvalBatch
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
    (rejection sampling, redrawn until clean); ties count against the target (pessimistic). As in
    `topk_items`, a NaN score is ineligible: a NaN negative never beats the target, and a target
    scoring NaN gets rank `negatives` (a miss at every cut-off <= negatives).
    """
    if not isinstance(negatives, int) or isinstance(negatives, bool) or negatives < 1:
        raise ValueError(f"negatives must be an int >= 1, got {negatives!r}")
    b, num_items = target.shape[0], item_weight.shape[0]
    if num_items - 1 <= negatives:
        raise ValueError(f"the sampled protocol needs more than {negatives + 1} items, the catalog has {num_items - 1}")
    device = user_vectors.device
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
    candidates = torch.cat([target.unsqueeze(1), neg], 1)
    scores = torch.einsum("bd,bcd->bc", user_vectors.float(), item_weight[candidates].float())
    if bias is not None:
        scores = scores + bias[candidates].float()
    ranks = (scores[:, 1:] >= scores[:, :1]).sum(1)
    return torch.where(scores[:, 0].isnan(), torch.full_like(ranks, negatives), ranks)


@torch.no_grad()
def evaluate_model(model: SequentialRecommender, batches: Iterable[EvalBatch], device: torch.device | str,
                   ks: Sequence[int] = DEFAULT_KS, sampled: bool = False, seed: int = 0,
                   backend: str = "auto", exclude_history: bool = True) -> dict[str, float]:
    """Full-ranking HR@K / NDCG@K of `model` over `batches` (+ ``sampled_`` keys when `sampled`).

    exclude_history=False ranks the user's past items too (only the padding item, the first
    column of `EvalBatch.exclude`, stays out) — RecBole's protocol for sequential models.

    The model is put in eval mode (no dropout) for the pass and restored afterwards.
    """
    ks = check_ks(ks)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    full, samp, domains = [], [], []
    try:
        weight, bias = model.item_table()
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
        k = min(max(ks), weight.shape[0])
        for batch in batches:
            batch = batch.to(device)
            vectors = model.user_vectors(batch).to(weight.dtype)
            exclude = batch.exclude if exclude_history else batch.exclude[:, :1].contiguous()
            full.append(full_ranking_ranks(vectors, weight, batch.target, exclude, k, bias, backend).cpu())
            if batch.target_domain is not None:
                domains.append(batch.target_domain.cpu())
            if sampled:
                samp.append(sampled_ranks(vectors, weight, batch.target, batch.exclude, generator, bias).cpu())
    finally:
        model.train(was_training)
    ranks = torch.cat(full) if full else torch.zeros(0, dtype=torch.int64)
    out = metrics_from_ranks(ranks, ks)
    if sampled:
        out.update(metrics_from_ranks(torch.cat(samp) if samp else ranks, ks, prefix="sampled_"))
    out["users"] = float(ranks.numel())
    if domains and len(domains) == len(full):
        out.update(per_domain_metrics(ranks, torch.cat(domains), ks))
    return out


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
