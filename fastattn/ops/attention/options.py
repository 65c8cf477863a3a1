"""Non-tensor options of one attention call, shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._common import MAX_QK_DIM, MAX_V_DIM, compute_dtype

__all__ = ["MAX_QK_DIM", "MAX_V_DIM", "AttentionOptions", "forward_output_like"]


@dataclass(frozen=True)
class AttentionOptions:
    """Options of `dif_attention` after validation.

    scale: multiplier of the summed scores (already resolved, never None).
    causal: key j visible to query i iff j <= i (top-left aligned).
    dropout_p: probability of zeroing an attention probability; 0 disables dropout.
    """

    scale: float
    causal: bool = True
    dropout_p: float = 0.0

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0


def forward_output_like(q: torch.Tensor, v: torch.Tensor, has_domains: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (out (B,H,Lq,Dv), lse (B,H,Lq), acd (B,H,Lq) or (0,)) of the attention forward: the
    fake kernels' outputs. lse/acd are float64 for float64 inputs, else float32."""
    b, h, lq, _ = q.shape
    stats = compute_dtype(q.dtype)
    out = q.new_empty((b, h, lq, v.shape[3]))
    lse = q.new_empty((b, h, lq), dtype=stats)
    acd = q.new_empty((b, h, lq) if has_domains else (0,), dtype=stats)
    return out, lse, acd

