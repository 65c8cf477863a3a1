"""autograd.Function of full-catalog cross-entropy, shared by the Triton and chunked torch kernels.

Per row i, with z_ij = scale·(h_i·E_j + b_j), target t_ij = w_i·[j = y_i] + base_i + sparse_ij
and mass_i = Σ_j t_ij (1, or 0 for an ignored row):

    loss_i = mass_i·LSE_i − Σ_j t_ij z_ij
    Σ_j t_ij z_ij = w_i z_{i,y_i} + base_i·scale·(h_i·Σ_j E_j + Σ_j b_j) + Σ_sparse value·z_ij

The kernels give LSE and the dense + hard-target part of the gradient; the sparse part (cost
∝ its nonzeros) is gathered here, deterministically (segment sums, per row and per item) and
without reading a tensor value on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from ..autograd_guard import no_second_derivative

_NOT_TWICE = ("full_item_cross_entropy cannot be differentiated twice: its fused backward has no derivative "
              "(for second derivatives use the materialized logits, e.g. F.cross_entropy(hidden @ item_weight.T, "
              "target))")


class CrossEntropyKernels(Protocol):
    @staticmethod
    def lse(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        ...

    @staticmethod
    def backward(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        lse: torch.Tensor, coef_p: torch.Tensor, coef_base: torch.Tensor, target: torch.Tensor,
        coef_t: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        ...


@dataclass(frozen=True)
class RowTargets:
    """Targets resolved per row (all (N,) unless noted): hard index (-1: none) with weight,
    dense base, total mass, and the CSR sparse part (indptr (N+1,), indices/values (nnz,)).
    has_base: False when the caller knows every base is 0 (hard targets without label
    smoothing), which skips the dense base term without reading `base` on the host."""

    index: torch.Tensor
    weight: torch.Tensor
    base: torch.Tensor
    mass: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    has_base: bool = True

    @property
    def has_sparse(self) -> bool:
        return self.indices.numel() > 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs (so gradcheck sees exact math), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_dots(h32: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """h_rows·E_cols + b_cols in h32's dtype (the compute dtype), (len(rows),)."""
    dots = (h32[rows] * weight[cols].to(h32.dtype)).sum(dim=-1)
    return dots + bias[cols].to(h32.dtype) if bias is not None else dots


class FullItemCrossEntropyFunction(torch.autograd.Function):
    """Per-row loss (N,) fp32 = f(hidden (N,D), weight (V,D), bias (V,) | None)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, kernels: CrossEntropyKernels, scale: float, targets: RowTargets,
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    ) -> torch.Tensor:
        lse = kernels.lse(hidden, weight, bias, scale)
        h32 = hidden.to(compute_dtype(hidden.dtype))
        safe_index = targets.index.clamp_min(0)
        linear = targets.weight * _row_dots(h32, weight, bias, torch.arange(hidden.shape[0], device=hidden.device),
                                            safe_index)
        if targets.has_base:
            total = h32 @ weight.to(h32.dtype).sum(dim=0)
            if bias is not None:
                total = total + bias.to(h32.dtype).sum()
            linear = linear + targets.base * total
        if targets.has_sparse:
            rows = _sparse_rows(targets)
            contrib = targets.values * _row_dots(h32, weight, bias, rows, targets.indices)
            linear = linear + torch.segment_reduce(contrib, "sum", offsets=targets.indptr, axis=0)
        # mass 0 (ignored rows) must give 0 even where lse is large.
        loss = torch.where(targets.mass > 0, targets.mass * lse, torch.zeros_like(lse)) - scale * linear
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.kernels, ctx.scale, ctx.targets = kernels, scale, targets
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        # The engine runs backward under the caller's autocast state: keep the chunked kernels'
        # float32 products float32 (the forward ran with autocast off, on already-cast inputs).
        with torch.no_grad(), torch.autocast(grad_loss.device.type, enabled=False):
            grads = _gradients(ctx, grad_loss)
        if torch.is_grad_enabled():
            grads = no_second_derivative(grads, _NOT_TWICE, (*ctx.saved_tensors[:3], grad_loss))
        return grads


def _gradients(ctx: Any, grad_loss: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    """The Function's backward proper: (None, None, None, dhidden, dweight, dbias)."""
    hidden, weight, bias, lse = ctx.saved_tensors
    t: RowTargets = ctx.targets
    acc = compute_dtype(hidden.dtype)
    g = grad_loss.to(acc).contiguous()
    dh, de, db = ctx.kernels.backward(
        hidden, weight, bias, ctx.scale, lse, (g * t.mass).contiguous(), (g * t.base).contiguous(),
        t.index, (g * t.weight).contiguous(),
    )
    if t.has_sparse:
        rows = _sparse_rows(t)
        dz = -ctx.scale * g[rows] * t.values  # (nnz,)
        dh = dh + torch.segment_reduce(dz[:, None] * weight[t.indices].to(acc), "sum", offsets=t.indptr, axis=0)
        # dE_j += Σ_e dz_e [h_row(e) | 1]: entries sorted by item (stable), one segment sum per item —
        # deterministic, no atomics, and no data-dependent size (a sparse coalesce would sync).
        n, v = hidden.shape[0], weight.shape[0]
        order = torch.argsort(t.indices, stable=True)
        item_offsets = torch.searchsorted(t.indices[order], torch.arange(v + 1, device=hidden.device))
        rhs = torch.cat([hidden.to(acc), torch.ones(n, 1, dtype=acc, device=hidden.device)], dim=1)
        both = torch.segment_reduce(dz[order, None] * rhs[rows[order]], "sum", offsets=item_offsets, axis=0)
        de = de + both[:, :-1]
        if db is not None:
            db = db + both[:, -1]
    return (None, None, None, dh.to(hidden.dtype), de.to(weight.dtype),
            db.to(bias.dtype) if bias is not None and db is not None else None)


def _sparse_rows(t: RowTargets) -> torch.Tensor:
    """(nnz,) int64: the row of each sparse entry (output_size given: no device sync)."""
    counts = t.indptr[1:] - t.indptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                   output_size=t.indices.shape[0])
