"""Vocab-parallel full-catalog cross-entropy: the item table split by rows over the ranks.

Per row i, z_ij = (h_i·E_j + b_j)/T over all V items, and a target t_ij = w_i·[j = y_i] + base_i
+ sparse_ij of mass m_i (as `fastattn.full_item_cross_entropy`; label smoothing ε is in base_i
= ε/V over the GLOBAL catalog). Rank r holds items S_r = [start, stop):

    LSE_r(i) = logsumexp_{j∈S_r} z_ij     = CE_r(i; target = first local item) + z_{i,start}
    LSE(i)   = logsumexp_r LSE_r(i)
    P_r(i)   = Σ_{j∈S_r} t_ij·T·z_ij      = w_i·[y_i∈S_r]·(h_i·E_{y_i} + b_{y_i})
                                           + base_i·(h_i·Σ_{j∈S_r} E_j + Σ_{j∈S_r} b_j)
                                           + Σ_{sparse entries e of row i with item in S_r} v_e·(h_i·E_e + b_e)
    loss_i   = m_i·LSE(i) − (1/T)·Σ_r P_r(i)

CE_r is the fused op on the shard (no N×V/W logits); its gradient in z is softmax_local − one-hot,
so adding z_{i,start} back (O(N·D) torch) makes ∂LSE_r/∂z = local softmax, and ∂LSE/∂LSE_r =
exp(LSE_r − LSE), hence ∂loss_i/∂z_ij = m_i·softmax_global_ij − t_ij: the exact gradient.
Forward communication: one all-gather of (2, N) per rank (LSE_r and P_r); backward: the
all-reduce of dH (N, D). dE and db stay on their rank.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .._autocast import autocast_device, autocast_inputs, autocast_off
from ..functional import SoftTarget, _row_targets, check_item_table, full_item_cross_entropy
from .collectives import copy_to_shards, gather_from_shards
from .shard import ItemShard, _dtype_code, check_layout

__all__ = ["vocab_parallel_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "triton", "cpp", "torch")


def check_table(hidden: object, item_weight_shard: object, bias_shard: object) -> None:
    """Local checks of hidden (..., D), item_weight_shard (V_r, D) and bias_shard (V_r,) | None:
    types, dtypes, devices, D (V_r = 0 allowed; the row count is checked with the shards)."""
    check_item_table(hidden, item_weight_shard, bias_shard, weight_name="item_weight_shard",
                     bias_name="bias_shard", shard=True)


def _check_options(ignore_index: object, label_smoothing: object, temperature: object, reduction: object,
                   backend: object) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dots(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cols: torch.Tensor,
          rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h[rows]·E[cols] + b[cols] in h's dtype (the compute dtype); rows=None: every row. The
    gathered rows' gradient is sparse (O(len(cols)·D)), not a second (V_r, D) buffer."""
    hr = h if rows is None else h[rows]
    out = (hr * F.embedding(cols, weight, sparse=True).to(h.dtype)).sum(dim=-1)
    return out + bias[cols].to(h.dtype) if bias is not None else out


class _RowsAndColumnSum(torch.autograd.Function):
    """table (V_r, ...) → (table, Σ_j table_j in the compute dtype) with ONE backward: the column
    sum's gradient (the same for every row) is added in place to the rows' gradient, instead of
    autograd summing a second (V_r, D) buffer into it (what table.sum(0) would cost)."""

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.dtype = table.shape, table.dtype
        return table.view_as(table), table.sum(dim=0, dtype=dtype)

    @staticmethod
    def backward(ctx: Any, d_rows: Optional[torch.Tensor], d_sum: Optional[torch.Tensor]
                 ) -> tuple[Optional[torch.Tensor], None]:
        if d_sum is None:
            return d_rows, None
        if d_rows is None:
            return d_sum.to(ctx.dtype).expand(ctx.shape).contiguous(), None
        if d_rows.is_sparse or not d_rows.is_contiguous():
            d_rows = d_rows.to_dense().contiguous()
        # In place: d_rows is a buffer of this call's graph alone (the fused op's dE, summed with
        # the row gathers' sparse gradient), never shared with another branch.
        return d_rows.add_(d_sum), None


