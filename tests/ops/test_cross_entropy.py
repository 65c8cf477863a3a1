"""Full-catalog cross-entropy (`fastattn.full_item_cross_entropy`) and soft targets on every
backend against materialized float64 references.

Backends (variants in catalog_cases.py): "torch" (also with tiny item chunks), "triton" (in its
interpreter here), "cpp" (also with tiny blocks). Each check runs on every variant unless a
comment says why not. The C++ operators themselves (opcheck, bad input): test_cross_entropy_ops.py;
top-k: test_topk.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastattn
from fastattn.ops.cross_entropy.reference import naive_cross_entropy

from backend_params import backend_param
from catalog_cases import (CPP_VARIANTS, TORCH_VARIANTS, assert_close, dense_soft_loss, leaves, make_case,
                           random_soft_target, run, run_naive)

ALL = [*TORCH_VARIANTS, "triton", *map(backend_param, CPP_VARIANTS)]


def variants(*names: str) -> list:
    """Indirect params of the `backend` fixture (tests/ops/conftest.py) for these variants."""
    return [backend_param(name) for name in names]


EVERY_BACKEND = pytest.mark.parametrize("backend", ALL, indirect=True)


SHAPES = [  # (N, V, D): the odd sizes of the issue, crossed so every value appears
    (1, 1, 8), (1, 1000, 64), (37, 13, 50), (37, 5003, 8), (257, 1000, 50), (257, 13, 64),
    (37, 1, 64), (257, 5003, 64),
]


@pytest.mark.parametrize("n,v,d", SHAPES)
@EVERY_BACKEND
def test_hard_targets(n: int, v: int, d: int, backend: str) -> None:
    case = make_case(n, v, d)
    assert_close(run(case, backend, temperature=0.7), run_naive(case, temperature=0.7))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@EVERY_BACKEND
def test_reductions_and_ignore_index(backend: str, reduction: str, ignore: str) -> None:
    case = make_case(37, 1000, 50, ignore=ignore)
    grad = torch.randn(37) if reduction == "none" else None  # each row weighted by its own gradient
    got = run(case, backend, grad=grad, reduction=reduction)
    want = run_naive(case, grad=grad, reduction=reduction)
    if ignore == "all":
        assert got[0].abs().max() == 0 and all(g is None or (g == 0).all() for g in got[1])
        if reduction == "mean":
            assert torch.isnan(want[0]).all()  # what torch gives; ours is 0 by contract
            return
    assert_close(got, want)


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("with_bias", [True, False])
@EVERY_BACKEND
def test_label_smoothing_temperature_bias(backend: str, label_smoothing: float, with_bias: bool) -> None:
    case = make_case(257, 1000, 8, with_bias=with_bias)
    kw = dict(label_smoothing=label_smoothing, temperature=2.5)
    assert_close(run(case, backend, **kw), run_naive(case, **kw))


@EVERY_BACKEND
def test_custom_ignore_index_and_leading_dims(backend: str) -> None:
    case = make_case(4 * 9, 13, 50)
    case["target"][case["target"] == -100] = -3  # ignore_index=-3 instead
    h, w, b = leaves(case)
    loss = fastattn.full_item_cross_entropy(h.view(4, 9, 50), w, case["target"].view(4, 9), bias=b,
                                            ignore_index=-3, reduction="none", backend=backend)
    assert loss.shape == (4, 9)
    ref = naive_cross_entropy(*leaves(case, torch.float64)[:2], case["target"], bias=case["bias"].double(),
                              ignore_index=-3, reduction="none")
    assert (loss.flatten().double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@EVERY_BACKEND
def test_low_precision_error_bound(backend: str, dtype: torch.dtype) -> None:
    # At most twice the error of the naive version run in that dtype, plus a small slack.
    case = make_case(257, 1000, 64, dtype=dtype)
    got = run(case, backend)
    truth = run_naive(case)
    low = run_naive(case, dtype=dtype)
    slack = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for g, t, lo in zip([got[0], *got[1]], [truth[0], *truth[1]], [low[0], *low[1]]):
        assert g.dtype == (torch.float32 if g.dim() == 0 else dtype)
        scale = max(1.0, t.abs().max().item())
        err = (g.double() - t).abs().max().item()
        assert err <= 2 * (lo.double() - t).abs().max().item() + slack * scale


# Triton takes no float64 (test_triton_backend_reasons); torch and C++ compute in float64 then.
@pytest.mark.parametrize("backend", variants("torch", "cpp"), indirect=True)
def test_float64_matches_reference_tightly(backend: str) -> None:
    case = make_case(37, 1000, 50, dtype=torch.float64)
    assert_close(run(case, backend, temperature=0.7), run_naive(case, temperature=0.7), tol=1e-10)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("backend", variants(*TORCH_VARIANTS, *CPP_VARIANTS), indirect=True)
def test_gradcheck(soft: bool, with_bias: bool, backend: str) -> None:
    # float64 only: no Triton (see above).
    case = make_case(6, 11, 5, dtype=torch.float64, with_bias=with_bias)
    target = random_soft_target(6, 11, seed=2, ignored_rows=(1,)) if soft else case["target"]
    inputs = [t for t in leaves(case) if t is not None]

    def loss(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return fastattn.full_item_cross_entropy(h, w, target, bias=b, temperature=0.7, label_smoothing=0.1,
                                                reduction="none", backend=backend)

    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("with_bias", [False, True])
@EVERY_BACKEND
def test_zero_rows_give_zero_gradients(backend: str, with_bias: bool) -> None:
    """N = 0 (e.g. a batch with no valid position): the catalog gradients are exactly zero."""
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(37, 8, requires_grad=True)
    bias = torch.randn(37, requires_grad=True) if with_bias else None
    loss = fastattn.full_item_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.int64), bias=bias,
                                            reduction="sum", backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    if with_bias:
        assert torch.equal(bias.grad, torch.zeros_like(bias))


# ---------------------------------------------------------------- soft targets
@pytest.mark.parametrize("n,v,d", [(37, 13, 50), (257, 1000, 8), (1, 5003, 64)])
@EVERY_BACKEND
def test_soft_targets_match_dense(n: int, v: int, d: int, backend: str) -> None:
    case = make_case(n, v, d)
    ignored = (0, n // 2) if n > 2 else ()
    st = random_soft_target(n, v, ignored_rows=ignored)
    got = run(case, backend, target=st, temperature=0.5, label_smoothing=0.1)
    want = dense_soft_loss(case, st.to_dense(v), temperature=0.5, label_smoothing=0.1)
    assert_close(got, want)


# a bfloat16 table always takes the segment sums (the C++ passes run in float32/float64 tables)
@pytest.mark.parametrize("path,dtype", [("own", torch.float32), ("segments", torch.float32),
                                        ("own", torch.bfloat16)])
@EVERY_BACKEND
def test_soft_target_sparse_paths(backend: str, path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
                                  ) -> None:
    """The sparse part by the backend's own kernels (the C++ ones: fastattn::ce_sparse_gather and
    ce_sparse_scatter) and by the generic segment sums (the other backends' path, forced here on
    the C++ one too, in blocks of a few entries): duplicate entries, rows without entries, an ignored
    row holding NaN, against the dense float64 reference (bfloat16: the sums run in float32, the
    gradients are rounded to bfloat16, 2**-8 relative, hence 8e-3)."""
    from fastattn.ops.cross_entropy import function
    from fastattn.ops.cross_entropy.cpp import CppCrossEntropyKernels

    if path == "segments":
        monkeypatch.delattr(CppCrossEntropyKernels, "sparse_gather")
        monkeypatch.delattr(CppCrossEntropyKernels, "sparse_scatter")
        # blocks of 3 entries (48 values / width 16): segments split across blocks, and blocks
        # holding no entry of some rows
        monkeypatch.setattr(function, "SPARSE_BLOCK_ELEMENTS", 48)
    n, v = 29, 41
    case = make_case(n, v, 16, dtype=dtype, seed=4)
    st = random_soft_target(n, v, seed=5, ignored_rows=(3, 17))
    indptr, indices, values = st.indptr.clone(), st.indices.clone(), st.values.clone()
    if indptr[9] - indptr[8] >= 2:  # a duplicate item within row 8
        indices[indptr[8] + 1] = indices[indptr[8]]
    st = fastattn.SoftTarget(st.base, indptr, indices, values)
    poisoned = dict(case, hidden=case["hidden"].clone())
    poisoned["hidden"][3] = float("nan")
    got = run(poisoned, backend, target=st, temperature=0.5)
    want = dense_soft_loss(case, st.to_dense(v), temperature=0.5)
    assert_close(got, want, tol=2e-5 if dtype == torch.float32 else 8e-3)
    assert (got[1][0][3] == 0).all()


@EVERY_BACKEND
def test_soft_target_reduces_to_hard_target(backend: str) -> None:
    case = make_case(37, 1000, 50, ignore="none")
    y = case["target"]
    st = fastattn.SoftTarget(torch.zeros(37), torch.arange(38), y.clone(), torch.ones(37))
    assert_close(run(case, backend, target=st), run(case, backend))


def test_soft_target_rows_gathers_csr_rows() -> None:
    st = random_soft_target(20, 50, seed=3)
    idx = torch.tensor([[4, 0], [19, 4]])
    sub = st.rows(idx)
    assert torch.equal(sub.to_dense(50), st.to_dense(50)[idx.flatten()])


def test_ted_teacher_matches_dense_construction() -> None:
    sequences = [[1, 2, 3, 2, 3, 4], [0, 0, 2, 3, 5], [5, 1, 2], [3]]
    v, tau = 7, 0.1
    teacher = fastattn.ted_teacher(sequences, num_items=v, tau=tau, pad_id=0)
    counts = np.zeros((v, v))
    for seq in sequences:
        for a, b in zip(seq[:-1], seq[1:]):
            if a != 0 and b != 0:
                counts[a, b] += 1
    ratio = np.divide(counts, counts.max(1, keepdims=True), out=np.zeros_like(counts),
                      where=counts.max(1, keepdims=True) > 0)
    expected = torch.softmax(torch.from_numpy(ratio / tau), dim=1)
    dense = teacher.to_dense(v)
    assert torch.allclose(dense, expected, atol=1e-6)
    assert teacher.indices.numel() == int((counts > 0).sum())  # sparse part: observed pairs only
    assert torch.allclose(dense[6], torch.full((v,), 1 / v, dtype=torch.float64))  # no successor: uniform


def test_ted_teacher_as_distillation_target() -> None:
    # The MQSA-TED use: student rows = item embeddings of a batch, teacher rows of those items.
    sequences = [[1, 2, 3, 4], [2, 3, 1], [4, 1, 2, 3]]
    teacher = fastattn.ted_teacher(sequences, num_items=5, tau=0.1)
    emb = torch.randn(5, 16, requires_grad=True)
    items = torch.tensor([[1, 2, 3], [4, 0, 0]])
    loss = fastattn.full_item_cross_entropy(emb[items], emb, teacher.rows(items), temperature=0.1)
    dense = teacher.to_dense(5)[items.flatten()]
    ref = -(dense * (emb[items].reshape(-1, 16).double() @ emb.double().T / 0.1).log_softmax(-1)).sum(-1).mean()
    assert abs(loss.item() - ref.item()) < 1e-4
    loss.backward()
    assert torch.isfinite(emb.grad).all()


# ---------------------------------------------------------------- module and bad input
def test_module_form() -> None:
    case = make_case(37, 1000, 50)
    module = fastattn.nn.FullItemCrossEntropy(label_smoothing=0.1, temperature=0.5, reduction="sum", backend="triton")
    h, w, b = leaves(case)
    loss = module(h, w, case["target"], bias=b)
    ref, _ = run_naive(case, label_smoothing=0.1, temperature=0.5, reduction="sum")
    assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item())
    assert "label_smoothing=0.1" in repr(module)


def _ce_args(**over: object) -> dict:
    case = make_case(5, 13, 8)
    kwargs = dict(hidden=case["hidden"], item_weight=case["weight"], target=case["target"])
    kwargs.update(over)
    return kwargs


def _bad_soft(**over: object) -> fastattn.SoftTarget:
    st = random_soft_target(5, 13)
    return fastattn.SoftTarget(**{**st.__dict__, **over})


BAD_CE = [
    (dict(target=torch.tensor([0, 1, 13, 2, 3])), ValueError, r"target holds 13, outside \[0, 13\)"),
    (dict(target=torch.tensor([0, 1, -5, 2, 3])), ValueError, "target holds -5"),
    (dict(target=torch.zeros(5, dtype=torch.int32)), TypeError, "target must be int64"),
    (dict(target=torch.zeros(4, dtype=torch.int64)), ValueError, "target must have one entry per row"),
    (dict(target="x"), TypeError, "target must be an int64 tensor or a fastattn.SoftTarget"),
    (dict(item_weight=torch.randn(13, 9)), ValueError, r"item_weight must have shape \(V >= 1, D=8\)"),
    (dict(item_weight=torch.randn(0, 8)), ValueError, "item_weight must have shape"),
    (dict(item_weight=torch.randn(13, 8, dtype=torch.float64)), TypeError, "item_weight has dtype"),
    (dict(hidden=torch.zeros(5, 8, dtype=torch.int64)), TypeError, "hidden must be a float tensor"),
    (dict(bias=torch.randn(12)), ValueError, r"bias must have shape \(V=13,\)"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(temperature=0.0), ValueError, "temperature must be a positive"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(target=_bad_soft(values=torch.full((int(random_soft_target(5, 13).indptr[-1]),), 0.9))),
     ValueError, r"target rows must sum to 1 \(or 0 to ignore the row\)"),
    (dict(target=_bad_soft(indices=torch.full((int(random_soft_target(5, 13).indptr[-1]),), 13))),
     ValueError, r"target.indices must lie in \[0, 13\)"),
    (dict(target=_bad_soft(base=torch.zeros(4))), ValueError, r"target \(SoftTarget\) has 4 rows but hidden has 5"),
    (dict(target=_bad_soft(indptr=torch.zeros(6, dtype=torch.int64))), ValueError, "target.indptr must"),
]


@pytest.mark.parametrize("over,exc,match", BAD_CE, ids=[m for _, _, m in BAD_CE])
def test_bad_input_raises(over: dict, exc: type, match: str) -> None:
    kwargs = _ce_args(**over)
    with pytest.raises(exc, match=match):
        fastattn.full_item_cross_entropy(kwargs.pop("hidden"), kwargs.pop("item_weight"), kwargs.pop("target"),
                                         **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton", backend_param("cpp")])
def test_bad_input_checked_before_dispatch(backend: str) -> None:
    # Validation happens in Python before dispatch, so every backend raises the same errors.
    case = make_case(5, 13, 8)
    with pytest.raises(ValueError, match=r"target holds 13, outside \[0, 13\)"):
        fastattn.full_item_cross_entropy(case["hidden"], case["weight"], torch.tensor([0, 1, 13, 2, 3]),
                                         backend=backend)


def test_triton_backend_reasons() -> None:
    case = make_case(5, 13, 8, dtype=torch.float64)
    with pytest.raises(fastattn.BackendUnavailable, match="float64"):
        fastattn.full_item_cross_entropy(case["hidden"], case["weight"], case["target"], backend="triton")
    wide = make_case(5, 13, 300)
    with pytest.raises(fastattn.BackendUnavailable, match="hidden size <= 256"):
        fastattn.full_item_cross_entropy(wide["hidden"], wide["weight"], wide["target"], backend="triton")
