"""Triton forward of decoupled attention (flash style) and its launcher.

All score streams share one softmax, so the launcher concatenates them along the head dim
([q | qa_1 | …] and [k | ka_1 | …]) and the kernel sees one QK head dim (DQK) that differs from
V's (DV). Each program owns BLOCK_M query rows of one (batch, head) and streams over key
blocks with an online softmax; the n×n scores never exist in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton_launch import KernelLaunch
from .._common import LOG2E, MAX_QK_DIM, MAX_V_DIM, check_same_device, compact_float32_tiles, dot_precision


@triton.jit
def dropout_keep(seed, rows, start_n, Lk, dropout_p, BLOCK_N: tl.constexpr):
    """Keep-mask of the tile of flat rows `rows` (int64 (b·H + h)·Lq + i) × keys [start_n, start_n + BLOCK_N).

    Counter-based, so any pass (and `_dropout_keep_kernel`, and csrc/attention.cpp) regenerates
    it: Philox-4x32-10 with key (low, high 32-bit word) of the call's 64-bit seed (an int64 the
    kernels load from SEED), and element (R, j) takes output word j % 4 of the 64-bit counter
    R·⌈Lk/4⌉ + j // 4 (split into counter words c0, c1). Each row starts a fresh counter, so a
    tile (start_n a multiple of 4) is whole counters and all four outputs are used whatever Lk;
    only the ≤ 3 words past a row's end are unused. Counters never repeat within a call, and
    calls differ by their key.
    """
    groups = (Lk + 3) // 4
    counter = rows[:, None] * groups + (start_n // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    # seed is in [0, 2**63): truncating casts give its low and high words.
    r0, r1, r2, r3 = tl.philox_impl(c0, c1, zero, zero, seed.to(tl.uint32), (seed >> 32).to(tl.uint32))
    # Words in the order r0, r1, r2, r3 of each counter along the keys.
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return tl.uint_to_uniform_float(bits) >= dropout_p


def seed_argument(seed: Optional[torch.Tensor], dropout_p: float, device: torch.device) -> Optional[torch.Tensor]:
    """The kernels' SEED pointer: the call's int64 seed, one element on the kernels' `device` (the
    kernels load it, so the host never reads it and a CUDA graph replays fresh draws); None
    without dropout (the kernels then never read it)."""
    if dropout_p <= 0.0:
        return None
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
        got = None if seed is None else f"{seed.dtype} of shape {tuple(seed.shape)} on {seed.device}"
        raise ValueError(f"dropout needs the seed as a one-element int64 tensor on {device}, got {got}")
    return seed.reshape(1)


@triton.jit
def visible_tile(offs_m, offs_n, Lq, Lk, PAD, pad_row, causal, has_padding):
    """(BLOCK_M, BLOCK_N) bool: key offs_n exists, is not padding and (causal) is not after the query.

    causal and has_padding are runtime flags (uniform branches): each costs one compare per
    score, while as constexprs they would quadruple the compile matrix (tests/test_gpu_compile.py).
    """
    visible = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if causal:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    if has_padding:
        is_pad = tl.load(PAD + pad_row + offs_n, mask=offs_n < Lk, other=1)
        visible = visible & (is_pad == 0)[None, :]
    return visible


# Over 60 lines on purpose: one program's online-softmax loop, whose running max, sum and
# accumulator would only be passed in and out of @triton.jit helpers.
@triton.jit
def _dif_attn_fwd_kernel(
    Q, K, V, O, LSE, ACD, PAD, DOM_Q, DOM_K,
    qk_scale,  # scale · log2(e): scores are kept in base 2
    SEED, dropout_p,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_pad_b, stride_domq_b, stride_domk_b,
    H, Lq, Lk, DQK, DV, causal, has_padding,
    HAS_DROPOUT: tl.constexpr,
    HAS_DOMAINS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # 1-D grid (CUDA caps grid.y at 65535; B·H can exceed it), query blocks of a head adjacent for K/V reuse in L2.
    n_blocks = tl.cdiv(Lq, BLOCK_M)
    pid_m = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    rows = pid_bh.to(tl.int64) * Lq + offs_m  # flat (batch, head, query) rows

    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    K += b.to(tl.int64) * stride_kb + h * stride_kh
    V += b.to(tl.int64) * stride_vb + h * stride_vh
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_dqk[None, :],
                mask=row_ok[:, None] & (offs_dqk < DQK)[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_DOMAINS:
        c_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        dom_q = tl.load(DOM_Q + b * stride_domq_b + offs_m, mask=row_ok, other=-1)
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    hi = Lk
    if causal:
        # Key blocks entirely after the block's last query are never visible.
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < Lk
        k = tl.load(K + offs_n[None, :] * stride_kn + offs_dqk[:, None],
                    mask=col_ok[None, :] & (offs_dqk < DQK)[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        visible = visible_tile(offs_m, offs_n, Lq, Lk, PAD, b * stride_pad_b, causal, has_padding)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DOMAINS:
            dom_k = tl.load(DOM_K + b * stride_domk_b + offs_n, mask=col_ok, other=-1)
            cross = dom_q[:, None] != dom_k[None, :]
            c_i = c_i * alpha + tl.sum(tl.where(cross, p, 0.0), 1)
        if HAS_DROPOUT:
            p = tl.where(dropout_keep(seed, rows, start_n, Lk, dropout_p, BLOCK_N), p, 0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    out = acc * inv_l[:, None]
    if HAS_DROPOUT:
        out = out / (1.0 - dropout_p)
    O += b.to(tl.int64) * stride_ob + h * stride_oh
    tl.store(O + offs_m[:, None] * stride_om + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < DV)[None, :])
    # Base-2 log-sum-exp; +inf for empty rows makes every recomputed probability exactly 0.
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + rows, lse, mask=row_ok)
    if HAS_DOMAINS:
        tl.store(ACD + rows, c_i * inv_l, mask=row_ok)


@dataclass(frozen=True)
class TileConfig:
    """Compile-time tile shape of every pass for one call (see `tile_config`)."""

    block_dqk: int
    block_dv: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# One tile class per padded head-dim width. Few classes keep the ahead-of-time compile matrix
# (classes × dtypes × constexpr flags × passes × archs) small enough to test every member.
_TILES = {
    64: TileConfig(64, 64, 64, 64, 4, 2),
    128: TileConfig(128, 128, 64, 64, 8, 2),
    256: TileConfig(256, 128, 32, 32, 4, 1),
}
# float32 in tf32x3 (precision "highest"): every dot is three tf32 products whose split operands
# take shared memory and registers of their own. At 64×64 the 128 class's backward needs 256 KB
# (sm_90 has 227 KB, sm_80 163 KB), at 32×32 with 4 warps 80–96 KB; the 64 class's forward at
# 64×64 spills 9.4–9.8 KB per thread on sm_80 (ptxas falls to 32 registers), at 32×32 nothing.
_TF32X3_TILES = {64: TileConfig(64, 64, 32, 32, 4, 2), 128: TileConfig(128, 128, 32, 32, 4, 2)}
# float32 on GPUs with 99 KB of shared memory per block (sm_86/89; `compact_float32_tiles`):
# at the tiles above the 128 class needs 115 KB (fwd) and 164 KB (bwd), the 256 class 115–131 KB.
_COMPACT_FLOAT32_TILES = {
    128: TileConfig(128, 128, 32, 32, 4, 2),
    256: TileConfig(256, 128, 16, 16, 4, 1),
}


def tile_config(dqk: int, dv: int, precision: str = "tf32", compact: bool = False) -> TileConfig:
    """Tiles for a concatenated QK head dim `dqk` and a V head dim `dv`, for dots in `precision`
    (`dot_precision` of the inputs' dtype: tf32x3 picks smaller tiles in the 128 class);
    `compact`: float32 on a GPU with little shared memory per block (`compact_float32_tiles`).

    The class is the widest of the two rounded up to a power of two >= 64 (tl.arange needs
    powers of two, tl.dot >= 16 on GPUs; narrower heads gain nothing from narrower tiles in
    this latency-bound regime). Raises ValueError beyond MAX_QK_DIM / MAX_V_DIM.
    """
    if dqk > MAX_QK_DIM or dv > MAX_V_DIM:
        raise ValueError(f"Triton tiles take a summed QK head dim <= {MAX_QK_DIM} and a V head dim <= "
                         f"{MAX_V_DIM}, got {dqk} and {dv}")
    width = max(64, triton.next_power_of_2(max(dqk, dv)))
    regular = _TF32X3_TILES.get(width, _TILES[width]) if precision == "tf32x3" else _TILES[width]
    return _COMPACT_FLOAT32_TILES.get(width, regular) if compact else regular


# Autotune candidates of the forward (ops/autotune.py; FASTATTN_AUTOTUNE=1) in the 64-wide class
# by dot precision, after the fixed tiles above; the other classes and compact float32 tune
# nothing. Larger tiles reuse K/V more, smaller ones give more programs (B·H·Lq/BLOCK_M) when
# B·H is small; some of these spill (bench/results/gpu-resources.md lists them), which only a
# timing can weigh.
_FWD_CANDIDATES = {
    "tf32": (TileConfig(64, 64, 128, 64, 8, 2), TileConfig(64, 64, 64, 32, 4, 3), TileConfig(64, 64, 32, 64, 4, 2)),
    "tf32x3": (TileConfig(64, 64, 64, 32, 4, 2), TileConfig(64, 64, 16, 32, 4, 2)),
}


def tile_candidates(dqk: int, dv: int, precision: str = "tf32", compact: bool = False) -> list[TileConfig]:
    """The forward's autotune candidates: `tile_config`'s fixed choice first, then the listed
    alternatives of its class (none outside the 64-wide class or with `compact`)."""
    fixed = tile_config(dqk, dv, precision, compact)
    if fixed.block_dqk != 64 or compact:
        return [fixed]
    return [fixed, *(c for c in _FWD_CANDIDATES[precision] if c != fixed)]


def check_tiles_fit(cfg: TileConfig, dqk: int, dv: int) -> None:
    """ValueError unless `cfg`'s head-dim blocks hold dqk and dv."""
    if cfg.block_dqk < dqk or cfg.block_dv < dv:
        raise ValueError(f"tiles {cfg} do not hold head dims dqk {dqk}, dv {dv}")


def all_tile_configs() -> list[TileConfig]:
    """One tile configuration per class (the widths every_launch() describes launches at; there
    the launchers pick each dtype's own tiles, so the GPU-compile test covers each)."""
    return list(_TILES.values())


def dense_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors`, copied to contiguous memory where they are not: the kernels index the last dim
    (and the per-row statistics every dim) with unit stride, whatever layout the caller has."""
    return tuple(t.contiguous() for t in tensors)


def domain_arguments(domains: Optional[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The domain id tensors by argument name, for `check_same_device` (none without domains)."""
    return {} if domains is None else {"domains[0]": domains[0], "domains[1]": domains[1]}


def key_inputs(
    key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]],
    placeholder: torch.Tensor,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], dict[str, int]]:
    """(pad as uint8, dom_q, dom_k, their batch strides as kernel arguments), all contiguous: the
    kernels read PTR + b·stride_b + position, so a transposed (`(tokens == 0).T`), step-sliced or
    expanded mask is copied here (it is tiny). Without padding `pad` is an unread (1, 1) uint8
    tensor on placeholder's device, so every call has one signature. A cast, not a bool→uint8
    view: Inductor (torch 2.11) cannot lower a view of a bool tensor as another dtype."""
    if key_padding_mask is not None:
        pad = key_padding_mask.contiguous().to(torch.uint8)
    else:
        pad = placeholder.new_empty((1, 1), dtype=torch.uint8)
    dom_q, dom_k = dense_inputs(*domains) if domains is not None else (None, None)
    strides = dict(
        stride_pad_b=pad.stride(0) if key_padding_mask is not None else 0,
        stride_domq_b=dom_q.stride(0) if dom_q is not None else 0,
        stride_domk_b=dom_k.stride(0) if dom_k is not None else 0,
    )
    return pad, dom_q, dom_k, strides


def fwd_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    domains: Optional[tuple[torch.Tensor, torch.Tensor]],
    tiles: Optional[TileConfig] = None,
) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Describe the forward launch on concatenated streams and allocate its outputs.

    q (B,H,Lq,DQK), k (B,H,Lk,DQK), v (B,H,Lk,DV); key_padding_mask (B,Lk) bool; domains
    (dom_q (B,Lq), dom_k (B,Lk)) int64; any strides (see `dense_inputs`); seed: int64 one-element
    tensor on q's device, the Philox key (needed iff dropout_p > 0).
    Returns (launch, out (B,H,Lq,DV) in q's dtype, lse (B,H,Lq) fp32 base-2 log-sum-exp of
    the scaled scores (+inf on rows without a visible key), acd (B,H,Lq) fp32 or None).
    tiles: one of `tile_candidates` (autotuning); None: `tile_config`'s fixed choice.
    """
    check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask, **domain_arguments(domains))
    q, k, v = dense_inputs(q, k, v)
    b, h, lq, dqk = q.shape
    lk, dv = k.shape[2], v.shape[3]
    precision = dot_precision(q.dtype)
    cfg = tiles or tile_config(dqk, dv, precision, compact_float32_tiles(q))
    check_tiles_fit(cfg, dqk, dv)
    out = torch.empty(b, h, lq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    acd = torch.empty(b, h, lq, dtype=torch.float32, device=q.device) if domains is not None else None
    pad, dom_q, dom_k, key_strides = key_inputs(key_padding_mask, domains, lse)
    launch = KernelLaunch(
        _dif_attn_fwd_kernel,
        grid=(triton.cdiv(lq, cfg.block_m) * b * h,),
        args=dict(
            Q=q, K=k, V=v, O=out, LSE=lse, ACD=acd, PAD=pad, DOM_Q=dom_q, DOM_K=dom_k,
            qk_scale=scale * LOG2E, SEED=seed_argument(seed, dropout_p, q.device), dropout_p=dropout_p,
            stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
            stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
            stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
            stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
            **key_strides,
            H=h, Lq=lq, Lk=lk, DQK=dqk, DV=dv, causal=causal, has_padding=key_padding_mask is not None,
        ),
        constexprs=dict(
            HAS_DROPOUT=dropout_p > 0.0, HAS_DOMAINS=domains is not None, DOT_PRECISION=precision,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DQK=cfg.block_dqk, BLOCK_DV=cfg.block_dv,
        ),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return launch, out, lse, acd


@triton.jit(do_not_specialize=["first_row"])
def _dropout_keep_kernel(KEEP, SEED, dropout_p, first_row, n_rows, Lk,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_col_blocks = tl.cdiv(Lk, BLOCK_N)  # 1-D grid: no 65535 cap on any axis
    pid_m = tl.program_id(0) // n_col_blocks
    start_n = (tl.program_id(0) % n_col_blocks) * BLOCK_N
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(SEED), first_row.to(tl.int64) + offs_r, start_n, Lk, dropout_p, BLOCK_N)
    ptrs = KEEP + offs_r.to(tl.int64)[:, None] * Lk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_r[:, None] < n_rows) & (offs_n[None, :] < Lk))


def seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`seed` as the kernels take it: an int64 one-element tensor on `device` (an int must be in
    [0, 2**63), the range `draw_seed_tensor` draws from and the C++ operators take)."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63) (an int64, as the C++ operators take it), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def dropout_rows_launch(
    seed: int | torch.Tensor, dropout_p: float, lk: int, first_row: int, n_rows: int, device: torch.device
) -> tuple[KernelLaunch, torch.Tensor]:
    """Describe the launch that writes the (n_rows, Lk) int8 keep-mask of flat rows
    [first_row, first_row + n_rows), flat row (b·H + h)·Lq + i, that the kernels draw for `seed`."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if min(lk, first_row, n_rows) < 0:
        raise ValueError(f"lk, first_row and n_rows must be >= 0, got {lk}, {first_row}, {n_rows}")
    keep = torch.empty(n_rows, lk, dtype=torch.int8, device=device)
    launch = KernelLaunch(
        _dropout_keep_kernel,
        grid=(triton.cdiv(n_rows, 64) * triton.cdiv(lk, 64),),
        args=dict(KEEP=keep, SEED=seed_tensor(seed, device), dropout_p=dropout_p, first_row=first_row,
                  n_rows=n_rows, Lk=lk),
        constexprs=dict(BLOCK_M=64, BLOCK_N=64),
    )
    return launch, keep


def dropout_keep_rows(
    seed: int | torch.Tensor, dropout_p: float, lk: int, first_row: int, n_rows: int, device: torch.device
) -> torch.Tensor:
    """Bool (n_rows, Lk): rows [first_row, first_row + n_rows) of the flattened (B·H·Lq, Lk) mask
    the kernels keep for `seed` — any window of any call, however large (tests, debugging)."""
    launch, keep = dropout_rows_launch(seed, dropout_p, lk, first_row, n_rows, device)
    launch()
    return keep.bool()


def dropout_keep_mask(
    seed: int | torch.Tensor, dropout_p: float, batch: int, heads: int, lq: int, lk: int, device: torch.device
) -> torch.Tensor:
    """The bool (B,H,Lq,Lk) mask of probabilities the kernels keep for `seed` (tests, debugging)."""
    return dropout_keep_rows(seed, dropout_p, lk, 0, batch * heads * lq, device).view(batch, heads, lq, lk)


KERNELS = (_dif_attn_fwd_kernel,)  # what `fwd_launch` can launch (registered with its operator)
