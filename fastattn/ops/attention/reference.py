"""Plain torch decoupled attention that materializes the (Lq, Lk) scores.

It is the ground truth of the tests (run in float64) and the naive baseline of the
benchmarks. Everything is computed in the input dtype except the softmax (float32), as
typical PyTorch recommender code does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .options import AttentionOptions


def visible_keys(
    batch: int, lq: int, lk: int, causal: bool, key_padding_mask: Optional[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Bool (B, 1, Lq, Lk): True where key j is visible to query i."""
    visible = torch.ones(batch, 1, lq, lk, dtype=torch.bool, device=device)
    if causal:
        visible = visible & torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    return visible


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    attr_q: Sequence[torch.Tensor],
    attr_k: Sequence[torch.Tensor],
    opts: AttentionOptions,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """P (B, H, Lq, Lk) = softmax(scale * (q kᵀ + Σ_f qa_f ka_fᵀ)) over visible keys.

    Rows without a visible key are all zero (not NaN), and so is their gradient.
    """
    scores = q @ k.transpose(-1, -2)
    for qa, ka in zip(attr_q, attr_k):
        scores = scores + qa @ ka.transpose(-1, -2)
    scores = scores * opts.scale
    b, _, lq, lk = scores.shape
    visible = visible_keys(b, lq, lk, opts.causal, key_padding_mask, scores.device)
    empty_row = ~visible.any(dim=-1, keepdim=True)
    # Empty rows get finite scores so softmax stays NaN-free; they are zeroed afterwards.
    scores = scores.masked_fill(~visible & ~empty_row, float("-inf")).masked_fill(empty_row, 0.0)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if scores.dtype != torch.float64 else None)
    return probs.masked_fill(empty_row, 0.0).to(q.dtype)


def dif_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attr_q: Sequence[torch.Tensor],
    attr_k: Sequence[torch.Tensor],
    opts: AttentionOptions,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_keep: Optional[torch.Tensor] = None,
    domains: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out, acd): out (B, H, Lq, Dv) = dropout(P) v, differentiable through torch autograd.

    dropout_keep: optional bool (B, H, Lq, Lk) mask of kept probabilities; when given it
        replaces torch's own dropout RNG (the tests pass the Triton kernel's mask here).
    domains: optional (dom_q (B, Lq), dom_k (B, Lk)); then acd (B, H, Lq) float32
        = Σ_j P_ij [dom_q(i) != dom_k(j)] with the pre-dropout P, else acd is None.
    """
    probs = attention_probs(q, k, attr_q, attr_k, opts, key_padding_mask)
    acd = None
    if domains is not None:
        cross = domains[0][:, None, :, None] != domains[1][:, None, None, :]
        acd = (probs * cross.to(probs.dtype)).sum(dim=-1)
        acd = acd if acd.dtype == torch.float64 else acd.float()
    if opts.has_dropout:
        if dropout_keep is None:
            probs = torch.nn.functional.dropout(probs, p=opts.dropout_p, training=True)
        else:
            probs = probs * dropout_keep.to(probs.dtype) / (1.0 - opts.dropout_p)
    return probs @ v, acd
