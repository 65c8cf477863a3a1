"""Triton backward of decoupled attention and its launchers.

Deterministic, no atomics: one pass parallel over key blocks accumulates dK and dV, another
parallel over query blocks accumulates dQ; both recompute P = exp2(S·log2e − LSE) tile by
tile. With D_i = dO_i·O_i (+ g_i·acd_i when acd carries a gradient g):

    dS_ij = P_ij · (dP_ij + g_i·M_ij − D_i),   dP = dropout(dO Vᵀ),   M_ij = [dom_q(i) ≠ dom_k(j)]
    dV = dropout(P)ᵀ dO,   dQ = scale · dS K,   dK = scale · dSᵀ Q
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._common import LOG2E, check_same_device, compact_float32_tiles, dot_precision
from ..triton_launch import KernelLaunch
from .triton_fwd import (
    dense_inputs, domain_arguments, dropout_keep, key_inputs, seed_argument, tile_config, visible_tile,
)


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
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < Lk
    dqk_ok = offs_dqk < DQK
    dv_ok = offs_dv < DVD

    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    DO += b.to(tl.int64) * stride_dob + h * stride_doh
    kv_off_k = b.to(tl.int64) * stride_kb + h * stride_kh
    kv_off_v = b.to(tl.int64) * stride_vb + h * stride_vh
    k = tl.load(K + kv_off_k + offs_n[:, None] * stride_kn + offs_dqk[None, :],
                mask=col_ok[:, None] & dqk_ok[None, :], other=0.0)
    v = tl.load(V + kv_off_v + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
    row_base = pid_bh.to(tl.int64) * Lq
    if HAS_DOMAINS:
        dom_k = tl.load(DOM_K + b * stride_domk_b + offs_n, mask=col_ok, other=-1)
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = 0
    if causal:
        # Queries before this key block never see it.
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, Lq, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < Lq
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_dqk[None, :],
                    mask=row_ok[:, None] & dqk_ok[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_dv[None, :],
                     mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        # Work on the transposed tile (keys × queries) so dK, dV need no transposes.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        visible_t = tl.trans(visible_tile(offs_m, offs_n, Lq, Lk, PAD, b * stride_pad_b, causal, has_padding))
        p_t = tl.where(visible_t, tl.math.exp2(s_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep_t = tl.trans(dropout_keep(seed, row_base + offs_m, start_n, Lk, dropout_p, BLOCK_N))
            inv_keep = 1.0 / (1.0 - dropout_p)
            pd_t = tl.where(keep_t, p_t * inv_keep, 0.0)
            dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        else:
            pd_t = p_t
        dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        if HAS_DOMAINS:
            g = tl.load(GACD + row_base + offs_m, mask=row_ok, other=0.0)
            dom_q = tl.load(DOM_Q + b * stride_domq_b + offs_m, mask=row_ok, other=-1)
            dp_t += tl.where(dom_k[:, None] != dom_q[None, :], g[None, :], 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + kv_off_k + offs_n[:, None] * stride_kn + offs_dqk[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & dqk_ok[None, :])
    tl.store(DV + kv_off_v + offs_n[:, None] * stride_vn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & dv_ok[None, :])


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


def bwd_launches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    grad_acd: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    domains: Optional[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[KernelLaunch], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Describe the two backward launches and allocate dq, dk, dv (same layout as q, k, v).

    q, k, v, dout: (B,H,L,D); lse, delta, grad_acd: fp32 (B,H,Lq), delta = rowsum(dout·out)
    (+ grad_acd·acd); grad_acd is given iff domains is given. Any strides (see `dense_inputs`).
    seed: the forward's int64 one-element tensor (needed iff dropout_p > 0).
    """
    check_same_device(q=q, k=k, v=v, dout=dout, lse=lse, delta=delta, grad_acd=grad_acd,
                      key_padding_mask=key_padding_mask, **domain_arguments(domains))
    q, k, v, dout, lse, delta = dense_inputs(q, k, v, dout, lse, delta)
    grad_acd = grad_acd.contiguous() if grad_acd is not None else None
    b, h, lq, dqk = q.shape
    lk, dvd = k.shape[2], v.shape[3]
    precision = dot_precision(q.dtype)
    cfg = tile_config(dqk, dvd, precision, compact_float32_tiles(q))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
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
    tensors = dict(Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, GACD=grad_acd, PAD=pad, DOM_Q=dom_q, DOM_K=dom_k)
    constexprs = dict(
        HAS_DROPOUT=dropout_p > 0.0, HAS_DOMAINS=domains is not None, DOT_PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DQK=cfg.block_dqk, BLOCK_DV=cfg.block_dv,
    )
    dkdv = KernelLaunch(
        _dif_attn_bwd_dkdv_kernel, grid=(triton.cdiv(lk, cfg.block_n) * b * h,),
        args={**tensors, "DK": dk, "DV": dv, **shared}, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dq_launch = KernelLaunch(
        _dif_attn_bwd_dq_kernel, grid=(triton.cdiv(lq, cfg.block_m) * b * h,),
        args={**tensors, "DQ": dq, **shared}, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return [dkdv, dq_launch], dq, dk, dv


KERNELS = (_dif_attn_bwd_dkdv_kernel, _dif_attn_bwd_dq_kernel)  # what `bwd_launches` can launch
