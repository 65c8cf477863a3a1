"""Full-catalog cross-entropy, soft targets and top-k against materialized float64 references."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import pytest
import torch

import fastattn
from fastattn.ops import _common as chunked  # item_chunks and CHUNK_ELEMENTS live in ops/_common.py
from fastattn.ops.cross_entropy.reference import materialized_logits, naive_cross_entropy

@pytest.fixture(params=["torch", "torch-small-chunks", "triton"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend to test; the torch backend also with tiny item chunks (many chunks per call).
    The Triton kernels split their loops by size alone, so small and large cases cover both."""
    if request.param == "torch-small-chunks":
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 257 * 37)
        return "torch"
    return request.param


def make_case(n: int, v: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0,
              ignore: str = "some", with_bias: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, v, (n,), generator=gen)
    if ignore == "some":
        target[torch.rand(n, generator=gen) < 0.3] = -100
    elif ignore == "all":
        target[:] = -100
    return {
        "hidden": torch.randn(n, d, generator=gen).to(dtype),
        "weight": (torch.randn(v, d, generator=gen) / d ** 0.25).to(dtype),
        "bias": torch.randn(v, generator=gen).to(dtype) if with_bias else None,
        "target": target,
    }


def leaves(case: dict, dtype: Optional[torch.dtype] = None) -> list[Optional[torch.Tensor]]:
    return [None if case[k] is None else case[k].detach().to(dtype or case[k].dtype).requires_grad_(True)
            for k in ("hidden", "weight", "bias")]


def run(case: dict, backend: str, target: object = None, grad: Optional[torch.Tensor] = None, **kw: object
        ) -> tuple[torch.Tensor, list]:
    h, w, b = leaves(case)
    loss = fastattn.full_item_cross_entropy(h, w, case["target"] if target is None else target, bias=b,
                                            backend=backend, **kw)
    (loss * (grad if grad is not None else 1.0)).sum().backward()
    return loss.detach(), [None if t is None else t.grad for t in (h, w, b)]


def run_naive(case: dict, target: Optional[torch.Tensor] = None, grad: Optional[torch.Tensor] = None,
              dtype: torch.dtype = torch.float64, **kw: object) -> tuple[torch.Tensor, list]:
    h, w, b = leaves(case, dtype)
    loss = naive_cross_entropy(h, w, case["target"] if target is None else target, bias=b, **kw)
    (loss * (grad.to(dtype) if grad is not None else 1.0)).sum().backward()
    return loss.detach(), [None if t is None else t.grad for t in (h, w, b)]


