"""Compact float32 tiles for GPUs with 99 KB of shared memory per block (sm_86/89: A10, L4, L40S).

Which launches take them (`compact_float32_tiles`), and that the kernels compute the same
results with them: the Triton kernels run in the interpreter here under `target_arch(86)`, which
makes the launchers choose exactly what they choose on such a GPU. (That those tiles fit 99 KB is
tests/test_gpu_resources.py's check, on the sm_86 compiles.)
"""
from __future__ import annotations

import pytest
import torch

from fastattn.ops._common import (COMPACT_TILES_BELOW, SHARED_MEMORY_LIMIT, compact_float32_tiles, dot_precision,
                                  float32_matmul_precision, target_arch)
from fastattn.ops.attention.triton_fwd import tile_config
from fastattn.ops.cross_entropy.triton_fwd import ce_tile_config

from attention_cases import Case, check_against_truth
from catalog_cases import assert_close, make_case, run, run_naive


def test_only_float32_on_small_shared_memory_takes_compact_tiles() -> None:
    f32, bf16 = torch.empty(2), torch.empty(2, dtype=torch.bfloat16)
    assert not compact_float32_tiles(f32)  # CPU: the interpreter keeps the regular tiles
    for arch, limit in SHARED_MEMORY_LIMIT.items():
        with target_arch(arch):
            assert compact_float32_tiles(f32) == (limit < COMPACT_TILES_BELOW), arch
            assert not compact_float32_tiles(bf16)
    assert [a for a, limit in SHARED_MEMORY_LIMIT.items() if limit < COMPACT_TILES_BELOW] == [86, 89]
    with pytest.raises(ValueError, match="arch must be one of"):
        with target_arch(75):
            pass


@pytest.mark.parametrize("width", [128, 256])
def test_compact_tiles_are_smaller_in_the_wide_classes(width: int) -> None:
    for precision in ("tf32", "tf32x3"):
        regular, compact = tile_config(width, 128, precision), tile_config(width, 128, precision, compact=True)
        assert compact.block_m * compact.block_n <= regular.block_m * regular.block_n
        assert (compact.block_dqk, compact.block_dv) == (regular.block_dqk, regular.block_dv)
        for backward in (False, True):
            reg_ce = ce_tile_config(width, precision, backward)
            small_ce = ce_tile_config(width, precision, backward, compact=True)
            assert small_ce.block_m * small_ce.block_v <= reg_ce.block_m * reg_ce.block_v
            assert small_ce.block_d == reg_ce.block_d
    assert tile_config(64, 64, "tf32", compact=True) == tile_config(64, 64, "tf32")  # fits as it is


# Head dims of each class the compact tiles change: summed QK 124 / V 50 (128 class), summed QK
# 200 / V 100 (256 class); odd lengths so that no tile is full.
@pytest.mark.parametrize("mode", ["highest", "high"])
@pytest.mark.parametrize("dk,dv,attr_dims", [(24, 50, (50, 50)), (100, 100, (100,))])
def test_attention_with_compact_tiles_matches_the_reference(dk: int, dv: int, attr_dims: tuple, mode: str) -> None:
    with target_arch(86), float32_matmul_precision(mode):
        q = torch.empty(1, 1, 1, dk + sum(attr_dims))
        assert tile_config(q.shape[-1], dv, dot_precision(q.dtype), compact_float32_tiles(q)).block_m == (
            32 if q.shape[-1] <= 128 else 16)
        check_against_truth(Case(lq=37, dk=dk, dv=dv, attr_dims=attr_dims, padding="left"), backend="triton")


@pytest.mark.parametrize("d", [100, 200])
def test_cross_entropy_with_compact_tiles_matches_the_reference(d: int) -> None:
    case = make_case(45, 77, d)
    with target_arch(86):
        assert ce_tile_config(d, "tf32", compact=compact_float32_tiles(case["hidden"])).block_v == 32
        got = run(case, "triton", label_smoothing=0.1)
    assert_close(got, run_naive(case, label_smoothing=0.1))

