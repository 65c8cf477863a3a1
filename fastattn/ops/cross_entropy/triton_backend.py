"""The Triton kernels behind the cross-entropy Function (imported only when that backend runs)."""
from __future__ import annotations

import itertools
from typing import Iterator, Optional

import torch

from .. import autotune
from .._common import compact_float32_tiles, dot_precision, float32_matmul_precision, launch_precisions, precision_tag
from ..triton_launch import KernelLaunch
from .triton_bwd import bwd_launches
from .triton_fwd import CETileConfig, all_ce_tile_configs, ce_tile_candidates, combine_lse, lse_launch


class TritonCrossEntropyKernels:
    """`CrossEntropyKernels` on the Triton kernels; N = 0 rows launches nothing (an empty grid)."""

    @staticmethod
    def lse(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        if hidden.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=hidden.device)
        candidates = ce_tile_candidates(hidden.shape[1], dot_precision(hidden.dtype),
                                        compact=compact_float32_tiles(hidden))
        tiles = autotune.choose(_tuning_key("ce_lse", hidden, weight, bias), candidates,
                                lambda c: lse_launch(hidden, weight, bias, scale, c)[0](), probe=hidden)
        launch, m_part, l_part = lse_launch(hidden, weight, bias, scale, tiles)
        launch()
        return combine_lse(m_part, l_part)

    @staticmethod
    def backward(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        lse: torch.Tensor, coef_p: torch.Tensor, coef_base: torch.Tensor, target: torch.Tensor,
        coef_t: torch.Tensor, grad_filter: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if hidden.shape[0] == 0:
            zeros = dict(dtype=torch.float32, device=hidden.device)
            return (torch.zeros(hidden.shape, **zeros), torch.zeros(weight.shape, **zeros),
                    torch.zeros(weight.shape[0], **zeros) if bias is not None else None)
        def run(tiles: CETileConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            launches, dh_part, de_part, db_part = bwd_launches(
                hidden, weight, bias, scale, lse, coef_p, coef_base, target, coef_t, grad_filter, tiles)
            for launch in launches:
                launch()
            return dh_part, de_part, db_part

        candidates = ce_tile_candidates(hidden.shape[1], dot_precision(hidden.dtype), backward=True,
                                        compact=compact_float32_tiles(hidden), filtered=grad_filter > 0)
        tiles = autotune.choose(_tuning_key("ce_bwd", hidden, weight, bias) + (grad_filter > 0,), candidates, run,
                                probe=hidden)
        dh_part, de_part, db_part = run(tiles)
        return _sum_splits(dh_part), _sum_splits(de_part), _sum_splits(db_part) if bias is not None else None


def _tuning_key(op: str, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                ) -> tuple[object, ...]:
    """What an autotuned choice is kept for: dtype and dot precision, hidden size, bias, and the
    row and item counts bucketed to powers of two, on one kind of GPU."""
    return (op, hidden.dtype, dot_precision(hidden.dtype), hidden.shape[1], bias is not None,
            autotune.size_bucket(hidden.shape[0]), autotune.size_bucket(weight.shape[0]),
            autotune.device_capability(hidden))


def _sum_splits(part: torch.Tensor) -> torch.Tensor:
    """The sum of a kernel's (S, ...) float32 split partials, in a fixed order (deterministic);
    with one split the partial itself (a view, no copy: at V = 1M, D = 64 that saves writing and
    re-reading 256 MB of dE)."""
    return part[0] if part.shape[0] == 1 else part.sum(0)


def every_launch() -> Iterator[tuple[str, KernelLaunch]]:
    """Every (kernel, constexpr configuration) the launchers can choose, on meta tensors:
    tile class × input dtype (float32 twice: its dot precision follows
    torch.get_float32_matmul_precision(), tf32x3 or tf32) × HAS_BIAS for the LSE, dH and dE passes,
    the dH and dE passes also with gradient filtering (FILTER; grad_filter > 0)."""
    meta = torch.device("meta")
    n, v = 256, 1000
    for cfg in all_ce_tile_configs():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for mode, has_bias in itertools.product(launch_precisions(dtype), (False, True)):
                h = torch.empty(n, cfg.block_d, dtype=dtype, device=meta)
                w = torch.empty(v, cfg.block_d, dtype=dtype, device=meta)
                b = torch.empty(v, dtype=dtype, device=meta) if has_bias else None
                tag = f"d{cfg.block_d}-{precision_tag(dtype, mode)}-bias{int(has_bias)}"
                f32 = torch.empty(n, dtype=torch.float32, device=meta)
                tgt = torch.empty(n, dtype=torch.int64, device=meta)
                with float32_matmul_precision(mode):
                    fwd, _, _ = lse_launch(h, w, b, 1.0)
                    (dh, de), *_ = bwd_launches(h, w, b, 1.0, f32, f32, f32, tgt, f32)
                    (dh_filter, de_filter), *_ = bwd_launches(h, w, b, 1.0, f32, f32, f32, tgt, f32, 2.0**-12)
                yield f"ce_lse-{tag}", fwd
                yield f"ce_bwd_dh-{tag}", dh
                yield f"ce_bwd_de-{tag}", de
                yield f"ce_bwd_dh-{tag}-filter", dh_filter
                yield f"ce_bwd_de-{tag}-filter", de_filter
