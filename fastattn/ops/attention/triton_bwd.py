"""Triton backward of decoupled attention and its launchers.

Deterministic, no atomics. With D_i = dO_i·O_i (+ g_i·acd_i when acd carries a gradient g):

    dS_ij = P_ij · (dP_ij + g_i·M_ij − D_i),   dP = dropout(dO Vᵀ),   M_ij = [dom_q(i) ≠ dom_k(j)]
    dV = dropout(P)ᵀ dO,   dQ = scale · dS K,   dK = scale · dSᵀ Q

where P = exp2(S·log2e − LSE) is recomputed from the forward's base-2 LSE. Two schedules:

- **fused** (sequences up to FUSED_MAX_LEN, what recommenders train on): one program per
  (batch, head) computes D_i for its rows, then walks the key blocks; for each it streams the
  query blocks, recomputes S and P once, and takes dV, dP, dK and dQ from that tile — 5 GEMMs
  and one exp per (query block, key block) pair, the FlashAttention-2 count. dK, dV stay in
  registers; dQ partial sums live in a float32 buffer the same program re-reads (a barrier
  orders the re-read after the write), so the result is deterministic without atomics.
- **split** (longer sequences, where B·H programs would leave the GPU idle): a D_i pre-pass, one
  pass parallel over key blocks for dK, dV (4 GEMMs per pair) and one parallel over query blocks
  for dQ (3 GEMMs per pair, a second exp) — more work, B·H·L/64 programs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._common import LOG2E, check_same_device, compact_float32_tiles, device_arch, dot_precision
from ..triton_launch import KernelLaunch
from .triton_fwd import (
    TileConfig, check_tiles_fit, dense_inputs, domain_arguments, dropout_keep, key_inputs, seed_argument, tile_config,
    visible_tile,
)

# Longest sequence (queries or keys) the fused schedule takes: each of its B·H programs walks
# all the tile pairs of its (batch, head) one after another.
FUSED_MAX_LEN = 256

# Tiles of the fused backward, by dot precision. Only the 64-wide class (concatenated QK and V
# head dims <= 64) is fused; wider heads take the split passes. The fused program holds K, V, dK,
# dV of a key block and Q, dO, S, dP, dQ of a query block at once: at the forward's 64×64 tiles
# ptxas spills 56–180 B (16-bit) and 0.1–2.5 KB (float32) per thread on sm_80/90. These are the
# largest candidates that compiled spill-free for sm_80, sm_86 and sm_90 at the headline shapes
# (docs/gpu-resources.md): 32×32 in 16-bit, 16 queries × 32 keys in tf32, 16×16 in tf32x3.
_FUSED_TILES = {
    "16-bit": TileConfig(64, 64, 32, 32, 4, 2),
    "tf32": TileConfig(64, 64, 16, 32, 4, 2),
    "tf32x3": TileConfig(64, 64, 16, 16, 4, 2),
}
# On sm_90 the 16-bit fused backward takes 64-key blocks: its keys × queries dots then have the
# 64 rows Hopper's warpgroup MMA (wgmma, asynchronous) needs, where 32 keys compile to Ampere's
# mma.sync; ptxas: 186–248 registers, 0 spills, 41–45 KB at the headline shapes (on sm_80 the
# same tiles spill 32–124 B, so sm_80/86/89 keep 32 × 32). Float32 stays on mma.sync everywhere:
# its spill-free tiles are too small for wgmma (docs/gpu-resources.md).
_FUSED_TILES_SM90 = {"16-bit": TileConfig(64, 64, 32, 64, 4, 2)}


@dataclass(frozen=True)
class BackwardPlan:
    """A backward schedule (`fused` or split) with its tiles: what autotuning chooses among."""

    fused: bool
    tiles: TileConfig


# Autotune alternatives of the fused schedule's tiles (ops/autotune.py), by the keys of
# _FUSED_TILES; every plan list also offers the split schedule at the forward's tiles.
_FUSED_CANDIDATES = {
    "16-bit": (TileConfig(64, 64, 16, 32, 4, 2), TileConfig(64, 64, 32, 32, 4, 2), TileConfig(64, 64, 32, 64, 4, 2)),
    "tf32": (TileConfig(64, 64, 32, 32, 4, 2),),
    "tf32x3": (TileConfig(64, 64, 16, 32, 4, 2),),
}


def backward_plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[BackwardPlan]:
    """The backward's autotune candidates for q (B,H,Lq,DQK), k (B,H,Lk,DQK), v (B,H,Lk,DV):
    the fixed choice first (`takes_fused_schedule`, then its tiles), then, where the fused schedule
    can run, its listed alternative tiles and the split schedule."""
    precision = dot_precision(q.dtype)
    lq, dqk = q.shape[2], q.shape[3]
    lk, dv = k.shape[2], v.shape[3]
    split = BackwardPlan(False, tile_config(dqk, dv, precision, compact_float32_tiles(q)))
    if not (max(dqk, dv) <= 64 and lk > 0):
        return [split]
    key = "16-bit" if q.dtype != torch.float32 else precision
    fixed = fused_tile_config(q.dtype, precision, device_arch(q))
    fused = [BackwardPlan(True, t) for t in (fixed, *(c for c in _FUSED_CANDIDATES[key] if c != fixed))]
    return fused + [split] if takes_fused_schedule(lq, lk, dqk, dv) else [split] + fused


def fused_tile_config(dtype: torch.dtype, precision: str, arch: Optional[int] = None) -> TileConfig:
    """The fused backward's tiles for inputs of `dtype` whose dots run in `precision`, compiled for
    sm_`arch` (`device_arch`; None: the interpreter)."""
    key = "16-bit" if dtype != torch.float32 else precision
    return (_FUSED_TILES_SM90 if arch == 90 else _FUSED_TILES).get(key, _FUSED_TILES[key])


def takes_fused_schedule(lq: int, lk: int, dqk: int, dv: int) -> bool:
    """Whether `bwd_launches` picks the fused schedule by default: both head dims in the 64-wide
    tile class, some keys, and no sequence longer than FUSED_MAX_LEN."""
    return max(dqk, dv) <= 64 and 0 < lk and max(lq, lk) <= FUSED_MAX_LEN


@triton.jit
def _row_delta(O, DO, ACD, GACD, rows, row_ok, offs_dv, DVD, HAS_DOMAINS: tl.constexpr):
    """D_i of flat rows `rows` ((b·H + h)·Lq + i) of the contiguous O, dO (rows × DVD), in float32."""
    mask = row_ok[:, None] & (offs_dv < DVD)[None, :]
    o = tl.load(O + rows[:, None] * DVD + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * DVD + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DOMAINS:
        delta += tl.load(GACD + rows, mask=row_ok, other=0.0) * tl.load(ACD + rows, mask=row_ok, other=0.0)
    return delta


@triton.jit
def _delta_kernel(O, DO, ACD, GACD, DELTA, n_rows, DVD,
                  HAS_DOMAINS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    delta = _row_delta(O, DO, ACD, GACD, rows, row_ok, tl.arange(0, BLOCK_DV), DVD, HAS_DOMAINS)
    tl.store(DELTA + rows, delta, mask=row_ok)


@triton.jit
def _load_key_block(K, V, DOM_K, kv_off_k, kv_off_v, offs_n, b, stride_kn, stride_vn, stride_domk_b, Lk, DQK, DVD,
                    HAS_DOMAINS: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """K, V rows `offs_n` of one (batch, head) and their domain ids (a 0 placeholder without)."""
    col_ok = offs_n < Lk
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + kv_off_k + offs_n[:, None] * stride_kn + offs_dqk[None, :],
                mask=col_ok[:, None] & (offs_dqk < DQK)[None, :], other=0.0)
    v = tl.load(V + kv_off_v + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv < DVD)[None, :], other=0.0)
    dom_k = 0
    if HAS_DOMAINS:
        dom_k = tl.load(DOM_K + b * stride_domk_b + offs_n, mask=col_ok, other=-1)
    return k, v, dom_k


@triton.jit
def _store_key_grads(DK, DV, dk, dv, scale, kv_off_k, kv_off_v, offs_n, stride_kn, stride_vn, Lk, DQK, DVD,
                     BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK = scale · dk and dV = dv of key rows `offs_n`, in the gradients' dtypes."""
    col_ok = offs_n < Lk
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(DK + kv_off_k + offs_n[:, None] * stride_kn + offs_dqk[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dqk < DQK)[None, :])
    tl.store(DV + kv_off_v + offs_n[:, None] * stride_vn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv < DVD)[None, :])


