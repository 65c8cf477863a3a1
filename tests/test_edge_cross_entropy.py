"""Issue 15, cross-entropy and top-k side: bad and unusual input on every backend.

Strided arguments (transposed, stepped, row-sliced, expanded) against float64; double backward
raising a clear error; ignored rows holding NaN/inf; one top-k ranking rule (ties, ±inf, NaN)
on the torch and C++ backends; the TED teacher at small τ; empty and all-ignored batches; the
D = 0 and SoftTarget errors. Tiny shapes (the Triton backend runs in its interpreter).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastattn
from fastattn.ops import _common
from fastattn.ops.cross_entropy import chunked
from fastattn.ops.cross_entropy.reference import materialized_logits
from cpp_required import cpp_tests_mark
from catalog_cases import assert_close, dense_soft_loss, leaves, make_case, random_soft_target, run, run_naive

CPP = pytest.param("cpp", marks=cpp_tests_mark())
N, V, D = 67, 70, 8  # more rows and items than one Triton tile (64), so strides cross tiles


@pytest.fixture(params=["torch", CPP, "triton"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


# ---------------------------------------------------------------- strided arguments
LAYOUTS = ["transposed", "step", "rows", "expand"]


def restride(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous view holding t's values ("expand": t's first row or entry, repeated):
    transposed (a 1-D tensor: a column of a row-major matrix), every other row and column,
    every other row of a wider matrix at an offset (unit stride along D; 1-D: an offset), or
    stride 0."""
    if layout == "expand":
        return t[:1].expand_as(t)
    if t.dim() == 1:
        n = t.shape[0]
        if layout == "transposed":
            view = t.new_zeros(n, 3)[:, 1]
        else:
            big = t.new_zeros(2 * n + 1)
            view = big[::2][:n] if layout == "step" else big[1:n + 1]
    else:
        n, d = t.shape
        if layout == "transposed":
            return t.T.contiguous().T
        big = t.new_zeros(2 * n, 2 * d) if layout == "step" else t.new_zeros(2 * n, d + 1)
        view = big[::2, ::2] if layout == "step" else big[::2, 1:]
    view.copy_(t)
    return view


def is_unusual(t: torch.Tensor) -> bool:
    """Not a plain contiguous tensor at the start of its storage."""
    return not t.is_contiguous() or t.storage_offset() > 0


def kernels_of(backend: str) -> type:
    """The `CrossEntropyKernels` class behind a backend name."""
    if backend == "cpp":
        from fastattn.ops.cross_entropy.cpp import CppCrossEntropyKernels
        return CppCrossEntropyKernels
    if backend == "triton":
        from fastattn.ops.cross_entropy.triton_backend import TritonCrossEntropyKernels
        return TritonCrossEntropyKernels
    return chunked.ChunkedCrossEntropyKernels


