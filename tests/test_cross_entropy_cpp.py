"""The C++ CPU backend of full-catalog cross-entropy and top-k (csrc/cross_entropy.cpp) against
the same float64 references as tests/test_cross_entropy.py, plus gradcheck and opcheck."""
from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

import fastattn
from fastattn.ops.cpp_extension import cpp_unavailable_reason
from fastattn.ops.cross_entropy.reference import naive_cross_entropy
from cpp_required import cpp_tests_mark
from test_cross_entropy import (assert_close, check_topk, dense_soft_loss, leaves, make_case, random_soft_target, run,
                                run_naive)

pytestmark = cpp_tests_mark()  # a failed build fails loudly; FASTATTN_DISABLE_CPP=1 skips
if cpp_unavailable_reason() is None:
    from fastattn.ops.cross_entropy.cpp import CppCrossEntropyKernels
    from fastattn.ops.topk.cpp import cpp_topk


@pytest.fixture(params=["default", "small-blocks"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernels' own blocking, and tiny blocks (7 rows × 5 items) so that every case spans
    many row blocks and item chunks, with ragged last ones."""
    if request.param == "small-blocks":
        monkeypatch.setenv("FASTATTN_CE_CHUNK_ROWS", "7")
        monkeypatch.setenv("FASTATTN_CE_CHUNK_ITEMS", "5")
    return request.param


SHAPES = [(1, 1, 8), (1, 1000, 64), (37, 13, 50), (37, 5003, 8), (257, 1000, 50), (257, 13, 64), (37, 1, 64)]


@pytest.mark.parametrize("n,v,d", SHAPES)
def test_hard_targets(n: int, v: int, d: int, blocks: str) -> None:
    case = make_case(n, v, d)
    assert_close(run(case, "cpp", temperature=0.7), run_naive(case, temperature=0.7))


def test_large_catalog_many_chunks() -> None:
    case = make_case(257, 5003, 64)  # default blocking: several chunks per thread
    assert_close(run(case, "cpp", temperature=0.7), run_naive(case, temperature=0.7))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_reductions_and_ignore_index(reduction: str, ignore: str) -> None:
    case = make_case(37, 1000, 50, ignore=ignore)
    grad = torch.randn(37) if reduction == "none" else None
    got = run(case, "cpp", grad=grad, reduction=reduction)
    want = run_naive(case, grad=grad, reduction=reduction)
    if ignore == "all":
        assert got[0].abs().max() == 0 and all(g is None or (g == 0).all() for g in got[1])
        if reduction == "mean":
            return  # torch gives NaN here; ours is 0 by contract
    assert_close(got, want)


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_label_smoothing_temperature_bias(label_smoothing: float, with_bias: bool, blocks: str) -> None:
    case = make_case(257, 1000, 8, with_bias=with_bias)
    kw = dict(label_smoothing=label_smoothing, temperature=2.5)
    assert_close(run(case, "cpp", **kw), run_naive(case, **kw))


def test_custom_ignore_index_and_leading_dims() -> None:
    case = make_case(4 * 9, 13, 50)
    case["target"][case["target"] == -100] = -3
    h, w, b = leaves(case)
    loss = fastattn.full_item_cross_entropy(h.view(4, 9, 50), w, case["target"].view(4, 9), bias=b,
                                            ignore_index=-3, reduction="none", backend="cpp")
    assert loss.shape == (4, 9)
    ref = naive_cross_entropy(*leaves(case, torch.float64)[:2], case["target"], bias=case["bias"].double(),
                              ignore_index=-3, reduction="none")
    assert (loss.flatten().double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bound(dtype: torch.dtype, blocks: str) -> None:
    # At most twice the error of the naive version run in that dtype, plus a small slack.
    case = make_case(257, 1000, 64, dtype=dtype)
    got = run(case, "cpp")
    truth = run_naive(case)
    low = run_naive(case, dtype=dtype)
    slack = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for g, t, lo in zip([got[0], *got[1]], [truth[0], *truth[1]], [low[0], *low[1]]):
        assert g.dtype == (torch.float32 if g.dim() == 0 else dtype)
        scale = max(1.0, t.abs().max().item())
        err = (g.double() - t).abs().max().item()
        assert err <= 2 * (lo.double() - t).abs().max().item() + slack * scale


@pytest.mark.parametrize("n,v,d", [(37, 13, 50), (257, 1000, 8), (1, 5003, 64)])
def test_soft_targets_match_dense(n: int, v: int, d: int, blocks: str) -> None:
    case = make_case(n, v, d)
    st = random_soft_target(n, v, ignored_rows=(0, n // 2) if n > 2 else ())
    got = run(case, "cpp", target=st, temperature=0.5, label_smoothing=0.1)
    want = dense_soft_loss(case, st.to_dense(v), temperature=0.5, label_smoothing=0.1)
    assert_close(got, want)


def test_float64_matches_reference_tightly() -> None:
    case = make_case(37, 1000, 50, dtype=torch.float64)
    assert_close(run(case, "cpp", temperature=0.7), run_naive(case, temperature=0.7), tol=1e-10)


# ---------------------------------------------------------------- gradcheck (float64)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(soft: bool, with_bias: bool, blocks: str) -> None:
    case = make_case(6, 11, 5, dtype=torch.float64, with_bias=with_bias)
    target = random_soft_target(6, 11, seed=2, ignored_rows=(1,)) if soft else case["target"]
    inputs = [t for t in leaves(case) if t is not None]

    def loss(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fastattn.full_item_cross_entropy(h, w, target, bias=b, temperature=0.7, label_smoothing=0.1,
                                                reduction="none", backend="cpp")

    assert torch.autograd.gradcheck(loss, inputs)


# ---------------------------------------------------------------- top-k
@pytest.mark.parametrize("n,v,k", [(1, 1, 1), (37, 13, 5), (37, 1000, 20), (257, 5003, 10), (3, 40, 40)])
@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_matches_torch_topk(n: int, v: int, k: int, with_exclude: bool, dtype: torch.dtype,
                                 blocks: str) -> None:
    check_topk(make_case(n, v, 50, dtype=dtype), k, with_exclude, cpp_topk)


def test_topk_items_uses_cpp_and_masks_history() -> None:
    weight = torch.eye(6)
    hidden = torch.tensor([[[6.0, 5, 4, 3, 2, 1]], [[1.0, 2, 3, 4, 5, 6]]])
    exclude = torch.tensor([[[0, 1, -1]], [[5, -1, -1]]])
    scores, index = fastattn.topk_items(hidden, weight, 3, exclude=exclude)
    assert index.tolist() == [[[2, 3, 4]], [[4, 3, 2]]]
    assert torch.equal(cpp_topk(hidden[:, 0], weight, 3, None, exclude[:, 0])[1], index[:, 0])


def test_topk_ties_are_deterministic() -> None:
    # Equal scores rank by item id, whatever the chunking and thread schedule.
    scores, index = cpp_topk(torch.ones(4, 3), torch.ones(100, 3), 10, None, None)
    assert (scores == 3).all() and index.tolist() == [list(range(10))] * 4


# ---------------------------------------------------------------- the operators directly
def _op_args(dtype: torch.dtype = torch.float32, with_bias: bool = True) -> dict:
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
    a = _op_args(dtype, with_bias)
    ops = torch.ops.fastattn
    lse = ops.ce_lse(a["hidden"], a["weight"], a["bias"], 0.5)
    torch.library.opcheck(ops.ce_lse, (a["hidden"], a["weight"], a["bias"], 0.5))
    torch.library.opcheck(ops.ce_bwd, (a["hidden"], a["weight"], a["bias"], 0.5, lse, a["coef_p"], a["coef_base"],
                                       a["target"], a["coef_t"]))
    exclude = torch.tensor([[0, -1, 3]] * 9)
    torch.library.opcheck(ops.topk_items, (a["hidden"], a["weight"], 4, a["bias"], exclude))


def test_backward_kernel_matches_chunked_torch() -> None:
    from fastattn.ops.cross_entropy.chunked import ChunkedCrossEntropyKernels

    a = _op_args()
    args = (a["hidden"], a["weight"], a["bias"], 0.5)
    lse = CppCrossEntropyKernels.lse(*args)
    assert torch.allclose(lse, ChunkedCrossEntropyKernels.lse(*args), atol=1e-5)
    rest = (lse, a["coef_p"], a["coef_base"], a["target"], a["coef_t"])
    for got, want in zip(CppCrossEntropyKernels.backward(*args, *rest), ChunkedCrossEntropyKernels.backward(*args, *rest)):
        assert torch.allclose(got, want, atol=1e-5)
    assert CppCrossEntropyKernels.backward(a["hidden"], a["weight"], None, 0.5, *rest)[2] is None


def _bad_op_calls() -> list[tuple[Callable[[], object], str]]:
    """(call, expected message) pairs; torch.ops.fastattn.* resolves only when a call runs."""
    a = _op_args()
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
def test_bad_input_to_the_ops(call: Callable[[], object], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        call()


def test_bad_chunk_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTATTN_CE_CHUNK_ITEMS", "zero")
    a = _op_args()
    with pytest.raises(RuntimeError, match="FASTATTN_CE_CHUNK_ITEMS must be a positive integer"):
        torch.ops.fastattn.ce_lse(a["hidden"], a["weight"], a["bias"], 1.0)


def test_functional_bad_input_still_checked_in_python() -> None:
    # Validation happens before dispatch, so backend="cpp" raises the same Python errors.
    case = make_case(5, 13, 8)
    with pytest.raises(ValueError, match=r"target holds 13, outside \[0, 13\)"):
        fastattn.full_item_cross_entropy(case["hidden"], case["weight"], torch.tensor([0, 1, 13, 2, 3]), backend="cpp")
    with pytest.raises(ValueError, match="exclude holds item ids >= 13"):
        fastattn.topk_items(case["hidden"], case["weight"], 3, exclude=torch.full((5, 2), 13))


@pytest.mark.parametrize("with_bias", [False, True])
def test_zero_rows_give_zero_gradients(with_bias: bool) -> None:
    """N = 0 (e.g. a batch with no valid position): the catalog gradients are exactly zero."""
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(37, 8, requires_grad=True)
    bias = torch.randn(37, requires_grad=True) if with_bias else None
    loss = fastattn.full_item_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.int64), bias=bias,
                                            reduction="sum", backend="cpp")
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    if with_bias:
        assert torch.equal(bias.grad, torch.zeros_like(bias))
