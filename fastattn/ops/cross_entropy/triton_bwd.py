"""Triton backward of full-catalog cross-entropy (dense part), deterministic, no atomics.

Logits are recomputed tile by tile from the saved LSE. With per-row coefficients from the
Function (g = incoming gradient of row i's loss):

    dz_ij = scale · (coef_p_i · softmax_ij − coef_base_i − coef_t_i · [target_i = j])
    dH = dz E,   dE = dzᵀ H,   db = Σ_i dz_ij

One pass is parallel over row blocks (dH), the other over item blocks (dE, db); each may split
its loop into ranges whose fp32 partials the caller sums in a fixed order.

Gradient filtering (`grad_filter` > 0, Cut Cross-Entropy's idea): a tile's two backward dots are
skipped when every softmax probability in it is below grad_filter, no row's hard target is in it
and no row has a dense base (label smoothing). A constexpr (FILTER): the test and its branch cost
the unfiltered kernels up to 700 B of spills per thread (float32, D 128, sm_80/90), so only
grad_filter > 0 compiles them in.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton_launch import KernelLaunch
from .._common import LOG2E, check_same_device, compact_float32_tiles, dot_precision
from .triton_fwd import (CETileConfig, ce_tile_config, check_block_d, kernel_layout, load_items, load_rows,
                         logit_tile, split_count)


@triton.jit
def dlogit_tile(s, lse2, coef_p, coef_base, target, coef_t, offs_v, grad_filter, FILTER: tl.constexpr):
    """dz / scale of a (BLOCK_M, BLOCK_V) tile of base-2 logits s, and whether the tile's
    gradient must be accumulated (always without FILTER; else False when every entry is
    negligible under grad_filter)."""
    p = tl.math.exp2(s - lse2[:, None])
    hit = target[:, None] == offs_v[None, :]
    dz = coef_p[:, None] * p - coef_base[:, None]
    dz -= tl.where(hit, coef_t[:, None], 0.0)
    dz = tl.where(s == float("-inf"), 0.0, dz)
    needed = True
    if FILTER:
        # `not p < filter`: a NaN probability is never negligible (NaN must reach the gradients).
        big = ((coef_p[:, None] != 0.0) & ~(p < grad_filter)) | (hit & (coef_t[:, None] != 0.0))
        needed = tl.max((big | (coef_base[:, None] != 0.0)).to(tl.int32)) > 0
    return dz, needed


@triton.jit
def load_row_coefs(LSE2, COEF_P, COEF_BASE, TARGET, COEF_T, offs_m, row_ok):
    lse2 = tl.load(LSE2 + offs_m, mask=row_ok, other=0.0)
    coef_p = tl.load(COEF_P + offs_m, mask=row_ok, other=0.0)
    coef_base = tl.load(COEF_BASE + offs_m, mask=row_ok, other=0.0)
    target = tl.load(TARGET + offs_m, mask=row_ok, other=-1)
    coef_t = tl.load(COEF_T + offs_m, mask=row_ok, other=0.0)
    return lse2, coef_p, coef_base, target, coef_t


@triton.jit
def _ce_bwd_dh_kernel(
    H, E, BIAS, LSE2, COEF_P, COEF_BASE, TARGET, COEF_T, DH_PART,
    scale, scale_log2, grad_filter, N, V, D, stride_h, stride_e, items_per_split,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_row_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = tl.program_id(0) % n_row_blocks
    split = tl.program_id(0) // n_row_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    h, h_mask = load_rows(H, offs_m, offs_d, N, D, stride_h)
    lse2, coef_p, coef_base, target, coef_t = load_row_coefs(
        LSE2, COEF_P, COEF_BASE, TARGET, COEF_T, offs_m, row_ok)
    dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = split * items_per_split
    stop = tl.minimum(V, start + items_per_split)
    for start_v in range(start, stop, BLOCK_V):
        offs_v = start_v + tl.arange(0, BLOCK_V)
        e, b, col_ok = load_items(E, BIAS, offs_v, offs_d, stop, D, stride_e, HAS_BIAS)
        s = logit_tile(h, e, b, col_ok, scale_log2, DOT_PRECISION)
        dz, needed = dlogit_tile(s, lse2, coef_p, coef_base, target, coef_t, offs_v, grad_filter, FILTER)
        if needed:
            dh += tl.dot(dz.to(e.dtype), e, input_precision=DOT_PRECISION)
    out = DH_PART + split.to(tl.int64) * N * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(out, dh * scale, mask=h_mask)


@triton.jit
def _ce_bwd_de_kernel(
    H, E, BIAS, LSE2, COEF_P, COEF_BASE, TARGET, COEF_T, DE_PART, DB_PART,
    scale, scale_log2, grad_filter, N, V, D, stride_h, stride_e, rows_per_split,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_item_blocks = tl.cdiv(V, BLOCK_V)
    pid_v = tl.program_id(0) % n_item_blocks
    split = tl.program_id(0) // n_item_blocks
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    e, b, col_ok = load_items(E, BIAS, offs_v, offs_d, V, D, stride_e, HAS_BIAS)  # fixed for the whole loop
    de = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(N, start + rows_per_split)
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < stop
        h, _ = load_rows(H, offs_m, offs_d, stop, D, stride_h)
        lse2, coef_p, coef_base, target, coef_t = load_row_coefs(
            LSE2, COEF_P, COEF_BASE, TARGET, COEF_T, offs_m, row_ok)
        s = logit_tile(h, e, b, col_ok, scale_log2, DOT_PRECISION)
        dz, needed = dlogit_tile(s, lse2, coef_p, coef_base, target, coef_t, offs_v, grad_filter, FILTER)
        if needed:
            dz = tl.where(row_ok[:, None], dz, 0.0)
            de += tl.dot(tl.trans(dz).to(h.dtype), h, input_precision=DOT_PRECISION)
            db += tl.sum(dz, 0)
    base = split.to(tl.int64) * V
    tl.store(DE_PART + (base + offs_v[:, None].to(tl.int64)) * D + offs_d[None, :], de * scale,
             mask=col_ok[:, None] & (offs_d < D)[None, :])
    tl.store(DB_PART + base + offs_v, db * scale, mask=col_ok)


def bwd_launches(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
    lse: torch.Tensor, coef_p: torch.Tensor, coef_base: torch.Tensor, target: torch.Tensor,
    coef_t: torch.Tensor, grad_filter: float = 0.0, tiles: Optional[CETileConfig] = None,
) -> tuple[list[KernelLaunch], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Describe the dH and dE/db launches.

    hidden (N,D), weight (V,D), bias (V,) | None, any strides; lse, coef_*: (N,) fp32 (lse in
    natural log); target (N,) int64 (-1: none); grad_filter in [0, 1) (module docstring); tiles: a
    `ce_tile_candidates` entry (autotuning), None: the fixed choice.
    Returns (launches, dh_part (S1,N,D), de_part (S2,V,D), db_part (S2,V)), all fp32.
    """
    check_same_device(hidden=hidden, weight=weight, bias=bias, lse=lse, coef_p=coef_p, coef_base=coef_base,
                      target=target, coef_t=coef_t)
    hidden, weight, bias = kernel_layout(hidden, weight, bias)
    coef_p, coef_base, target, coef_t = (t.contiguous() for t in (coef_p, coef_base, target, coef_t))
    n, d = hidden.shape
    v = weight.shape[0]
    precision = dot_precision(hidden.dtype)
    cfg = tiles or ce_tile_config(d, precision, backward=True, compact=compact_float32_tiles(hidden),
                                  filtered=grad_filter > 0)
    check_block_d(cfg, d)
    row_blocks, item_blocks = triton.cdiv(n, cfg.block_m), triton.cdiv(v, cfg.block_v)
    dh_splits = split_count(row_blocks, item_blocks)
    items_per_split = triton.cdiv(item_blocks, dh_splits) * cfg.block_v
    dh_splits = max(1, triton.cdiv(v, items_per_split))
    de_splits = split_count(item_blocks, row_blocks)
    rows_per_split = triton.cdiv(row_blocks, de_splits) * cfg.block_m
    de_splits = max(1, triton.cdiv(n, rows_per_split))
    dev = hidden.device
    dh_part = torch.empty(dh_splits, n, d, dtype=torch.float32, device=dev)
    de_part = torch.empty(de_splits, v, d, dtype=torch.float32, device=dev)
    db_part = torch.empty(de_splits, v, dtype=torch.float32, device=dev)
    shared = dict(
        H=hidden, E=weight, BIAS=bias if bias is not None else weight, LSE2=lse * LOG2E,
        COEF_P=coef_p, COEF_BASE=coef_base, TARGET=target, COEF_T=coef_t,
    )
    sizes = dict(scale=scale, scale_log2=scale * LOG2E, grad_filter=float(grad_filter), N=n, V=v, D=d,
                 stride_h=hidden.stride(0), stride_e=weight.stride(0))
    constexprs = dict(HAS_BIAS=bias is not None, DOT_PRECISION=precision, FILTER=grad_filter > 0,
                      BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)
    dh = KernelLaunch(_ce_bwd_dh_kernel, grid=(row_blocks * dh_splits,),
                      args={**shared, "DH_PART": dh_part, **sizes, "items_per_split": items_per_split},
                      constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    de = KernelLaunch(_ce_bwd_de_kernel, grid=(item_blocks * de_splits,),
                      args={**shared, "DE_PART": de_part, "DB_PART": db_part, **sizes,
                            "rows_per_split": rows_per_split},
                      constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return [dh, de], dh_part, de_part, db_part


KERNELS = (_ce_bwd_dh_kernel, _ce_bwd_de_kernel)  # what `bwd_launches` can launch
