"""Triton forward of full-catalog cross-entropy: the per-row log-sum-exp of the logits,
tiled over rows × items, without the N×V logits.

z_ij = scale · (h_i·E_j + b_j). Each program owns BLOCK_M rows and one of `n_splits` contiguous
ranges of items and writes a partial (max, sum) pair in base 2; the launcher's caller
combines the splits (deterministically) into LSE_i. Splitting the item loop keeps the GPU
busy when there are few row blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._common import LOG2E, MAX_HIDDEN_DIM, check_same_device, compact_float32_tiles, dot_precision
from ..triton_launch import KernelLaunch

# Aim for this many programs per launch (a few waves on a 132-SM H100); sizes alone decide the
# split count, so the interpreter tests exercise the same split logic as the GPU.
TARGET_PROGRAMS = 512


@dataclass(frozen=True)
class CETileConfig:
    block_d: int
    block_m: int
    block_v: int
    num_warps: int
    num_stages: int


_TILES = {
    64: CETileConfig(64, 64, 64, 4, 3),
    128: CETileConfig(128, 64, 64, 8, 2),
    256: CETileConfig(256, 32, 64, 8, 2),
}
# float32 in tf32x3 (precision "highest"): three products per dot, with split operands in
# registers and shared memory. At the tiles above ptxas spills 0.1–10 KB per thread on sm_80/90
# (D 128 LSE on sm_80: 10 KB at 32 registers); these compiled spill-free on sm_80/86/90 at the
# headline shapes (bench/studies/tile_search.py). The d256 dE pass needs 241 KB at 64 items per tile
# (sm_90 has 227 KB), 128 KB at 32.
_TF32X3_TILES = {
    64: CETileConfig(64, 32, 32, 4, 2),
    128: CETileConfig(128, 32, 64, 8, 1),
}
_TF32X3_BWD_TILES = {
    64: CETileConfig(64, 32, 32, 4, 2),
    128: CETileConfig(128, 32, 32, 8, 1),
    256: CETileConfig(256, 32, 32, 8, 2),
}
# The backward with gradient filtering, by dot precision ("tf32" also stands for 16-bit inputs):
# the skip test holds the tile's probabilities a while longer. At the tiles of the unfiltered
# backward it spills 12 B (tf32x3, D 64, sm_90), 20 B (tf32, D 64, sm_86) and 250–700 B (tf32x3,
# D 128) per thread; at these nothing on sm_80/86/90 (tf32x3 D 64 needs 8 warps: at 4 every tile
# tried spilled 4–16 B on sm_90).
_FILTER_BWD_TILES = {
    "tf32x3": {64: CETileConfig(64, 32, 32, 8, 2), 128: CETileConfig(128, 16, 32, 8, 1)},
    "tf32": {64: CETileConfig(64, 64, 32, 4, 3)},
}
# float32 in tf32: the D 128 dE pass spills 52 B on sm_90 at 64 × 64, nothing at 64 × 32.
_TF32_BWD_TILES = {128: CETileConfig(128, 64, 32, 8, 2)}
# float32 on GPUs with 99 KB of shared memory per block (sm_86/89; `compact_float32_tiles`): the
# regular tiles need up to 133 KB (d128 tf32x3 dE) and 164 KB (d256 dH) there. (The tf32x3
# tables above fit 99 KB at D 64 and 128 and take precedence there.)
_COMPACT_FLOAT32_TILES = {
    128: CETileConfig(128, 64, 32, 8, 2),
    256: CETileConfig(256, 32, 32, 4, 1),
}
_COMPACT_TF32X3_BWD_TILES = {256: CETileConfig(256, 16, 32, 4, 1)}  # d256 dE at 32 × 32: 128 KB


def ce_tile_config(d: int, precision: str = "tf32", backward: bool = False, compact: bool = False,
                   filtered: bool = False) -> CETileConfig:
    """Tiles for hidden size d (rounded up to a power of two >= 64; at most MAX_HIDDEN_DIM), dots
    in `precision` (`dot_precision` of the inputs' dtype), of the LSE or (`backward`) dH/dE passes;
    `compact`: float32 on a GPU with little shared memory per block (`compact_float32_tiles`);
    `filtered`: the backward with gradient filtering (triton_bwd.py).
    The first table holding the width wins, most specific first."""
    if d > MAX_HIDDEN_DIM:
        raise ValueError(f"Triton tiles take a hidden size <= {MAX_HIDDEN_DIM}, got {d}")
    width = max(64, triton.next_power_of_2(d))
    tables: list[dict[int, CETileConfig]] = []
    if backward and filtered:
        tables.append(_FILTER_BWD_TILES.get(precision, {}))
    if precision == "tf32x3":
        if compact and backward:
            tables.append(_COMPACT_TF32X3_BWD_TILES)
        tables.append(_TF32X3_BWD_TILES if backward else _TF32X3_TILES)
    if compact:
        tables.append(_COMPACT_FLOAT32_TILES)
    if precision == "tf32" and backward:
        tables.append(_TF32_BWD_TILES)
    tables.append(_TILES)
    return next(table[width] for table in tables if width in table)


# Autotune candidates (ops/autotune.py; FASTATTN_AUTOTUNE=1) after the fixed tiles, by dot
# precision ("tf32" also stands for 16-bit inputs), pass and width; other widths, compact float32
# and the filtered backward tune nothing. The LSE pass is one large GEMM with an exp per
# logit: larger tiles reuse H and E more; the backward passes hold dz and a float32 accumulator.
_CANDIDATES = {
    ("tf32", False): {64: (CETileConfig(64, 128, 64, 8, 3), CETileConfig(64, 64, 128, 8, 3)),
                      128: (CETileConfig(128, 128, 64, 8, 2), CETileConfig(128, 64, 32, 4, 3))},
    ("tf32", True): {64: (CETileConfig(64, 128, 64, 8, 3), CETileConfig(64, 64, 128, 8, 3)),
                     128: (CETileConfig(128, 64, 64, 8, 2), CETileConfig(128, 32, 64, 8, 2))},
    ("tf32x3", False): {64: (CETileConfig(64, 64, 32, 4, 2), CETileConfig(64, 32, 64, 4, 2)),
                        128: (CETileConfig(128, 32, 32, 8, 2),)},
    ("tf32x3", True): {64: (CETileConfig(64, 64, 32, 4, 2),), 128: (CETileConfig(128, 16, 32, 8, 1),)},
}


def ce_tile_candidates(d: int, precision: str = "tf32", backward: bool = False, compact: bool = False,
                       filtered: bool = False) -> list[CETileConfig]:
    """The autotune candidates of a pass: `ce_tile_config`'s fixed choice first, then the listed
    alternatives of its width (none for compact float32 or the filtered backward)."""
    fixed = ce_tile_config(d, precision, backward, compact, filtered)
    if compact or filtered:
        return [fixed]
    listed = _CANDIDATES.get((precision, backward), {}).get(fixed.block_d, ())
    return [fixed, *(c for c in listed if c != fixed)]


def all_ce_tile_configs() -> list[CETileConfig]:
    """One tile configuration per class (the widths every_launch() describes launches at)."""
    return list(_TILES.values())


def check_block_d(cfg: CETileConfig, d: int) -> None:
    """ValueError unless `cfg`'s hidden block holds hidden size d."""
    if cfg.block_d < d:
        raise ValueError(f"tiles {cfg} do not hold hidden size {d}")


def split_count(outer_blocks: int, inner_blocks: int) -> int:
    """How many ranges to split the inner loop into so that outer × splits ≈ TARGET_PROGRAMS."""
    want = triton.cdiv(TARGET_PROGRAMS, max(outer_blocks, 1))
    return max(1, min(want, inner_blocks))


def kernel_layout(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """What the kernels read: hidden and weight with unit stride along D (they are given
    stride(0) only, which may be anything, 0 included), bias contiguous; copies only if needed."""
    return (hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
            weight if weight.stride(-1) == 1 else weight.contiguous(),
            bias.contiguous() if bias is not None else None)


@triton.jit
def load_items(E, BIAS, offs_v, offs_d, V, D, stride_e, HAS_BIAS: tl.constexpr):
    """Item rows (BLOCK_V, BLOCK_D), their fp32 bias (0 without one) and which exist (< V)."""
    col_ok = offs_v < V
    e = tl.load(E + offs_v[:, None].to(tl.int64) * stride_e + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if HAS_BIAS:
        b = tl.load(BIAS + offs_v, mask=col_ok, other=0.0).to(tl.float32)
    else:
        b = offs_v * 0.0
    return e, b, col_ok


@triton.jit
def load_rows(H, offs_m, offs_d, N, D, stride_h):
    """Hidden rows (BLOCK_M, BLOCK_D), zero past N and D, and their in-bounds mask."""
    mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    return tl.load(H + offs_m[:, None].to(tl.int64) * stride_h + offs_d[None, :], mask=mask, other=0.0), mask


@triton.jit
def logit_tile(h, e, b, col_ok, scale_log2, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_V) logits in base 2 (z·log2 e); missing items get -inf."""
    s = tl.dot(h, tl.trans(e), input_precision=DOT_PRECISION) + b[None, :]
    return tl.where(col_ok[None, :], s * scale_log2, float("-inf"))


@triton.jit
def _ce_lse_kernel(
    H, E, BIAS, M_PART, L_PART,
    scale_log2, N, V, D, stride_h, stride_e, items_per_split,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_row_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = tl.program_id(0) % n_row_blocks
    split = tl.program_id(0) // n_row_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    h, _ = load_rows(H, offs_m, offs_d, N, D, stride_h)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    start = split * items_per_split
    stop = tl.minimum(V, start + items_per_split)
    for start_v in range(start, stop, BLOCK_V):
        offs_v = start_v + tl.arange(0, BLOCK_V)
        e, b, col_ok = load_items(E, BIAS, offs_v, offs_d, stop, D, stride_e, HAS_BIAS)
        s = logit_tile(h, e, b, col_ok, scale_log2, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_shift) + tl.sum(tl.math.exp2(s - m_shift[:, None]), 1)
        m_i = m_new
    out = split.to(tl.int64) * N + offs_m
    tl.store(M_PART + out, m_i, mask=row_ok)
    tl.store(L_PART + out, l_i, mask=row_ok)


def lse_launch(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
               tiles: Optional[CETileConfig] = None) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor]:
    """Describe the LSE launch. hidden (N,D), weight (V,D), bias (V,) or None, any strides;
    tiles: a `ce_tile_candidates` entry (autotuning), None: the fixed choice.

    Returns (launch, m_part, l_part): (S, N) fp32 partial base-2 maxima and sums per split.
    """
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    hidden, weight, bias = kernel_layout(hidden, weight, bias)
    n, d = hidden.shape
    v = weight.shape[0]
    precision = dot_precision(hidden.dtype)
    cfg = tiles or ce_tile_config(d, precision, compact=compact_float32_tiles(hidden))
    check_block_d(cfg, d)
    row_blocks = triton.cdiv(n, cfg.block_m)
    item_blocks = triton.cdiv(v, cfg.block_v)
    splits = split_count(row_blocks, item_blocks)
    items_per_split = triton.cdiv(item_blocks, splits) * cfg.block_v
    splits = triton.cdiv(v, items_per_split) if v else 1
    m_part = torch.empty(splits, n, dtype=torch.float32, device=hidden.device)
    l_part = torch.empty(splits, n, dtype=torch.float32, device=hidden.device)
    launch = KernelLaunch(
        _ce_lse_kernel,
        grid=(row_blocks * splits,),
        args=dict(H=hidden, E=weight, BIAS=bias if bias is not None else weight,
                  M_PART=m_part, L_PART=l_part, scale_log2=scale * LOG2E, N=n, V=v, D=d,
                  stride_h=hidden.stride(0), stride_e=weight.stride(0), items_per_split=items_per_split),
        constexprs=dict(HAS_BIAS=bias is not None, DOT_PRECISION=precision,
                        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return launch, m_part, l_part


def combine_lse(m_part: torch.Tensor, l_part: torch.Tensor) -> torch.Tensor:
    """(S, N) base-2 partials → (N,) natural-log LSE; -inf for a row with no items (V = 0)."""
    m = m_part.max(dim=0).values
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    total = (l_part * torch.exp2(m_part - m_safe)).sum(dim=0)
    return (m_safe + torch.log2(total)) / LOG2E


KERNELS = (_ce_lse_kernel,)  # what `lse_launch` can launch (registered with its operator)
