"""The Triton kernels behind `AttentionKernels`: the bodies of the operators
`fastattn::dif_attention_triton` / `dif_attention_triton_backward` (function.py)."""
from __future__ import annotations

import itertools
from typing import Iterator, Optional

import torch

from .. import autotune
from .._common import compact_float32_tiles, dot_precision, float32_matmul_precision, launch_precisions, precision_tag
from ..triton_launch import KernelLaunch
from .options import AttentionOptions
from .triton_bwd import BackwardPlan, backward_plans, bwd_launches
from .triton_fwd import TileConfig, all_tile_configs, dropout_rows_launch, fwd_launch, tile_candidates


class TritonAttentionKernels:
    """`AttentionKernels` on CUDA tensors (CPU ones under TRITON_INTERPRET=1): the flash-style
    Triton kernels; the launchers make every input contiguous where a kernel assumes it."""

    name = "triton"

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions, seed: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        def describe(tiles: TileConfig) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
            return fwd_launch(q, k, v, opts.scale, opts.causal, opts.dropout_p, seed, key_padding_mask, domains,
                              tiles)

        candidates = tile_candidates(q.shape[3], v.shape[3], dot_precision(q.dtype), compact_float32_tiles(q))
        tiles = autotune.choose(_tuning_key("attention_fwd", q, k, v, opts, key_padding_mask, domains), candidates,
                                lambda c: describe(c)[0](), probe=q)
        launch, out, lse, acd = describe(tiles)
        launch()
        return out, lse, acd

    @staticmethod
    def backward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, acd: Optional[torch.Tensor], grad_acd: Optional[torch.Tensor], opts: AttentionOptions,
        seed: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
        domains: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def run(plan: BackwardPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            launches, dq, dk, dv = bwd_launches(
                q, k, v, dout, out, lse, acd, grad_acd, opts.scale, opts.causal, opts.dropout_p, seed,
                key_padding_mask, domains, fused=plan.fused, tiles=plan.tiles,
            )
            for launch in launches:
                launch()
            return dq, dk, dv

        plan = autotune.choose(_tuning_key("attention_bwd", q, k, v, opts, key_padding_mask, domains),
                               backward_plans(q, k, v), run, probe=q)
        return run(plan)


def _tuning_key(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions,
                key_padding_mask: Optional[torch.Tensor], domains: Optional[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[object, ...]:
    """What an autotuned choice is kept for: dtype and dot precision, head dims, flags, and the
    batch·heads and lengths bucketed to powers of two, on one kind of GPU."""
    b, h, lq, dqk = q.shape
    return (op, q.dtype, dot_precision(q.dtype), dqk, v.shape[3], opts.causal, opts.dropout_p > 0,
            key_padding_mask is not None, domains is not None, autotune.size_bucket(b * h),
            autotune.size_bucket(lq), autotune.size_bucket(k.shape[2]), autotune.device_capability(q))


def every_launch() -> Iterator[tuple[str, KernelLaunch]]:
    """Every (kernel, constexpr configuration) the launchers above can choose, on meta tensors.

    Axes: tile class × input dtype (float32 twice: its dot precision follows
    torch.get_float32_matmul_precision(), tf32x3 or tf32) × HAS_DROPOUT × HAS_DOMAINS for the
    forward, the fused backward (64-wide class) and the split backward's dK/dV and dQ passes;
    the split D_i pass once per (class, dtype, domains); the dropout-mask kernel. Causal and padding are runtime
    flags, so a launch with both on has the same compiled code as one with both off.
    """
    meta = torch.device("meta")
    b, h, lq, lk = 2, 2, 64, 64
    for cfg in all_tile_configs():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for mode, dropout_p, has_domains in itertools.product(
                    launch_precisions(dtype), (0.0, 0.1), (False, True)):
                q = torch.empty(b, h, lq, cfg.block_dqk, dtype=dtype, device=meta)
                k = torch.empty(b, h, lk, cfg.block_dqk, dtype=dtype, device=meta)
                v = torch.empty(b, h, lk, cfg.block_dv, dtype=dtype, device=meta)
                pad = torch.empty(b, lk, dtype=torch.bool, device=meta)
                dom = torch.empty(b, lq, dtype=torch.int64, device=meta)
                domains = (dom, dom) if has_domains else None
                seed = torch.empty((), dtype=torch.int64, device=meta) if dropout_p > 0 else None
                tag = (f"dqk{cfg.block_dqk}-dv{cfg.block_dv}-{precision_tag(dtype, mode)}"
                       f"-dropout{int(dropout_p > 0)}-domains{int(has_domains)}")
                with float32_matmul_precision(mode):
                    fwd, out, lse, _ = fwd_launch(q, k, v, 0.125, True, dropout_p, seed, pad, domains)
                    acd = lse if has_domains else None
                    fused = bwd_launches(q, k, v, out, out, lse, acd, acd, 0.125, True, dropout_p, seed, pad,
                                         domains, fused=True)[0][0] if cfg.block_dqk == 64 else None
                    (delta, dkdv, dq), *_ = bwd_launches(
                        q, k, v, out, out, lse, acd, acd, 0.125, True, dropout_p, seed, pad, domains, fused=False)
                yield f"fwd-{tag}", fwd
                if fused is not None:  # the 64-wide class only (triton_bwd.takes_fused_schedule)
                    yield f"bwd-{tag}", fused
                yield f"bwd_dkdv-{tag}", dkdv
                yield f"bwd_dq-{tag}", dq
                if cfg.block_dv == cfg.block_dqk and mode == launch_precisions(dtype)[0] and dropout_p == 0.0:
                    yield f"bwd_delta-{tag}", delta  # no dots: one per (width, dtype, domains)
    mask_launch, _ = dropout_rows_launch(torch.empty((), dtype=torch.int64, device=meta), 0.1, lk, 0, b * h * lq, meta)
    yield "dropout_mask", mask_launch