def assert_close(got: tuple, want: tuple, tol: float = 2e-5) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert torch.isfinite(loss).all()
    assert (loss.double() - ref_loss).abs().max() <= tol * max(1.0, ref_loss.abs().max().item())
    for name, g, r in zip(("hidden", "item_weight", "bias"), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert torch.isfinite(g).all(), name
            err = (g.double() - r).abs().max().item()
            assert err <= tol * max(1.0, r.abs().max().item()), f"{name}: {err:.2e}"


SHAPES = [  # (N, V, D): the odd sizes of the issue, crossed so every value appears
    (1, 1, 8), (1, 1000, 64), (37, 13, 50), (37, 5003, 8), (257, 1000, 50), (257, 13, 64),
    (37, 1, 64), (257, 5003, 64),
]


@pytest.mark.parametrize("n,v,d", SHAPES)
def test_hard_targets(n: int, v: int, d: int, backend: str) -> None:
    case = make_case(n, v, d)
    assert_close(run(case, backend, temperature=0.7), run_naive(case, temperature=0.7))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
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
def test_label_smoothing_temperature_bias(backend: str, label_smoothing: float, with_bias: bool) -> None:
    case = make_case(257, 1000, 8, with_bias=with_bias)
    kw = dict(label_smoothing=label_smoothing, temperature=2.5)
    assert_close(run(case, backend, **kw), run_naive(case, **kw))


def test_custom_ignore_index_and_leading_dims(backend: str) -> None:
    case = make_case(4 * 9, 13, 50)
    case["target"][case["target"] == -100] = 7 - 10  # ignore_index=-3 instead
    h, w, b = leaves(case)
    loss = fastattn.full_item_cross_entropy(h.view(4, 9, 50), w, case["target"].view(4, 9), bias=b,
                                            ignore_index=-3, reduction="none", backend=backend)
    assert loss.shape == (4, 9)
    ref = naive_cross_entropy(*leaves(case, torch.float64)[:2], case["target"], bias=case["bias"].double(),
                              ignore_index=-3, reduction="none")
    assert (loss.flatten().double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
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


# ---------------------------------------------------------------- soft targets
def random_soft_target(n: int, v: int, seed: int = 0, ignored_rows: tuple = ()) -> fastattn.SoftTarget:
    """Rows mixing a dense base with a few sparse entries (duplicates included), summing to 1."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (n,), generator=gen)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    indices = torch.randint(0, v, (int(indptr[-1]),), generator=gen)
    raw = torch.rand(int(indptr[-1]), generator=gen, dtype=torch.float64)
    base_share = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    base_share[counts == 0] = 1.0
    row_of = torch.repeat_interleave(torch.arange(n), counts)
    row_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, row_of, raw)
    values = raw / row_sum[row_of] * (1 - base_share[row_of])
    base = base_share / v
    for r in ignored_rows:
        base[r] = 0
        values[row_of == r] = 0
    return fastattn.SoftTarget(base.float(), indptr, indices, values.float())


def dense_soft_loss(case: dict, t: torch.Tensor, dtype: torch.dtype = torch.float64, reduction: str = "mean",
                    temperature: float = 1.0, label_smoothing: float = 0.0) -> tuple[torch.Tensor, list]:
    h, w, b = leaves(case, dtype)
    logits = materialized_logits(h, w, b, temperature)
    used = t.sum(1) > 0
    t = t * (1 - label_smoothing) + used[:, None] * label_smoothing / t.shape[1]
    per_row = -(t * logits.log_softmax(-1)).sum(-1)
    loss = per_row.sum() / used.sum().clamp_min(1) if reduction == "mean" else per_row
    loss.sum().backward()
    return loss.detach(), [None if x is None else x.grad for x in (h, w, b)]


@pytest.mark.parametrize("n,v,d", [(37, 13, 50), (257, 1000, 8), (1, 5003, 64)])
def test_soft_targets_match_dense(n: int, v: int, d: int, backend: str) -> None:
    case = make_case(n, v, d)
    ignored = (0, n // 2) if n > 2 else ()
    st = random_soft_target(n, v, ignored_rows=ignored)
    got = run(case, backend, target=st, temperature=0.5, label_smoothing=0.1)
    want = dense_soft_loss(case, st.to_dense(v), temperature=0.5, label_smoothing=0.1)
    assert_close(got, want)


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


# ---------------------------------------------------------------- top-k
@pytest.mark.parametrize("n,v,k", [(1, 1, 1), (37, 13, 5), (37, 1000, 20), (257, 5003, 10)])
@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("chunk_elements", [chunked.CHUNK_ELEMENTS, 257 * 37])
def test_topk_matches_torch_topk(n: int, v: int, k: int, with_exclude: bool, chunk_elements: int,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", chunk_elements)
    check_topk(make_case(n, v, 50), k, with_exclude,
               lambda h, w, kk, b, ex: fastattn.topk_items(h, w, kk, bias=b, exclude=ex, backend="torch"))


def check_topk(case: dict, k: int, with_exclude: bool, topk_fn: Callable[..., tuple]) -> None:
    """topk_fn(hidden, weight, k, bias, exclude) against torch.topk of the masked float64 logits."""
    n, v = case["hidden"].shape[0], case["weight"].shape[0]
    exclude = None
    logits = materialized_logits(case["hidden"].double(), case["weight"].double(), case["bias"].double())
    if with_exclude:
        gen = torch.Generator().manual_seed(1)
        exclude = torch.randint(-1, v, (n, 30), generator=gen)  # -1 = unused slot; duplicates too
        mask = torch.zeros(n, v, dtype=torch.bool)
        rows = torch.arange(n)[:, None].expand_as(exclude)
        mask[rows[exclude >= 0], exclude[exclude >= 0]] = True
        logits = logits.masked_fill(mask, float("-inf"))
    scores, index = topk_fn(case["hidden"], case["weight"], k, case["bias"], exclude)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64 and scores.shape == (n, k)
    ref = logits.topk(k, dim=1)
    finite = torch.isfinite(ref.values)
    assert torch.equal(index[finite], ref.indices[finite])
    assert torch.allclose(scores[finite].double(), ref.values[finite], atol=1e-4)
    assert (index[~finite] == -1).all() and torch.isinf(scores[~finite]).all()


def test_topk_leading_dims_and_history_masking() -> None:
    weight = torch.eye(6)
    hidden = torch.tensor([[[6.0, 5, 4, 3, 2, 1]], [[1.0, 2, 3, 4, 5, 6]]])  # (2, 1, 6)
    exclude = torch.tensor([[[0, 1, -1]], [[5, -1, -1]]])
    scores, index = fastattn.topk_items(hidden, weight, 3, exclude=exclude, backend="torch")
    assert index.shape == (2, 1, 3)
    assert index.tolist() == [[[2, 3, 4]], [[4, 3, 2]]]


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


def test_triton_backend_reasons() -> None:
    case = make_case(5, 13, 8, dtype=torch.float64)
    with pytest.raises(fastattn.BackendUnavailable, match="float64"):
        fastattn.full_item_cross_entropy(case["hidden"], case["weight"], case["target"], backend="triton")
    wide = make_case(5, 13, 300)
    with pytest.raises(fastattn.BackendUnavailable, match="hidden size <= 256"):
        fastattn.full_item_cross_entropy(wide["hidden"], wide["weight"], wide["target"], backend="triton")
