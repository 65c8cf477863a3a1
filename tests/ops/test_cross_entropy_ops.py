"""The C++ cross-entropy operators themselves (csrc/cross_entropy.cpp: fastattn::ce_lse, ce_bwd):
torch.library.opcheck, agreement with the chunked torch kernels, and bad input named by the op.
The end-to-end checks of every backend are in test_cross_entropy.py; top-k's operator in test_topk.py."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from catalog_cases import make_case
from cpp_required import cpp_tests_mark

pytestmark = cpp_tests_mark()  # a failed build fails loudly; FASTATTN_DISABLE_CPP=1 skips


def op_args(dtype: torch.dtype = torch.float32, with_bias: bool = True) -> dict:
    """Arguments of the operators on a small case: coefficients in the compute dtype, targets with -1."""
    case = make_case(9, 23, 8, dtype=dtype, with_bias=with_bias)
    gen = torch.Generator().manual_seed(5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = {name: torch.rand(9, generator=gen).to(acc) for name in ("coef_p", "coef_base", "coef_t")}
    return dict(hidden=case["hidden"], weight=case["weight"], bias=case["bias"], target=case["target"].clamp_min(-1),
                **coef)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(dtype: torch.dtype, with_bias: bool) -> None:
    a = op_args(dtype, with_bias)
    ops = torch.ops.fastattn
    lse = ops.ce_lse(a["hidden"], a["weight"], a["bias"], 0.5)
    torch.library.opcheck(ops.ce_lse, (a["hidden"], a["weight"], a["bias"], 0.5))
    torch.library.opcheck(ops.ce_bwd, (a["hidden"], a["weight"], a["bias"], 0.5, lse, a["coef_p"], a["coef_base"],
                                       a["target"], a["coef_t"]))


def test_backward_kernel_matches_chunked_torch() -> None:
    from fastattn.ops.cross_entropy.chunked import ChunkedCrossEntropyKernels
    from fastattn.ops.cross_entropy.cpp import CppCrossEntropyKernels

    a = op_args()
    args = (a["hidden"], a["weight"], a["bias"], 0.5)
    lse = CppCrossEntropyKernels.lse(*args)
    assert torch.allclose(lse, ChunkedCrossEntropyKernels.lse(*args), atol=1e-5)
    rest = (lse, a["coef_p"], a["coef_base"], a["target"], a["coef_t"])
    for got, want in zip(CppCrossEntropyKernels.backward(*args, *rest), ChunkedCrossEntropyKernels.backward(*args, *rest)):
        assert torch.allclose(got, want, atol=1e-5)
    assert CppCrossEntropyKernels.backward(a["hidden"], a["weight"], None, 0.5, *rest)[2] is None


def test_rows_without_a_target_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """ce_bwd computes only the rows with a nonzero coefficient (dH of the others is 0, whatever
    their hidden holds; a NaN coefficient still counts), and the operator asks ce_lse for the LSE
    of the rows with a target only: padding costs nothing on the C++ path."""
    import fastattn
    from fastattn.ops.cross_entropy.chunked import ChunkedCrossEntropyKernels
    from fastattn.ops.cross_entropy.cpp import CppCrossEntropyKernels

    a = op_args()
    skipped = [0, 3, 4, 8]
    for name in ("coef_p", "coef_base", "coef_t"):
        a[name][skipped] = 0
    clean = a["hidden"].clone()
    a["hidden"][skipped] = float("nan")
    args = (a["weight"], a["bias"], 0.5, CppCrossEntropyKernels.lse(clean, a["weight"], a["bias"], 0.5),
            a["coef_p"], a["coef_base"], a["target"], a["coef_t"])
    got = CppCrossEntropyKernels.backward(a["hidden"], *args)
    want = ChunkedCrossEntropyKernels.backward(clean, *args)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
    assert torch.equal(got[0][skipped], torch.zeros_like(got[0][skipped]))
    a["coef_t"][3] = float("nan")  # a NaN coefficient is not "no target"
    assert CppCrossEntropyKernels.backward(a["hidden"], *args[:-1], a["coef_t"])[0][3].isnan().all()

    rows_seen = []
    lse = CppCrossEntropyKernels.lse
    monkeypatch.setattr(CppCrossEntropyKernels, "lse", lambda h, *rest: rows_seen.append(h.shape[0]) or lse(h, *rest))
    case = make_case(12, 23, 8, ignore="none")
    target = case["target"].clone()
    target[[1, 2, 5, 6, 7, 11]] = -100
    hidden = case["hidden"].clone().requires_grad_()
    fastattn.full_item_cross_entropy(hidden, case["weight"], target, backend="cpp").backward()
    assert rows_seen == [6]


def _csr_case(n: int = 9, v: int = 23, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """CSR entries of n rows over v items (rows 0 and 4 empty, duplicates in row 2) and x (n, 5)."""
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([0, 3, 4, 1, 0, 2, 5, 1, 3][:n])
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    indices = torch.randint(0, v, (int(indptr[-1]),), generator=gen)
    indices[indptr[2]:indptr[2] + 2] = 7  # a duplicate item in one row
    values = torch.rand(indices.shape[0], generator=gen, dtype=dtype)
    x = torch.randn(n, 5, generator=gen, dtype=dtype)
    return indptr, indices, values, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_scatter(dtype: torch.dtype) -> None:
    """ce_sparse_scatter against the dense product, opcheck, and a strided x."""
    indptr, indices, values, x = _csr_case(dtype=dtype)
    rows = torch.repeat_interleave(torch.arange(9), indptr.diff())
    dense = torch.zeros(9, 23, dtype=torch.float64).index_put_((rows, indices), values.double(), accumulate=True)
    want = dense.t() @ x.double()
    ops = torch.ops.fastattn
    got = ops.ce_sparse_scatter(indptr, indices, values, x, 23)
    assert got.dtype == dtype and torch.allclose(got.double(), want, atol=1e-6)
    wide = torch.randn(5, 18, dtype=dtype).t()[:9]  # (9, 5) transposed and sliced
    assert torch.allclose(ops.ce_sparse_scatter(indptr, indices, values, wide, 23).double(),
                          dense.t() @ wide.double(), atol=1e-6)
    assert ops.ce_sparse_scatter(indptr[:1], indices[:0], values[:0], x[:0], 4).abs().sum() == 0
    torch.library.opcheck(ops.ce_sparse_scatter, (indptr, indices, values, x, 23))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_gather(dtype: torch.dtype) -> None:
    """ce_sparse_gather against the dense product (rows without entries: 0), opcheck, a strided table."""
    indptr, indices, values, _ = _csr_case(dtype=dtype)
    rows = torch.repeat_interleave(torch.arange(9), indptr.diff())
    dense = torch.zeros(9, 23, dtype=torch.float64).index_put_((rows, indices), values.double(), accumulate=True)
    table = torch.randn(6, 23, dtype=dtype).t()  # (23, 6), transposed
    ops = torch.ops.fastattn
    got = ops.ce_sparse_gather(indptr, indices, values, table)
    assert got.dtype == dtype and torch.allclose(got.double(), dense @ table.double(), atol=1e-6)
    assert (got[[0, 4]] == 0).all()
    assert ops.ce_sparse_gather(indptr[:1], indices[:0], values[:0], table).shape == (0, 6)
    torch.library.opcheck(ops.ce_sparse_gather, (indptr, indices, values, table.contiguous()))


def _bad_op_calls() -> list[tuple[Callable[[], object], str]]:
    """(call, expected message) pairs; torch.ops.fastattn.* resolves only when a call runs."""
    a = op_args()
    h, w, b = a["hidden"], a["weight"], a["bias"]
    lse = torch.zeros(9)
    p, base, y, t = a["coef_p"], a["coef_base"], a["target"], a["coef_t"]
    ops = torch.ops.fastattn
    return [
        (lambda: ops.ce_lse(h[0], w, b, 1.0), r"ce_lse: hidden must have shape \(N, D\)"),
        (lambda: ops.ce_lse(h.long(), w, b, 1.0), "ce_lse: hidden must be float32, float64"),
        (lambda: ops.ce_lse(h, w[:, :3], b, 1.0), r"ce_lse: weight must have shape \(V >= 1, D=8\)"),
        (lambda: ops.ce_lse(h, w.double(), b, 1.0), "ce_lse: weight has dtype Double but hidden has Float"),
        (lambda: ops.ce_lse(h, w, b[:5], 1.0), r"ce_lse: bias must have shape \(V=23,\)"),
        (lambda: ops.ce_lse(h, w, b.double(), 1.0), "ce_lse: bias has dtype Double"),
        (lambda: ops.ce_lse(h, w, b, float("inf")), "ce_lse: scale must be a positive finite float"),
        (lambda: ops.ce_bwd(h, w, b, 1.0, lse[:3], p, base, y, t), r"ce_bwd: lse must have shape \(N=9,\)"),
        (lambda: ops.ce_bwd(h, w, b, 1.0, lse, p.long(), base, y, t), "ce_bwd: coef_p must be a float"),
        (lambda: ops.ce_bwd(h, w, b, 1.0, lse, p, base, y.int(), t),
         r"ce_bwd: target must be an int64 tensor of shape \(N=9,\)"),
        (lambda: ops.ce_bwd(h, w, b, 1.0, lse, p, base, torch.full((9,), 23), t),
         r"ce_bwd: target must hold item ids in \[0, 23\) or -1"),
        (lambda: ops.ce_sparse_scatter(*_csr_case()[:3], h.long(), 23),
         r"ce_sparse_scatter: x \(N, C\) must be a 2-D float32 or float64 CPU tensor"),
        (lambda: ops.ce_sparse_gather(*_csr_case()[:3], w[:, :2].long()),
         r"ce_sparse_gather: table \(V, C\) must be a 2-D float32 or float64"),
        (lambda: ops.ce_sparse_gather(*_csr_case()[:3], w[:4]), r"ce_sparse_gather: indices must be in \[0, 4\)"),
        (lambda: ops.ce_sparse_scatter(_csr_case()[0][:-1], *_csr_case()[1:3], h, 23),
         r"ce_sparse_scatter: indptr must be an int64 CPU tensor of shape \(N\+1=10,\)"),
        (lambda: ops.ce_sparse_scatter(_csr_case()[0].flip(0), *_csr_case()[1:3], h, 23),
         "ce_sparse_scatter: indptr must rise from 0 to nnz"),
        (lambda: ops.ce_sparse_scatter(*_csr_case()[:3], h, 5), r"ce_sparse_scatter: indices must be in \[0, 5\)"),
        (lambda: ops.ce_sparse_scatter(_csr_case()[0], _csr_case()[1], _csr_case()[2][:2], h, 23),
         "ce_sparse_scatter: values must be a CPU tensor of shape"),
    ]


BAD_OPS = _bad_op_calls()


@pytest.mark.parametrize("call,match", BAD_OPS, ids=[m for _, m in BAD_OPS])
def test_bad_input_to_the_ops(call: Callable[[], object], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        call()


def test_bad_chunk_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTATTN_CE_CHUNK_ITEMS", "zero")
    a = op_args()
    with pytest.raises(RuntimeError, match="FASTATTN_CE_CHUNK_ITEMS must be a positive integer"):
        torch.ops.fastattn.ce_lse(a["hidden"], a["weight"], a["bias"], 1.0)