@triton.jit
def _query_block_grads_t(Q, DO, LSE, DELTA, GACD, DOM_Q, PAD, k, v, dom_k, start_m, offs_n, start_n, row_base, b,
                         seed, dropout_p, qk_scale, stride_qm, stride_dom, stride_pad_b, stride_domq_b,
                         Lq, Lk, DQK, DVD, causal, has_padding,
                         HAS_DROPOUT: tl.constexpr, HAS_DOMAINS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
                         BLOCK_DV: tl.constexpr):
    """One (key block × query block) tile of both schedules: loads query block `start_m` (Q, dO
    already offset to the (batch, head)) and returns (q, dO, dropout(P)ᵀ, dSᵀ, its flat rows,
    row mask); keys × queries, so that dK, dV need no transposes. The tile's S = K Qᵀ and
    dP = V dOᵀ GEMMs and its one exp."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    rows = row_base + offs_m
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_dqk[None, :],
                mask=row_ok[:, None] & (offs_dqk < DQK)[None, :], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv < DVD)[None, :], other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    visible_t = tl.trans(visible_tile(offs_m, offs_n, Lq, Lk, PAD, b * stride_pad_b, causal, has_padding))
    p_t = tl.where(visible_t, tl.math.exp2(s_t - lse[None, :]), 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep_t = tl.trans(dropout_keep(seed, rows, start_n, Lk, dropout_p, BLOCK_N))
        inv_keep = 1.0 / (1.0 - dropout_p)
        pd_t = tl.where(keep_t, p_t * inv_keep, 0.0)
        dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
    else:
        pd_t = p_t
    if HAS_DOMAINS:
        g = tl.load(GACD + rows, mask=row_ok, other=0.0)
        dom_q = tl.load(DOM_Q + b * stride_domq_b + offs_m, mask=row_ok, other=-1)
        dp_t += tl.where(dom_k[:, None] != dom_q[None, :], g[None, :], 0.0)
    return q, do, pd_t, p_t * (dp_t - delta[None, :]), rows, row_ok


@triton.jit
def _key_block_grads(Q, DO, LSE, DELTA, GACD, DOM_Q, PAD, DQ_ACC, k, v, dom_k, offs_n, start_n, row_base, b, seed,
                     dropout_p, qk_scale, scale, stride_qm, stride_dom, stride_pad_b, stride_domq_b,
                     Lq, Lk, DQK, DVD, causal, has_padding,
                     HAS_DROPOUT: tl.constexpr, HAS_DOMAINS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     ACCUMULATE_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """(dK / scale, dV) of key block (k, v) over every query block that sees it; with
    ACCUMULATE_DQ also dQ += scale · dS K into the float32 rows of DQ_ACC (written by the first
    key block, start_n = 0, which every query block sees, and added to by later ones)."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = 0
    if causal:
        lo = (start_n // BLOCK_M) * BLOCK_M  # queries before this key block never see it
    for start_m in range(lo, Lq, BLOCK_M):
        q, do, pd_t, ds_t, rows, row_ok = _query_block_grads_t(
            Q, DO, LSE, DELTA, GACD, DOM_Q, PAD, k, v, dom_k, start_m, offs_n, start_n, row_base, b, seed,
            dropout_p, qk_scale, stride_qm, stride_dom, stride_pad_b, stride_domq_b, Lq, Lk, DQK, DVD, causal,
            has_padding, HAS_DROPOUT, HAS_DOMAINS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if ACCUMULATE_DQ:
            dq_ptrs = DQ_ACC + rows[:, None] * DQK + offs_dqk[None, :]
            dq_mask = row_ok[:, None] & (offs_dqk < DQK)[None, :]
            dq = tl.load(dq_ptrs, mask=dq_mask & (start_n > 0), other=0.0)
            dq += tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=DOT_PRECISION) * scale
            tl.store(dq_ptrs, dq, mask=dq_mask)
    return dk, dv


@triton.jit
def _dif_attn_bwd_fused_kernel(
    Q, K, V, O, DO, LSE, ACD, GACD, PAD, DOM_Q, DOM_K, DQ, DK, DV, DQ_ACC, DELTA,
    qk_scale, scale, SEED, dropout_p,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_pad_b, stride_domq_b, stride_domk_b,
    H, Lq, Lk, DQK, DVD, causal, has_padding,
    HAS_DROPOUT: tl.constexpr, HAS_DOMAINS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DQ_IS_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # one program per (batch, head)
    b = pid_bh // H
    h = pid_bh % H
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    dqk_ok = offs_dqk < DQK
    row_base = pid_bh.to(tl.int64) * Lq  # flat (batch, head, query) rows of LSE, DELTA, O, DQ_ACC
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    # D_i of every query row of this (batch, head), before any tile needs it.
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < Lq
        delta = _row_delta(O, DO, ACD, GACD, row_base + offs_m, row_ok, tl.arange(0, BLOCK_DV), DVD, HAS_DOMAINS)
        tl.store(DELTA + row_base + offs_m, delta, mask=row_ok)
    tl.debug_barrier()  # other threads of this program read those rows below

    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    DO += b.to(tl.int64) * stride_dob + h * stride_doh
    kv_off_k = b.to(tl.int64) * stride_kb + h * stride_kh
    kv_off_v = b.to(tl.int64) * stride_vb + h * stride_vh
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + offs_n0
        k, v, dom_k = _load_key_block(K, V, DOM_K, kv_off_k, kv_off_v, offs_n, b, stride_kn, stride_vn,
                                      stride_domk_b, Lk, DQK, DVD, HAS_DOMAINS, BLOCK_DQK, BLOCK_DV)
        dk, dv = _key_block_grads(
            Q, DO, LSE, DELTA, GACD, DOM_Q, PAD, DQ_ACC, k, v, dom_k, offs_n, start_n, row_base, b, seed, dropout_p,
            qk_scale, scale, stride_qm, stride_dom, stride_pad_b, stride_domq_b, Lq, Lk, DQK, DVD, causal,
            has_padding, HAS_DROPOUT, HAS_DOMAINS, DOT_PRECISION, True, BLOCK_M, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        _store_key_grads(DK, DV, dk, dv, scale, kv_off_k, kv_off_v, offs_n, stride_kn, stride_vn, Lk, DQK, DVD,
                         BLOCK_DQK, BLOCK_DV)
        tl.debug_barrier()  # the next key block re-reads dQ rows other threads wrote

    if not DQ_IS_ACC:  # 16-bit dQ: cast the float32 sums
        for start_m in range(0, Lq, BLOCK_M):
            rows = row_base + start_m + offs_m0
            mask = ((start_m + offs_m0) < Lq)[:, None] & dqk_ok[None, :]
            dq = tl.load(DQ_ACC + rows[:, None] * DQK + offs_dqk[None, :], mask=mask, other=0.0)
            tl.store(DQ + rows[:, None] * DQK + offs_dqk[None, :], dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _dif_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, GACD, PAD, DOM_Q, DOM_K, DK, DV,
    qk_scale, scale, SEED, dropout_p,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_pad_b, stride_domq_b, stride_domk_b,
    H, Lq, Lk, DQK, DVD, causal, has_padding,
    HAS_DROPOUT: tl.constexpr,
    HAS_DOMAINS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    n_blocks = tl.cdiv(Lk, BLOCK_N)  # 1-D grid, as in the forward
    pid_n = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = pid_bh // H
    h = pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    row_base = pid_bh.to(tl.int64) * Lq
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    DO += b.to(tl.int64) * stride_dob + h * stride_doh
    kv_off_k = b.to(tl.int64) * stride_kb + h * stride_kh
    kv_off_v = b.to(tl.int64) * stride_vb + h * stride_vh
    k, v, dom_k = _load_key_block(K, V, DOM_K, kv_off_k, kv_off_v, offs_n, b, stride_kn, stride_vn, stride_domk_b,
                                  Lk, DQK, DVD, HAS_DOMAINS, BLOCK_DQK, BLOCK_DV)
    # DQ_ACC is unused without ACCUMULATE_DQ: any pointer stands in.
    dk, dv = _key_block_grads(
        Q, DO, LSE, DELTA, GACD, DOM_Q, PAD, DK, k, v, dom_k, offs_n, start_n, row_base, b, seed, dropout_p,
        qk_scale, scale, stride_qm, stride_dom, stride_pad_b, stride_domq_b, Lq, Lk, DQK, DVD, causal,
        has_padding, HAS_DROPOUT, HAS_DOMAINS, DOT_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_DQK, BLOCK_DV)
    _store_key_grads(DK, DV, dk, dv, scale, kv_off_k, kv_off_v, offs_n, stride_kn, stride_vn, Lk, DQK, DVD,
                     BLOCK_DQK, BLOCK_DV)


@triton.jit
def _dif_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, GACD, PAD, DOM_Q, DOM_K, DQ,
    qk_scale, scale, SEED, dropout_p,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_pad_b, stride_domq_b, stride_domk_b,
    H, Lq, Lk, DQK, DVD, causal, has_padding,
    HAS_DROPOUT: tl.constexpr,
    HAS_DOMAINS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    n_blocks = tl.cdiv(Lq, BLOCK_M)  # 1-D grid, as in the forward
    pid_m = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    dqk_ok = offs_dqk < DQK
    dv_ok = offs_dv < DVD

    q_off = b.to(tl.int64) * stride_qb + h * stride_qh
    q = tl.load(Q + q_off + offs_m[:, None] * stride_qm + offs_dqk[None, :],
                mask=row_ok[:, None] & dqk_ok[None, :], other=0.0)
    DO += b.to(tl.int64) * stride_dob + h * stride_doh
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    K += b.to(tl.int64) * stride_kb + h * stride_kh
    V += b.to(tl.int64) * stride_vb + h * stride_vh
    row_base = pid_bh.to(tl.int64) * Lq
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    if HAS_DOMAINS:
        g = tl.load(GACD + row_base + offs_m, mask=row_ok, other=0.0)
        dom_q = tl.load(DOM_Q + b * stride_domq_b + offs_m, mask=row_ok, other=-1)
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    hi = Lk
    if causal:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < Lk
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_dqk[None, :],
                    mask=col_ok[:, None] & dqk_ok[None, :], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = visible_tile(offs_m, offs_n, Lq, Lk, PAD, b * stride_pad_b, causal, has_padding)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, row_base + offs_m, start_n, Lk, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        if HAS_DOMAINS:
            dom_k = tl.load(DOM_K + b * stride_domk_b + offs_n, mask=col_ok, other=-1)
            dp += tl.where(dom_q[:, None] != dom_k[None, :], g[:, None], 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + q_off + offs_m[:, None] * stride_qm + offs_dqk[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & dqk_ok[None, :])


# Over 60 lines: the keyword arguments of both schedules' kernels (strides of seven tensors), written once.
def bwd_launches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    acd: Optional[torch.Tensor],
    grad_acd: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    domains: Optional[tuple[torch.Tensor, torch.Tensor]],
    fused: Optional[bool] = None,
    tiles: Optional[TileConfig] = None,
) -> tuple[list[KernelLaunch], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Describe the backward launches and allocate dq, dk, dv (contiguous, dtypes of q, k, v).

    q, k, v, dout, out: (B,H,L,D) in one dtype, any strides (see `dense_inputs`); lse: the
    forward's fp32 (B,H,Lq); acd, grad_acd: fp32 (B,H,Lq), given iff domains is given (D_i then
    adds grad_acd·acd). seed: the forward's int64 one-element tensor (needed iff dropout_p > 0).
    fused: the schedule (module docstring); None: `takes_fused_schedule`. True on wider heads or
    without keys raises ValueError. tiles: the schedule's tiles (a `backward_plans` entry,
    autotuning); None: its fixed ones.
    Returns ([fused] or [delta, dkdv, dq] launches, dq, dk, dv).
    """
    check_same_device(q=q, k=k, v=v, dout=dout, out=out, lse=lse, acd=acd, grad_acd=grad_acd,
                      key_padding_mask=key_padding_mask, **domain_arguments(domains))
    if (acd is None) != (domains is None) or (grad_acd is None) != (domains is None):
        raise ValueError("acd and grad_acd must be given exactly when domains are")
    q, k, v, dout, out, lse = dense_inputs(q, k, v, dout, out, lse)
    acd, grad_acd = (dense_inputs(acd, grad_acd) if domains is not None else (None, None))
    b, h, lq, dqk = q.shape
    lk, dvd = k.shape[2], v.shape[3]
    if fused is None:
        fused = takes_fused_schedule(lq, lk, dqk, dvd)
    elif fused and not (max(dqk, dvd) <= 64 and lk > 0):
        raise ValueError(f"the fused backward takes head dims <= 64 and at least one key, got dqk {dqk}, "
                         f"dv {dvd}, Lk {lk}")
    precision = dot_precision(q.dtype)
    cfg = tile_config(dqk, dvd, precision, compact_float32_tiles(q))
    if tiles is not None:
        check_tiles_fit(tiles, dqk, dvd)
        cfg = tiles
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    pad, dom_q, dom_k, key_strides = key_inputs(key_padding_mask, domains, lse)
    shared = dict(
        qk_scale=scale * LOG2E, scale=scale, SEED=seed_argument(seed, dropout_p, q.device), dropout_p=dropout_p,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_dob=dout.stride(0), stride_doh=dout.stride(1), stride_dom=dout.stride(2),
        **key_strides,
        H=h, Lq=lq, Lk=lk, DQK=dqk, DVD=dvd, causal=causal, has_padding=key_padding_mask is not None,
    )
    tensors = dict(Q=q, K=k, V=v, DO=dout, LSE=lse, GACD=grad_acd, PAD=pad, DOM_Q=dom_q, DOM_K=dom_k)
    constexprs = dict(
        HAS_DROPOUT=dropout_p > 0.0, HAS_DOMAINS=domains is not None, DOT_PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DQK=cfg.block_dqk, BLOCK_DV=cfg.block_dv,
    )
    if fused:
        cfg = tiles or fused_tile_config(q.dtype, precision, device_arch(q))
        constexprs.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
        dq_is_acc = q.dtype == torch.float32
        dq_acc = dq if dq_is_acc else torch.empty(q.shape, dtype=torch.float32, device=q.device)
        launch = KernelLaunch(
            _dif_attn_bwd_fused_kernel, grid=(b * h,),
            args={**tensors, "O": out, "ACD": acd, "DQ": dq, "DK": dk, "DV": dv, "DQ_ACC": dq_acc,
                  "DELTA": delta, **shared},
            constexprs={**constexprs, "DQ_IS_ACC": dq_is_acc},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return [launch], dq, dk, dv
    delta_launch = KernelLaunch(
        _delta_kernel, grid=(triton.cdiv(b * h * lq, 64),),
        args=dict(O=out, DO=dout, ACD=acd, GACD=grad_acd, DELTA=delta, n_rows=b * h * lq, DVD=dvd),
        constexprs=dict(HAS_DOMAINS=domains is not None, BLOCK_M=64, BLOCK_DV=cfg.block_dv),
    )
    dkdv = KernelLaunch(
        _dif_attn_bwd_dkdv_kernel, grid=(triton.cdiv(lk, cfg.block_n) * b * h,),
        args={**tensors, "DELTA": delta, "DK": dk, "DV": dv, **shared}, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dq_launch = KernelLaunch(
        _dif_attn_bwd_dq_kernel, grid=(triton.cdiv(lq, cfg.block_m) * b * h,),
        args={**tensors, "DELTA": delta, "DQ": dq, **shared}, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return [delta_launch, dkdv, dq_launch], dq, dk, dv


# What `bwd_launches` can launch (registered with the backward operator).
KERNELS = (_dif_attn_bwd_fused_kernel, _delta_kernel, _dif_attn_bwd_dkdv_kernel, _dif_attn_bwd_dq_kernel)
