"""The attention dropout RNG of both fused backends (C++, and Triton in its interpreter).

Scheme (fastattn/ops/attention/triton_fwd.py `dropout_keep`): Philox-4x32-10 keyed by the call's
63-bit seed; element (R, j), flat row R = (b·H + h)·Lq + i, takes output word j % 4 of the
64-bit counter R·⌈Lk/4⌉ + j // 4. Checked here against a pure-Python Philox, at element indices
beyond 2**32 too (through a window of rows, since such a mask would not fit in memory), and
for what the old scheme (key seed + b·H + h, int32 counter i·Lk + j) got wrong: calls whose
seeds differ by less than B·H reused each other's per-head masks.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastattn.ops.attention.function import draw_seed

from attention_cases import (Case, check_dropout_own_mask, check_dropout_reproducible, kernel_keep_mask, kernel_keep_rows,
                             reference_keep_rows)
from cpp_required import cpp_tests_mark

BACKENDS = [pytest.param("cpp", marks=cpp_tests_mark()), "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_is_philox_of_seed_and_element_index(backend: str) -> None:
    # Lk = 7 is not a multiple of 4: each row starts a fresh counter. Both key words non-zero.
    seed = 2**62 + 2**35 + 12345
    got = kernel_keep_mask(backend, seed, 0.3, 2, 3, 5, 7)
    assert torch.equal(got.reshape(30, 7), reference_keep_rows(seed, 0.3, 7, 0, 30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lk,first_row", [(70, 2**33 + 5), (9, 2**31 - 1)])
def test_mask_beyond_2_pow_32_elements(backend: str, lk: int, first_row: int) -> None:
    # Rows of a call with B·H·Lq·Lk > 2**32 elements, counters > 2**32 (high counter word in
    # use): the exact-integer reference catches any 32-bit wrap of index or counter.
    got = kernel_keep_rows(backend, 77, 0.5, lk, first_row, 3)
    assert torch.equal(got, reference_keep_rows(77, 0.5, lk, first_row, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1, 5])  # B·H = 6
def test_nearby_seeds_share_no_head_mask(backend: str, offset: int) -> None:
    b, h, lq, lk = 2, 3, 6, 6
    first = kernel_keep_mask(backend, 1000, 0.5, b, h, lq, lk).reshape(b * h, lq * lk)
    second = kernel_keep_mask(backend, 1000 + offset, 0.5, b, h, lq, lk).reshape(b * h, lq * lk)
    same = (first[:, None, :] == second[None, :, :]).all(-1)  # [head of first, head of second]
    assert not same.any(), f"head masks reused across calls: {same.nonzero().tolist()}"
    assert not (first[:, None, :] == first[None, :, :]).all(-1).fill_diagonal_(False).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_fraction_per_head(backend: str) -> None:
    p = 0.3
    keep = kernel_keep_mask(backend, 2**40 + 99, p, 2, 3, 40, 50).float().reshape(6, -1)
    n = keep.shape[1]
    assert ((keep.mean(1) - (1 - p)).abs() < 4 * math.sqrt(p * (1 - p) / n)).all(), keep.mean(1)


def test_draw_seed_uses_63_bits_and_follows_manual_seed() -> None:
    torch.manual_seed(3)
    seeds = [draw_seed() for _ in range(64)]
    torch.manual_seed(3)
    assert [draw_seed() for _ in range(64)] == seeds
    assert all(0 <= s < 2**63 for s in seeds) and len(set(seeds)) == 64
    assert max(seeds) >= 2**62  # fails with probability 2**-64 for uniform 63-bit draws


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_deterministic_for_manual_seed(backend: str) -> None:
    check_dropout_reproducible(Case(lq=20, lk=13, causal=False, dropout_p=0.3, attr_dims=(8,)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_match_reference_with_own_mask(backend: str) -> None:
    # Lk = 67: key tiles of 64 (Triton) and 256 (C++) end mid-counter-group in the last tile.
    check_dropout_own_mask(Case(b=2, h=2, lq=70, lk=67, causal=False, dropout_p=0.2, attr_dims=(8,)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_windows_and_bad_arguments(backend: str) -> None:
    assert kernel_keep_mask(backend, 5, 0.5, 2, 0, 3, 4).shape == (2, 0, 3, 4)
    assert kernel_keep_rows(backend, 5, 0.5, 0, 7, 3).shape == (3, 0)
    error = RuntimeError if backend == "cpp" else ValueError
    with pytest.raises(error, match="first_row"):
        kernel_keep_rows(backend, 5, 0.5, 4, -1, 3)
    with pytest.raises(error, match="dropout_p"):
        kernel_keep_rows(backend, 5, 1.0, 4, 0, 3)

def test_triton_rejects_seed_outside_int64() -> None:
    with pytest.raises(ValueError, match="seed must be in"):
        kernel_keep_rows("triton", 2**63, 0.5, 4, 0, 3)


def test_triton_launch_takes_the_seed_as_an_int64_tensor_on_the_kernels_device() -> None:
    # The kernels load SEED: a missing seed, another dtype or another device would read garbage.
    from fastattn.ops.attention.triton_fwd import fwd_launch

    q = torch.randn(1, 1, 4, 8)
    for seed in (None, torch.tensor(3, dtype=torch.int32), torch.tensor(3, device="meta")):
        with pytest.raises(ValueError, match="seed as a one-element int64 tensor"):
            fwd_launch(q, q, q, 1.0, True, 0.5, seed, None, None)
    launch, *_ = fwd_launch(q, q, q, 1.0, True, 0.0, None, None, None)  # no dropout: no seed argument
    assert launch.args["SEED"] is None
