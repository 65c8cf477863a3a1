"""Naive full-catalog cross-entropy that materializes the N×V logits — the ground truth of the
tests (float64) and the naive baseline of the benchmarks. Never used by a backend."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def materialized_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        temperature: float = 1.0) -> torch.Tensor:
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits / temperature


def naive_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                        bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                        label_smoothing: float = 0.0, temperature: float = 1.0,
                        reduction: str = "mean") -> torch.Tensor:
    """matmul + `F.cross_entropy`; target (N,) int64 class indices or (N, V) probabilities."""
    logits = materialized_logits(hidden, weight, bias, temperature)
    return F.cross_entropy(logits, target.reshape(-1) if target.dtype == torch.int64 else target,
                           ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