def kernel_args() -> dict:
    """Arguments of CrossEntropyKernels.lse / .backward: a catalog, LSE, coefficients, targets (-1: none)."""
    case = make_case(N, V, D, seed=15)
    gen = torch.Generator().manual_seed(16)
    coefs = {name: torch.rand(N, generator=gen) for name in ("coef_p", "coef_base", "coef_t")}
    lse = torch.logsumexp(materialized_logits(case["hidden"], case["weight"], case["bias"], 1 / 0.7), dim=1)
    return dict(hidden=case["hidden"], weight=case["weight"], bias=case["bias"], lse=lse,
                target=case["target"].clamp_min(-1), **coefs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arg", ["hidden", "weight", "bias", "lse", "coef_p", "coef_base", "target", "coef_t"])
def test_kernels_take_any_strides(backend: str, arg: str, layout: str) -> None:
    """Each backend's kernels (below the functional's checks) read every tensor argument with its
    strides: LSE, dH, dE and db as in float64."""
    args = kernel_args()
    args[arg] = restride(args[arg], layout)
    assert is_unusual(args[arg])
    kernels = kernels_of(backend)
    catalog = (args["hidden"], args["weight"], args["bias"], 1 / 0.7)
    rest = (args["lse"], args["coef_p"], args["coef_base"], args["target"], args["coef_t"])
    got = [kernels.lse(*catalog), *kernels.backward(*catalog, *rest)]
    for name, g, want in zip(("lse", "dH", "dE", "db"), got, kernel_reference(args)):
        err = (g.double() - want).abs().max().item()
        assert err <= 2e-5 * max(1.0, want.abs().max().item()), f"{name}: {err:.2e}"


def kernel_reference(a: dict) -> tuple[torch.Tensor, ...]:
    """float64 LSE and, from the given lse, dz = scale·(coef_p·softmax − coef_base − coef_t·onehot)
    → dH = dz E, dE = dzᵀ H, db = Σ_rows dz (the `CrossEntropyKernels` contract)."""
    h, w, b = (a[k].double() for k in ("hidden", "weight", "bias"))
    scale = 1 / 0.7
    z = materialized_logits(h, w, b) * scale
    onehot = torch.zeros_like(z)
    hit = a["target"] >= 0
    onehot[hit.nonzero()[:, 0], a["target"][hit]] = 1
    dz = scale * (a["coef_p"].double()[:, None] * (z - a["lse"].double()[:, None]).exp()
                  - a["coef_base"].double()[:, None] - a["coef_t"].double()[:, None] * onehot)
    return torch.logsumexp(z, dim=1), dz @ w, dz.T @ h, dz.sum(0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arg", ["hidden", "weight", "bias", "target"])
def test_strided_hard_target_arguments(backend: str, arg: str, layout: str) -> None:
    case = make_case(N, V, D, seed=5)
    assert case["target"][0] != -100  # "expand" repeats row 0's target
    case[arg] = restride(case[arg], layout)
    assert is_unusual(case[arg])
    kw = dict(label_smoothing=0.1, temperature=0.7)
    assert_close(run(case, backend, **kw), run_naive(case, **kw))


def _uniform_rows(n: int, v: int, part: str) -> fastattn.SoftTarget:
    """Every row alike, so that `part` can be a stride-0 view: half on item 3 and half spread
    (for indptr: no sparse entries at all, the uniform distribution)."""
    if part == "indptr":
        empty = torch.zeros(0, dtype=torch.int64)
        return fastattn.SoftTarget(torch.full((n,), 1 / v), torch.zeros(n + 1, dtype=torch.int64), empty,
                                   torch.zeros(0))
    return fastattn.SoftTarget(torch.full((n,), 0.5 / v), torch.arange(n + 1), torch.full((n,), 3),
                               torch.full((n,), 0.5))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("part", ["base", "indptr", "indices", "values"])
def test_strided_soft_target_parts(backend: str, part: str, layout: str) -> None:
    case = make_case(N, V, D, seed=5)
    st = _uniform_rows(N, V, part) if layout == "expand" else random_soft_target(N, V, seed=6, ignored_rows=(2,))
    parts = dict(st.__dict__)
    parts[part] = restride(parts[part], layout)
    assert is_unusual(parts[part])
    strided = fastattn.SoftTarget(**parts)
    got = run(case, backend, target=strided, temperature=0.5, label_smoothing=0.1)
    assert_close(got, dense_soft_loss(case, st.to_dense(V), temperature=0.5, label_smoothing=0.1))


def ranked_reference(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented top-k rule on dense float64 scores (N, V), -inf for excluded items: NaN and
    -inf ineligible, highest first, equal scores by lower item id, tail -inf / -1."""
    scores = torch.where(scores.isnan(), float("-inf"), scores)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    top = scores.gather(1, order)
    return top, torch.where(top == float("-inf"), -1, order)


def masked_scores(case: dict) -> torch.Tensor:
    """float64 h·E_j + b_j with each row's excluded items at -inf."""
    logits = materialized_logits(case["hidden"].double(), case["weight"].double(), case["bias"].double())
    ex = case["exclude"]
    rows = torch.arange(ex.shape[0])[:, None].expand_as(ex)
    return logits.index_put((rows[ex >= 0], ex[ex >= 0]), torch.tensor(float("-inf"), dtype=torch.float64))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arg", ["hidden", "weight", "bias", "exclude"])
@pytest.mark.parametrize("topk_backend", ["torch", CPP])
def test_strided_topk_arguments(topk_backend: str, arg: str, layout: str) -> None:
    case = make_case(N, V, D, seed=7)
    case["exclude"] = torch.randint(-1, V, (N, 9), generator=torch.Generator().manual_seed(8))
    case[arg] = restride(case[arg], layout)
    scores, index = fastattn.topk_items(case["hidden"], case["weight"], 10, bias=case["bias"],
                                        exclude=case["exclude"], backend=topk_backend)
    want_scores, want_index = ranked_reference(masked_scores(case), 10)
    assert torch.equal(index, want_index)
    assert torch.allclose(scores.double(), want_scores, atol=1e-5)


# ---------------------------------------------------------------- double backward
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_double_backward_raises_naming_the_function(backend: str, soft: bool) -> None:
    case = make_case(6, 11, 8, seed=9)
    target = random_soft_target(6, 11, seed=10) if soft else case["target"]
    h, w, b = leaves(case)
    first = torch.autograd.grad(fastattn.full_item_cross_entropy(h, w, target, bias=b, backend=backend), (h, w, b))
    grads = torch.autograd.grad(fastattn.full_item_cross_entropy(h, w, target, bias=b, backend=backend), (h, w, b),
                                create_graph=True)
    for g, want in zip(grads, first):  # create_graph=True leaves the first derivative unchanged
        assert torch.equal(g.detach(), want)
    for g in grads:  # e.g. a gradient penalty: an error, never a silent zero or partial second derivative
        with pytest.raises(RuntimeError, match="full_item_cross_entropy cannot be differentiated twice"):
            g.pow(2).sum().backward(retain_graph=True)
        for x in (h, w, b):  # a second grad w.r.t. one input reaches the error too (not "unused")
            with pytest.raises(RuntimeError, match="full_item_cross_entropy cannot be differentiated twice"):
                torch.autograd.grad(g.sum(), x, retain_graph=True)


# ---------------------------------------------------------------- ignored rows hold anything
POISONED = {0: float("nan"), 4: float("inf"), 8: float("-inf")}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_ignored_rows_contribute_nothing_whatever_they_hold(backend: str, reduction: str, soft: bool) -> None:
    n, v = 9, 13
    case = make_case(n, v, 8, ignore="none", seed=11)
    ignored = list(POISONED)
    if soft:
        target = random_soft_target(n, v, seed=12, ignored_rows=ignored)
        target.base[4] = 1e-5  # mass 1.3e-4: within the row-sum tolerance of 0, so ignored too
        dense = target.to_dense(v)
        dense[ignored] = 0
    else:
        target = case["target"].clone()
        target[ignored] = -100
    poisoned = dict(case, hidden=case["hidden"].clone())
    for row, value in POISONED.items():
        poisoned["hidden"][row, ::2] = value
    kw = dict(reduction=reduction, label_smoothing=0.1)
    got = run(poisoned, backend, target=target, **kw)
    want = dense_soft_loss(case, dense, **kw) if soft else run_naive(case, target=target, **kw)
    if soft and reduction == "sum":  # dense_soft_loss returns the per-row losses (and the gradients of their sum)
        want = (want[0].sum(), want[1])
    assert_close(got, want)  # finite, and the clean rows exactly as without the poisoned ones
    assert (got[1][0][ignored] == 0).all()
    if reduction == "none":
        assert (got[0][ignored] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["no-rows", "all-ignored-hard", "all-ignored-soft"])
def test_empty_and_all_ignored_batches(backend: str, reduction: str, kind: str) -> None:
    n = 0 if kind == "no-rows" else 5
    case = make_case(n, 11, 8, ignore="all", seed=13)
    case["hidden"][:, 0] = float("nan")
    target = case["target"]
    if kind != "all-ignored-hard":
        target = fastattn.SoftTarget(torch.zeros(n), torch.zeros(n + 1, dtype=torch.int64),
                                     torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    loss, grads = run(case, backend, target=target, reduction=reduction)
    assert loss.shape == ((n,) if reduction == "none" else ())
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------- top-k: one ranking rule
def integer_case(dtype: torch.dtype) -> dict:
    """Small integer embeddings: exact scores in any summation order, so many exact ties; bias
    with +inf, -inf, NaN and -0.0 entries, one hidden row NaN, exclusions with duplicates."""
    gen = torch.Generator().manual_seed(14)
    hidden = torch.randint(-2, 3, (12, 3), generator=gen).to(dtype)
    hidden[5] = float("nan")
    bias = torch.randint(-1, 2, (40,), generator=gen).to(dtype)
    bias[[3, 17]] = float("inf")
    bias[[8, 30]] = float("-inf")
    bias[[11, 25]] = float("nan")
    bias[bias == 0] = -0.0
    exclude = torch.randint(-1, 40, (12, 6), generator=gen)
    exclude[0] = torch.tensor([3, 3, 17, 0, -1, 1])
    return dict(hidden=hidden, weight=torch.randint(-2, 3, (40, 3), generator=gen).to(dtype), bias=bias,
                exclude=exclude)


@pytest.mark.parametrize("k", [1, 4, 13, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("chunks", ["one", "many"])
@pytest.mark.parametrize("topk_backend", ["torch", CPP])
def test_topk_ties_inf_and_nan_follow_the_rule(topk_backend: str, k: int, dtype: torch.dtype, chunks: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Both backends against the one reference, so they agree with each other."""
    if chunks == "many":  # ties and ±inf spread over chunks of 7 items (torch) and 7 × 3 blocks (C++)
        monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 12 * 7)
        monkeypatch.setenv("FASTATTN_CE_CHUNK_ITEMS", "7")
        monkeypatch.setenv("FASTATTN_CE_CHUNK_ROWS", "3")
    case = integer_case(dtype)
    want_scores, want_index = ranked_reference(masked_scores(case), k)
    # The case holds what it is for: rows topped by +inf, a NaN row (no eligible item), exact ties.
    assert (want_scores[:, 0] == float("inf")).any() and (want_index[5] == -1).all()
    assert k == 1 or (want_scores[:, 1:] == want_scores[:, :-1])[want_index[:, 1:] >= 0].any()
    scores, index = fastattn.topk_items(case["hidden"], case["weight"], k, bias=case["bias"],
                                        exclude=case["exclude"], backend=topk_backend)
    assert torch.equal(index, want_index)
    assert torch.equal(scores, want_scores.float())


@pytest.mark.parametrize("topk_backend", ["torch", CPP])
def test_topk_no_rows(topk_backend: str) -> None:
    scores, index = fastattn.topk_items(torch.zeros(0, 4), torch.ones(5, 4), 2, backend=topk_backend)
    assert scores.shape == index.shape == (0, 2)


# ---------------------------------------------------------------- TED teacher at small τ
SEQUENCES = [[1, 2, 3, 2, 3, 4], [0, 0, 2, 3, 5], [5, 1, 2], [3], [6, 6, 6, 1]]


@pytest.mark.parametrize("tau", [1e-3, 1e-6, 1e-300, 0.1, 3.0])
def test_ted_teacher_small_tau_matches_stable_softmax(tau: float) -> None:
    v = 7
    counts = np.zeros((v, v))
    for seq in SEQUENCES:
        for a, b in zip(seq[:-1], seq[1:]):
            if a and b:
                counts[a, b] += 1
    ratio = torch.from_numpy(counts / np.maximum(counts.max(1, keepdims=True), 1))
    expected = torch.softmax(ratio / tau, dim=1)  # torch's softmax shifts by the row max
    teacher = fastattn.ted_teacher(SEQUENCES, num_items=v, tau=tau, pad_id=0)
    dense = teacher.to_dense(v)
    assert torch.isfinite(dense).all()
    assert torch.allclose(dense, expected, atol=1e-6)
    assert torch.allclose(teacher.mass(v), torch.ones(v, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("tau", [float("nan"), 0.0, -0.5, float("inf"), "0.1", True])
def test_ted_teacher_rejects_bad_tau(tau: object) -> None:
    with pytest.raises(ValueError, match="tau must be a positive finite float"):
        fastattn.ted_teacher(SEQUENCES, num_items=7, tau=tau)  # type: ignore[arg-type]


# ---------------------------------------------------------------- small but unclear errors
def test_zero_hidden_size_names_hidden(backend: str) -> None:
    with pytest.raises(ValueError, match=r"hidden must have a hidden size D >= 1 .* got shape \(4, 0\)"):
        fastattn.full_item_cross_entropy(torch.zeros(4, 0), torch.zeros(5, 0), torch.zeros(4, dtype=torch.int64),
                                         backend=backend)


@pytest.mark.parametrize("topk_backend", ["torch", CPP])
def test_topk_zero_hidden_size_names_hidden(topk_backend: str) -> None:
    with pytest.raises(ValueError, match="hidden must have a hidden size D >= 1"):
        fastattn.topk_items(torch.zeros(4, 0), torch.zeros(5, 0), 2, backend=topk_backend)


@pytest.mark.parametrize("part", ["base", "indptr", "indices", "values"])
def test_soft_target_parts_must_be_tensors(part: str) -> None:
    parts = dict(random_soft_target(3, 5).__dict__)
    parts[part] = parts[part].tolist()
    with pytest.raises(TypeError, match=f"SoftTarget.{part} must be a torch.Tensor, got list"):
        fastattn.SoftTarget(**parts)


@pytest.mark.parametrize("rows", [-1, 20, [0, 20], torch.tensor([[3], [-2]])], ids=["-1", "V", "list", "tensor"])
def test_soft_target_rows_out_of_range(rows: object) -> None:
    st = random_soft_target(20, 50, seed=3)
    with pytest.raises(IndexError, match=r"SoftTarget.rows: row_index holds -?\d+, outside \[0, 20\)"):
        st.rows(rows)


def test_soft_target_rows_accepts_ints_and_lists() -> None:
    st = random_soft_target(20, 50, seed=3)
    dense = st.to_dense(50)
    assert torch.equal(st.rows(19).to_dense(50), dense[[19]])
    assert torch.equal(st.rows([[4, 0], [19, 4]]).to_dense(50), dense[[4, 0, 19, 4]])
    assert st.rows(torch.zeros(0, dtype=torch.int64)).num_rows == 0
    with pytest.raises(TypeError, match="row_index must hold integer row ids"):
        st.rows(torch.tensor([1.0]))
