"""Exact top-k items of the whole catalog (`fastattn.topk_items`) on every backend against
torch.topk of the materialized float64 scores, plus the C++ operator itself.

Backends (variants in catalog_cases.py): "torch" (also with tiny item chunks) and "cpp" (also
with tiny blocks); top-k has no Triton kernel (test_bad_topk_input_raises).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import fastattn

from backend_params import backend_param
from catalog_cases import CPP_VARIANTS, TORCH_VARIANTS, check_topk, make_case
from cpp_required import cpp_tests_mark

EVERY_BACKEND = pytest.mark.parametrize("backend", [*TORCH_VARIANTS, *map(backend_param, CPP_VARIANTS)],
                                        indirect=True)
CPP_ONLY = cpp_tests_mark()  # a failed build fails loudly; FASTATTN_DISABLE_CPP=1 skips


@pytest.mark.parametrize("n,v,k", [(1, 1, 1), (37, 13, 5), (37, 1000, 20), (257, 5003, 10), (3, 40, 40)])
@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@EVERY_BACKEND
def test_topk_matches_torch_topk(n: int, v: int, k: int, with_exclude: bool, dtype: torch.dtype,
                                 backend: str) -> None:
    check_topk(make_case(n, v, 50, dtype=dtype), k, with_exclude,
               lambda h, w, kk, b, ex: fastattn.topk_items(h, w, kk, bias=b, exclude=ex, backend=backend))


@pytest.mark.parametrize("backend", ["torch", backend_param("cpp")])
def test_topk_leading_dims_and_history_masking(backend: str) -> None:
    weight = torch.eye(6)
    hidden = torch.tensor([[[6.0, 5, 4, 3, 2, 1]], [[1.0, 2, 3, 4, 5, 6]]])  # (2, 1, 6)
    exclude = torch.tensor([[[0, 1, -1]], [[5, -1, -1]]])
    scores, index = fastattn.topk_items(hidden, weight, 3, exclude=exclude, backend=backend)
    assert index.shape == (2, 1, 3)
    assert index.tolist() == [[[2, 3, 4]], [[4, 3, 2]]]


@CPP_ONLY
def test_topk_items_auto_on_cpu_uses_cpp_and_masks_history() -> None:
    weight = torch.eye(6)
    hidden = torch.tensor([[[6.0, 5, 4, 3, 2, 1]], [[1.0, 2, 3, 4, 5, 6]]])
    exclude = torch.tensor([[[0, 1, -1]], [[5, -1, -1]]])
    scores, index = fastattn.topk_items(hidden, weight, 3, exclude=exclude)
    assert index.tolist() == [[[2, 3, 4]], [[4, 3, 2]]]
    cpp = fastattn.topk_items(hidden[:, 0], weight, 3, exclude=exclude[:, 0], backend="cpp")
    assert torch.equal(cpp[1], index[:, 0])


@EVERY_BACKEND
def test_topk_ties_are_deterministic(backend: str) -> None:
    # Equal scores rank by item id, whatever the chunking and thread schedule.
    scores, index = fastattn.topk_items(torch.ones(4, 3), torch.ones(100, 3), 10, backend=backend)
    assert (scores == 3).all() and index.tolist() == [list(range(10))] * 4


# ---------------------------------------------------------------- bad input
BAD_TOPK = [
    (dict(backend="triton"), fastattn.BackendUnavailable, "top-k has no Triton kernel"),
    (dict(k=0), ValueError, r"k must be an int in \[1, 13\]"),
    (dict(k=14), ValueError, r"k must be an int in \[1, 13\]"),
    (dict(exclude=torch.zeros(5, 2, dtype=torch.int32)), TypeError, "exclude must be an int64 tensor"),
    (dict(exclude=torch.zeros(4, 2, dtype=torch.int64)), ValueError, "exclude must have shape"),
    (dict(exclude=torch.full((5, 2), 13)), ValueError, "exclude holds item ids >= 13"),
]


@pytest.mark.parametrize("over,exc,match", BAD_TOPK, ids=[m for _, _, m in BAD_TOPK])
def test_bad_topk_input_raises(over: dict, exc: type, match: str) -> None:
    case = make_case(5, 13, 8)
    kwargs = {"k": 3, **over}
    with pytest.raises(exc, match=match):
        fastattn.topk_items(case["hidden"], case["weight"], kwargs.pop("k"), **kwargs)


@CPP_ONLY
def test_bad_input_checked_in_python_before_the_cpp_kernel() -> None:
    case = make_case(5, 13, 8)
    with pytest.raises(ValueError, match="exclude holds item ids >= 13"):
        fastattn.topk_items(case["hidden"], case["weight"], 3, exclude=torch.full((5, 2), 13), backend="cpp")


# ---------------------------------------------------------------- the C++ operator directly
def _op_inputs(dtype: torch.dtype = torch.float32, with_bias: bool = True) -> tuple:
    case = make_case(9, 23, 8, dtype=dtype, with_bias=with_bias)
    return case["hidden"], case["weight"], case["bias"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@CPP_ONLY
def test_opcheck(dtype: torch.dtype, with_bias: bool) -> None:
    h, w, b = _op_inputs(dtype, with_bias)
    exclude = torch.tensor([[0, -1, 3]] * 9)
    torch.library.opcheck(torch.ops.fastattn.topk_items, (h, w, 4, b, exclude))


def _bad_op_calls() -> list[tuple[Callable[[], object], str]]:
    """(call, expected message) pairs; torch.ops.fastattn.* resolves only when a call runs."""
    h, w, b = _op_inputs()
    ops = torch.ops.fastattn
    return [
        (lambda: ops.topk_items(h, w, 0, b, None), r"topk_items: k must be in \[1, 23\]"),
        (lambda: ops.topk_items(h, w, 24, b, None), r"topk_items: k must be in \[1, 23\]"),
        (lambda: ops.topk_items(h, w, 3, b, torch.zeros(9, 2, dtype=torch.int32)),
         "topk_items: exclude must be an int64 tensor"),
        (lambda: ops.topk_items(h, w, 3, b, torch.zeros(8, 2, dtype=torch.int64)),
         r"topk_items: exclude must have shape \(N=9, M\)"),
        (lambda: ops.topk_items(h, w, 3, b, torch.full((9, 2), 23)), "topk_items: exclude holds item id 23"),
    ]


BAD_OPS = _bad_op_calls()


@pytest.mark.parametrize("call,match", BAD_OPS, ids=[m for _, m in BAD_OPS])
@CPP_ONLY
def test_bad_input_to_the_op(call: Callable[[], object], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        call()


def test_topk_items_auto_on_cuda_tensors_picks_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """top-k has no Triton kernel, so "auto" on CUDA tensors must run the chunked torch version.
    (The first GPU run found "auto" resolving to "triton" there: a KeyError at every GPU
    evaluation.) Fake CUDA tensors: the dispatch is checked without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastattn.functional as functional

    seen: list[str] = []

    def torch_topk(h: torch.Tensor, w: torch.Tensor, k: int, bias: object, exclude: object):
        seen.append(h.device.type)
        return h.new_zeros(h.shape[0], k), h.new_zeros(h.shape[0], k, dtype=torch.int64)

    monkeypatch.setitem(functional.TOPK_BACKENDS, "torch", torch_topk)
    with FakeTensorMode():
        scores, index = fastattn.topk_items(torch.randn(2, 3, 8, device="cuda"), torch.randn(50, 8, device="cuda"), 5)
    assert seen == ["cuda"]
    assert scores.shape == index.shape == (2, 3, 5)