def _tables(weight: torch.Tensor, bias: Optional[torch.Tensor], with_sums: bool, dtype: torch.dtype
            ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(weight, bias, Σ_j E_j or None, Σ_j b_j or None): the sums only when a dense target base needs them."""
    if not with_sums or weight.shape[0] == 0:
        return weight, bias, None, None
    weight, weight_sum = _RowsAndColumnSum.apply(weight, dtype)
    if bias is None:
        return weight, bias, weight_sum, None
    bias, bias_sum = _RowsAndColumnSum.apply(bias, dtype)
    return weight, bias, weight_sum, bias_sum


def _local_lse(hc: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               temperature: float, backend: str, used: torch.Tensor) -> torch.Tensor:
    """(N,) LSE_r = logsumexp over this shard's items, in h's dtype (the compute dtype), of hc (N, D)
    in the inputs' dtype and h, the same rows in the compute dtype; differentiable in all. Rows
    where `used` (N,) bool is False get a finite placeholder instead (their loss is masked to 0),
    so the fused op can skip them (the C++ kernels do: padding costs nothing)."""
    n = h.shape[0]
    if weight.shape[0] == 0:
        # No items: LSE_r = -inf (weight exp(-inf) = 0 in the global logsumexp, so no NaN). The
        # empty sums keep h in the graph, so this rank still joins the backward's all-reduce.
        lse = torch.full((n,), -math.inf, dtype=h.dtype, device=h.device) + h[:, :0].sum(-1)
        lse = lse + weight.sum().to(h.dtype)
        return lse + bias.sum().to(h.dtype) if bias is not None else lse
    first = torch.zeros(n, dtype=torch.int64, device=h.device)
    # ignore_index on the unused rows: their CE is 0 (and the C++ kernels skip them).
    ce = full_item_cross_entropy(hc, weight, torch.where(used, first, -100), bias=bias, temperature=temperature,
                                 reduction="none", ignore_index=-100, backend=backend)
    return ce + _dots(h, weight, bias, first) / temperature


def _local_linear(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: object,
                  shard: ItemShard, soft: bool, sums: tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
                  ) -> torch.Tensor:
    """(N,) P_r = Σ_{j in this shard} t_ij·(h_i·E_j + b_j) in h's dtype, the compute dtype
    (targets: functional's RowTargets; sums: `_tables`' Σ_j E_j and Σ_j b_j)."""
    acc = h.dtype
    n, size = h.shape[0], weight.shape[0]
    linear = torch.zeros(n, dtype=acc, device=h.device)
    if size == 0:
        return linear
    if not soft:  # the hard target: only its owner adds w_i·z_{i,y_i}
        index = targets.index
        owner = (index >= shard.start) & (index < shard.stop)
        local = (index - shard.start).clamp(0, size - 1)
        linear = torch.where(owner, targets.weight * _dots(h, weight, bias, local), linear)
    if targets.has_base:  # base_i over this shard's items: h·Σ_j E_j + Σ_j b_j
        weight_sum, bias_sum = sums
        total = h @ weight_sum
        if bias_sum is not None:
            total = total + bias_sum
        linear = linear + targets.base * total
    if targets.indices.numel() > 0:  # the sparse entries whose item this rank holds
        indices = targets.indices
        rows = torch.repeat_interleave(torch.arange(n, device=h.device), targets.indptr.diff(),
                                       output_size=indices.shape[0])
        inside = (indices >= shard.start) & (indices < shard.stop)
        local = (indices - shard.start).clamp(0, size - 1)
        contrib = torch.where(inside, targets.values * _dots(h, weight, bias, local, rows), 0.0)
        linear = linear.index_add(0, rows, contrib.to(acc))
    return linear


# Over 60 lines only by its docstring, the API reference; the body is under 40.
def vocab_parallel_cross_entropy(
    hidden: torch.Tensor,
    item_weight_shard: torch.Tensor,
    target: Union[torch.Tensor, SoftTarget],
    *,
    shard: ItemShard,
    group: Optional[dist.ProcessGroup] = None,
    bias_shard: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """`fastattn.full_item_cross_entropy` over a V-row item table split by rows over the ranks.

    Every rank of `group` passes the same global rows — hidden (..., D) (N rows), target: int64
    global item ids with hidden's leading shape (`ignore_index` skips a row) or a
    `fastattn.SoftTarget` over all V items — and its own rows: item_weight_shard (V_r, D) =
    rows [shard.start, shard.stop) of the table, bias_shard (V_r,) or None (on every rank alike);
    shard = ItemShard(V, rank, W) for this rank. Dtypes as full_item_cross_entropy (all alike).

    Math (global over all V items, z_ij = (h_i·E_j + b_j)/temperature)::

        loss_i = logsumexp_j z_ij − Σ_j t_ij z_ij
        hard y_i with label smoothing ε:  t_ij = (1 − ε)·[j = y_i] + ε/V   (V: the whole catalog)

    computed as logsumexp over ranks of each shard's fused log-sum-exp plus per-rank partial
    target sums (fastattn/distributed/cross_entropy.py). The result equals
    full_item_cross_entropy on the whole table up to rounding, reduction "mean" (over non-ignored
    rows; 0 when all are ignored), "sum" or "none", and is the same on every rank.

    Backward: every rank must call backward on the (same) loss. Each rank then gets the exact
    gradient of its item_weight_shard and bias_shard, and the whole gradient of hidden (the
    same on every rank). hidden.requires_grad must agree across ranks.

    Communication: one all-gather of W·(7 + 4) int64 (the shard check), one all-gather of (2, N)
    floats in the compute dtype forward, one all-reduce of (N, D) in the compute dtype (float32
    for half inputs: one rounding to hidden's dtype after the sum) backward.
    The shard check reads its result on the host (one sync on CUDA) and raises the same
    ValueError on every rank when the shards do not tile [0, V) in rank order, a table does not
    hold its shard's rows, or N, D, dtype or requires_grad differ across ranks. Argument errors
    that do not depend on the rank are raised before any communication.

    backend: the local fused op's ("auto": Triton on CUDA, the C++ kernels on CPU).
    """
    amp = autocast_device(hidden)
    if amp is not None:  # torch.autocast: cast inputs, rerun with autocast off (fastattn/_autocast.py)
        with autocast_off(amp):
            hidden, item_weight_shard, bias_shard = autocast_inputs((hidden, item_weight_shard, bias_shard), amp)
            return vocab_parallel_cross_entropy(
                hidden, item_weight_shard, target, shard=shard, group=group, bias_shard=bias_shard,
                ignore_index=ignore_index, label_smoothing=label_smoothing, temperature=temperature,
                reduction=reduction, backend=backend)
    check_table(hidden, item_weight_shard, bias_shard)
    _check_options(ignore_index, label_smoothing, temperature, reduction, backend)
    lead_shape, h2 = hidden.shape[:-1], hidden.reshape(-1, hidden.shape[-1])
    check_layout(shard, group, hidden.device, table_name="item_weight_shard", table_rows=item_weight_shard.shape[0],
                 bias_rows=-1 if bias_shard is None else bias_shard.shape[0],
                 consistent={"hidden rows N": h2.shape[0], "hidden size D": h2.shape[1],
                             "hidden dtype": _dtype_code(hidden.dtype),
                             "hidden.requires_grad": int(hidden.requires_grad and torch.is_grad_enabled())})
    # After the layout check: V is then the same on every rank, so a bad target raises everywhere.
    targets = _row_targets(target, h2.shape[0], shard.num_items, hidden.device, ignore_index, float(label_smoothing))
    used = targets.mass > 0
    # An ignored row contributes exactly 0 whatever it holds (NaN, inf), as in full_item_cross_entropy.
    # dH is all-reduced in the compute dtype (float32 for half inputs): one rounding to hidden's dtype
    # after the sum over ranks, not one per ring step.
    h = copy_to_shards(torch.where(used[:, None], h2, 0.0).to(_compute_dtype(h2.dtype)), group)
    hc = h if h.dtype == h2.dtype else h.to(h2.dtype)  # exact: h holds hidden's values
    weight, bias, *sums = _tables(item_weight_shard, bias_shard, targets.has_base, h.dtype)
    local = torch.stack([_local_lse(hc, h, weight, bias, float(temperature), backend, used),
                         _local_linear(h, weight, bias, targets, shard, isinstance(target, SoftTarget), sums)])
    every = gather_from_shards(local, group)  # (W, 2, N)
    lse, linear = torch.logsumexp(every[:, 0], dim=0), every[:, 1].sum(dim=0)
    loss = torch.where(used, targets.mass * lse, torch.zeros_like(lse)) - (1.0 / float(temperature)) * linear
    if reduction == "none":
        return loss.reshape(lead_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / used.sum().clamp_min(1)
