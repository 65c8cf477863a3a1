"""The C++ CPU kernels behind `CrossEntropyKernels` (csrc/cross_entropy.cpp), and their fake
kernels.

The operators `fastattn::ce_lse` and `ce_bwd` are registered by the compiled
extension (see `fastattn.ops.cpp_extension`); importing this module loads it (building it on
first use) and registers the fake (meta) implementations, which give torch.compile and
`torch.library.opcheck` the output shapes and dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._common import compute_dtype
from ..cpp_extension import cpp_ops, cpp_unavailable_reason


class CppCrossEntropyKernels:
    """`CrossEntropyKernels` on CPU tensors: one BLAS GEMM per block of items plus one fused,
    multi-threaded elementwise pass; extra memory is one block of logits, never N×V. Rows without
    a target (zero target mass: ignore_index, padding) cost nothing: `row_losses` computes the LSE
    of the other rows only, and `fastattn::ce_bwd` skips rows whose coefficients are all zero."""

    skips_unused_rows = True

    @staticmethod
    def lse(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """hidden (N,D), weight (V,D), bias (V,) | None → (N,) natural-log LSE_i of
        z_ij = scale·(h_i·E_j + b_j); float32 (float64 for float64 inputs)."""
        return cpp_ops().ce_lse(hidden, weight, bias, scale)

    @staticmethod
    def backward(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        lse: torch.Tensor, coef_p: torch.Tensor, coef_base: torch.Tensor, target: torch.Tensor,
        coef_t: torch.Tensor, grad_filter: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """dH (N,D), dE (V,D), db (V,) or None (no bias) for
        dz_ij = scale·(coef_p_i·softmax_ij − coef_base_i − coef_t_i·[j = target_i]), target −1 = none;
        float32 (float64 for float64 inputs). Exact: grad_filter (a Triton tile skip) drops nothing here."""
        dh, de, db = cpp_ops().ce_bwd(hidden, weight, bias, scale, lse, coef_p, coef_base, target, coef_t)
        return dh, de, db if bias is not None else None

    @staticmethod
    def sparse_gather(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, table: torch.Tensor
                      ) -> torch.Tensor:
        """(N, C) in table's dtype (float32/float64): row i = Σ_e values_e·table[indices_e] over row
        i's CSR entries (indptr (N+1,), indices (nnz,) int64, values (nnz,)); table (V, C). The
        sparse targets' logits (with h) and their share of dH, row-parallel."""
        return cpp_ops().ce_sparse_gather(indptr, indices, values, table)

    @staticmethod
    def sparse_scatter(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
                       num_items: int) -> torch.Tensor:
        """(V, C) in x's dtype (float32/float64): row j = Σ_e values_e·x[row(e)] over the CSR
        entries (indptr (N+1,), indices (nnz,) int64, values (nnz,)) with indices_e = j; x (N, C).
        The sparse targets' share of dE and db, in one deterministic pass without sorting."""
        return cpp_ops().ce_sparse_scatter(indptr, indices, values, x, num_items)


def _register_fakes() -> None:
    @torch.library.register_fake("fastattn::ce_lse")
    def _ce_lse_fake(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
        return hidden.new_empty((hidden.shape[0],), dtype=compute_dtype(hidden.dtype))

    @torch.library.register_fake("fastattn::ce_bwd")
    def _ce_bwd_fake(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        lse: torch.Tensor, coef_p: torch.Tensor, coef_base: torch.Tensor, target: torch.Tensor,
        coef_t: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(hidden.dtype)
        return (hidden.new_empty(hidden.shape, dtype=dtype), weight.new_empty(weight.shape, dtype=dtype),
                weight.new_empty((weight.shape[0] if bias is not None else 0,), dtype=dtype))


    @torch.library.register_fake("fastattn::ce_sparse_gather")
    def _ce_sparse_gather_fake(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                               table: torch.Tensor) -> torch.Tensor:
        return table.new_empty((indptr.shape[0] - 1, table.shape[1]))

    @torch.library.register_fake("fastattn::ce_sparse_scatter")
    def _ce_sparse_scatter_fake(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
                                num_items: int) -> torch.Tensor:
        return x.new_empty((num_items, x.shape[1]))


# Once per process, at import: the operators must exist before fake kernels can be attached.
if cpp_unavailable_reason() is None:
    _register_fakes()
