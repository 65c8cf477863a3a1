"""Attention dropout on every kernel backend: gradients and output against the float64 reference
run with the kernel's own keep-mask, reproducibility under torch.manual_seed, the kept fraction,
unbiasedness, and the C++ mask bit-equal to the Triton one (both run Philox-4x32-10 on the same
key and counters). The RNG scheme itself, element by element: tests/test_dropout_rng.py."""
from __future__ import annotations

import math

import pytest
import torch

import fastattn

from attention_cases import Case, check_dropout_own_mask, check_dropout_reproducible, check_keep_statistics, make_inputs
from backend_params import KERNEL_BACKENDS
from cpp_required import cpp_tests_mark

CPP_ONLY = cpp_tests_mark()  # a failed build fails loudly; FASTATTN_DISABLE_CPP=1 skips

# The cross case crosses the C++ 256-key block with Lk = 300; the Triton tiles are crossed at 66
# already, and the interpreter is slow on long rows (see test_attention.py).
DROPOUT_CASES = {
    "triton": {"self": Case(lq=50, dropout_p=0.3),
               "cross-padded": Case(lq=129, lk=66, causal=False, padding="left", dropout_p=0.1, attr_dims=(8, 24))},
    "cpp": {"self": Case(lq=50, dropout_p=0.3),
            "cross-padded": Case(lq=129, lk=300, causal=False, padding="left", dropout_p=0.1, attr_dims=(8, 24))},
}


@pytest.mark.parametrize("name", ["self", "cross-padded"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_matches_reference_with_kernel_mask(backend: str, name: str) -> None:
    check_dropout_own_mask(DROPOUT_CASES[backend][name], backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_reproducible_with_torch_manual_seed(backend: str) -> None:
    check_dropout_reproducible(DROPOUT_CASES[backend]["self"], backend)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_kept_fraction(backend: str, p: float) -> None:
    check_keep_statistics(backend, p)


# Seeds averaged: 400 cost the C++ kernels nothing; the interpreter takes ~3 s for 200.
UNBIASED_RUNS = {"triton": 200, "cpp": 400}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_output_is_unbiased(backend: str) -> None:
    # E[dropout(P) v] = P v: averaging many seeds recovers the no-dropout output.
    case = Case(b=1, h=1, lq=16, dk=8, attr_dims=(), dropout_p=0.5)
    inputs = make_inputs(case)
    no_drop = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], backend=backend)
    runs = torch.stack([fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], dropout_p=0.5, backend=backend)
                        for _ in range(UNBIASED_RUNS[backend])])
    spread = runs.std(0) / math.sqrt(len(runs))
    assert ((runs.mean(0) - no_drop).abs() <= 5 * spread + 1e-6).all()


# ---------------------------------------------------------------- the C++ mask is the Triton mask
@CPP_ONLY
@pytest.mark.parametrize("seed,p,shape", [
    (0, 0.1, (2, 3, 70, 90)),
    (12345, 0.5, (1, 2, 129, 7)),
    (2**30 - 1, 0.3, (3, 1, 5, 300)),
    (1, 0.3, (2, 3, 9, 6)),  # seeds 1 and 2 (adjacent) and 4 (< B·H apart): see test_dropout_rng.py
    (2, 0.3, (2, 3, 9, 6)),
    (4, 0.3, (2, 3, 9, 6)),
    (2**62 + 2**33 + 5, 0.2, (2, 2, 3, 257)),  # both key words non-zero; Lk crosses a C++ key block
])
def test_cpp_dropout_mask_equals_triton(seed: int, p: float, shape: tuple) -> None:
    # Both backends run Philox-4x32-10 on the same key and counters (Triton in its interpreter here).
    from fastattn.ops.attention.cpp import cpp_dropout_keep_mask
    from fastattn.ops.attention.triton_fwd import dropout_keep_mask

    cpp = cpp_dropout_keep_mask(seed, p, *shape)
    triton = dropout_keep_mask(seed, p, *shape, torch.device("cpu"))
    assert cpp.dtype == torch.bool and torch.equal(cpp, triton)


@CPP_ONLY
@pytest.mark.parametrize("lk,first_row", [
    (1001, 2**32 + 7),      # counter R·⌈Lk/4⌉ + j/4 ≈ 2**40: high counter word in use
    (6, 3 * 2**31 - 1),    # the flat element index crosses 2**32 inside the window
])
def test_cpp_dropout_rows_beyond_2_pow_32_equal_triton(lk: int, first_row: int) -> None:
    # A window of a call far too large to allocate (B·H·Lq·Lk > 2**32): both backends agree there.
    from fastattn.ops.attention.cpp import cpp_dropout_keep_rows
    from fastattn.ops.attention.triton_fwd import dropout_keep_rows

    cpp = cpp_dropout_keep_rows(2**40 + 3, 0.25, lk, first_row, 3)
    triton = dropout_keep_rows(2**40 + 3, 0.25, lk, first_row, 3, torch.device("cpu"))
    assert cpp.shape == (3, lk) and torch.equal(cpp, triton)
