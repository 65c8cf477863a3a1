"""Fused decoupled attention (`fastattn.dif_attention`) on every kernel backend against the
float64 torch reference: lengths, head dims, streams, cross attention, padding, low precision,
empty and fully masked rows; backend choice and bad input.

Backends: "triton" (in its interpreter here: tests/conftest.py sets TRITON_INTERPRET=1) and
"cpp" (the C++ CPU kernels). Each check runs on both; where the case lists differ, a comment
says why. Dropout: test_attention_dropout.py; a_cd: test_attention_acd.py (C++; the Triton a_cd
cases are in tests/test_acd.py); the C++ operators themselves: test_attention_cpp_ops.py.
"""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn._dispatch import triton_unavailable_reason
from fastattn.ops.attention.triton_fwd import tile_config

from attention_cases import Case, check_against_truth, make_inputs, max_err, run_fastattn, run_reference, with_grad
from backend_params import KERNEL_BACKENDS, per_backend
from cpp_required import cpp_tests_mark

CPP_ONLY = cpp_tests_mark()  # a failed build fails loudly; FASTATTN_DISABLE_CPP=1 skips

# The C++ kernels work in blocks of 64 queries x 256 keys, so lengths 257 and 300 cross their
# block boundaries; the Triton tiles (at most 128 keys) are crossed at 129 already, and the
# interpreter needs 1-2 s per such long case, so those stay C++-only.
LENGTHS = [1, 7, 50, 129]
CROSS_LENGTHS = [(7, 50), (50, 7), (129, 50), (1, 129), (66, 65)]
PADDED_LENGTHS = [(50, 50), (129, 129), (7, 50)]
# Head dims 8, 24, 50 for every stream, 0–3 extra streams; the sums hit every Triton tile class.
HEAD_DIMS = [
    (8, 8, ()),
    (24, 24, (8,)),
    (50, 50, ()),
    (8, 50, (24,)),          # Dv != Dk
    (50, 8, (8, 24)),
    (24, 24, (50, 50)),      # QK 124 -> 128-wide tiles
    (50, 24, (50, 50, 24)),  # QK 174 -> 256-wide tiles
    (32, 100, (8,)),         # V wider than QK
]


# ---------------------------------------------------------------- against the float64 truth
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend,length", per_backend({"triton": LENGTHS, "cpp": LENGTHS + [300]}))
def test_lengths(backend: str, length: int, causal: bool) -> None:
    check_against_truth(Case(lq=length, causal=causal), backend=backend)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend,dk,dv,attr_dims", per_backend({
    "triton": HEAD_DIMS,
    "cpp": HEAD_DIMS + [(200, 160, (100,))],  # wider than any Triton tile: the C++ kernels take any head dim
}))
def test_head_dims_and_streams(backend: str, dk: int, dv: int, attr_dims: tuple, causal: bool) -> None:
    check_against_truth(Case(lq=50, dk=dk, dv=dv, attr_dims=attr_dims, causal=causal), backend=backend)


# Cross attention (Lq != Lk), top-left aligned causal mask as in SDPA.
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend,lq,lk", per_backend({"triton": CROSS_LENGTHS,
                                                       "cpp": CROSS_LENGTHS + [(70, 300), (300, 70)]}))
def test_cross_lengths(backend: str, lq: int, lk: int, causal: bool) -> None:
    check_against_truth(Case(lq=lq, lk=lk, causal=causal), backend=backend)


@pytest.mark.parametrize("padding", ["left", "right", "full_row"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend,lq,lk", per_backend({"triton": PADDED_LENGTHS,
                                                       "cpp": PADDED_LENGTHS + [(257, 257)]}))
def test_key_padding(backend: str, padding: str, causal: bool, lq: int, lk: int) -> None:
    check_against_truth(Case(lq=lq, lk=lk, padding=padding, causal=causal), backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_odd_batch_heads_and_custom_scale(backend: str) -> None:
    check_against_truth(Case(b=3, h=3, lq=50, dk=24, attr_dims=(8, 8), scale=0.37), backend=backend)
    check_against_truth(Case(b=1, h=1, lq=129, dk=8, attr_dims=()), backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [
    Case(lq=50, dk=24, attr_dims=(8,)),
    Case(lq=129, dk=50, dv=24, attr_dims=(8, 24), padding="left"),
    Case(lq=7, lk=50, causal=False, padding="full_row"),
], ids=["self", "wide-padded", "cross-fullpad"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_low_precision_error_bound(backend: str, dtype: torch.dtype, case: Case) -> None:
    check_against_truth(case, dtype, backend=backend)


@CPP_ONLY
def test_cpp_float64_matches_the_reference_tightly() -> None:
    # float64 inputs run on the C++ kernels only (Triton: test_triton_explicit_backend_raises_with_reason).
    case = Case(lq=129, lk=300, causal=True, padding="left", n_domains=2)
    inputs = make_inputs(case, torch.float64)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk, dtype=torch.float64)
    grad_acd = torch.randn(case.b, case.h, case.lq, dtype=torch.float64)
    out, acd, grads = run_fastattn(case, with_grad(inputs), "cpp", grad_out, grad_acd)
    ref_out, ref_acd, ref_grads = run_reference(case, inputs, grad_out, grad_acd)
    assert out.dtype == torch.float64 and acd.dtype == torch.float32  # acd is float32 by contract
    assert max_err(out, ref_out) < 1e-12
    assert max_err(acd, ref_acd) < 1e-6
    # run_fastattn's loss goes through out.float() and the float32 acd: fp32-level gradients.
    assert all(max_err(g, r) < 1e-6 * max(1.0, r.abs().max().item()) for g, r in zip(grads, ref_grads))


# ---------------------------------------------------------------- masked, empty and odd inputs
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rows_without_visible_key_are_zero_with_zero_grads(backend: str) -> None:
    # Causal cross attention where the first queries see only padded keys, and one batch row
    # whose keys are all padding: out = 0 there, every gradient finite and zero for those rows.
    case = Case(b=2, lq=9, lk=9, padding="full_row", causal=True)
    inputs = with_grad(make_inputs(case))
    inputs["key_padding_mask"][1, :4] = True
    grad_out = torch.ones(case.b, case.h, case.lq, case.dk)
    out, _, grads = run_fastattn(case, inputs, backend, grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[0] == 0).all() and (out[1, :, :4] == 0).all()
    dq, dk, dv = grads[:3]
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (dq[1, :, :4] == 0).all()  # queries with nothing visible get no gradient


@pytest.mark.parametrize("lq,lk", [(0, 5), (5, 0), (0, 0)])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_sequences(backend: str, lq: int, lk: int) -> None:
    case = Case(lq=lq, lk=lk, causal=False, n_domains=2)
    inputs = with_grad(make_inputs(case))
    out, acd, grads = run_fastattn(case, inputs, backend, torch.ones(2, 2, lq, 24), torch.ones(2, 2, lq))
    assert out.shape == (2, 2, lq, 24) and acd.shape == (2, 2, lq)
    assert (out == 0).all() and (acd == 0).all() and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradients_only_where_required(backend: str) -> None:
    case = Case(lq=7)
    inputs = make_inputs(case)
    inputs["v"].requires_grad_(True)
    inputs["attr_k"][0].requires_grad_(True)
    out = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], inputs["attr_q"], inputs["attr_k"],
                                 backend=backend)
    out.sum().backward()
    assert inputs["q"].grad is None and inputs["attr_q"][0].grad is None
    assert inputs["v"].grad is not None and inputs["attr_k"][0].grad is not None
    _, _, ref_grads = run_reference(case, make_inputs(case), torch.ones_like(out))
    assert max_err(inputs["v"].grad, ref_grads[2]) < 1e-4
    assert max_err(inputs["attr_k"][0].grad, ref_grads[4]) < 1e-4


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend: str) -> None:
    # (B, L, H, D) tensors transposed to (B, H, L, D), as produced by a linear projection.
    case = Case(b=2, h=3, lq=50, dk=24)
    inputs = make_inputs(case)
    for key in ("q", "k", "v"):
        inputs[key] = inputs[key].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[key].is_contiguous()
    grad_out = torch.randn(2, 3, 50, 24)
    out, _, grads = run_fastattn(case, with_grad(inputs), backend, grad_out)
    ref_out, _, ref_grads = run_reference(case, inputs, grad_out)
    assert max_err(out, ref_out) < 1e-5
    assert all(max_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))


def test_triton_backward_is_deterministic() -> None:
    case = Case(lq=129, padding="left")
    inputs = make_inputs(case)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk)
    _, _, g1 = run_fastattn(case, with_grad(inputs), "triton", grad_out)
    _, _, g2 = run_fastattn(case, with_grad(inputs), "triton", grad_out)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@CPP_ONLY
def test_cpp_deterministic_and_independent_of_thread_count() -> None:
    # Every work item owns the rows it writes (no atomics), so even the thread count cannot
    # change a bit of the result.
    case = Case(b=3, lq=300, padding="left", n_domains=2)
    inputs = make_inputs(case)
    grad_out = torch.randn(case.b, case.h, case.lq, case.dk)
    grad_acd = torch.randn(case.b, case.h, case.lq)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            runs.append(run_fastattn(case, with_grad(inputs), "cpp", grad_out, grad_acd))
    finally:
        torch.set_num_threads(threads)
    (o1, a1, g1), *others = runs
    for o, a, g in others:
        assert torch.equal(o, o1) and torch.equal(a, a1) and all(torch.equal(x, y) for x, y in zip(g, g1))


# ---------------------------------------------------------------- backend choice
def test_auto_on_cpu_matches_the_reference() -> None:
    case = Case(lq=50, padding="left")
    inputs = make_inputs(case)
    out = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], inputs["attr_q"], inputs["attr_k"],
                                 key_padding_mask=inputs["key_padding_mask"])
    ref_out, _, _ = run_reference(case, inputs, torch.zeros(case.b, case.h, case.lq, case.dk))
    assert max_err(out, ref_out) < 1e-5


@CPP_ONLY
def test_cpp_auto_on_cpu_uses_the_cpp_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastattn.ops.attention.cpp as cpp

    calls = []  # the body of the stream-list kernels' operator and of its eager twin
    monkeypatch.setattr(cpp, "_streams_forward", lambda *a, _f=cpp._streams_forward: calls.append(1) or _f(*a))
    inputs = make_inputs(Case(lq=7))
    fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"])
    assert calls


def test_float64_runs_on_torch_backend() -> None:
    case = Case(lq=7)
    inputs = make_inputs(case, torch.float64)
    out = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], inputs["attr_q"], inputs["attr_k"],
                                 backend="torch")
    assert out.dtype == torch.float64


def test_triton_explicit_backend_raises_with_reason() -> None:
    inputs = make_inputs(Case(lq=7), torch.float64)
    with pytest.raises(fastattn.BackendUnavailable, match="float64"):
        fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], backend="triton")
    wide = make_inputs(Case(lq=7, dk=200, attr_dims=(100,)))
    with pytest.raises(fastattn.BackendUnavailable, match="head dim"):
        fastattn.dif_attention(wide["q"], wide["k"], wide["v"], wide["attr_q"], wide["attr_k"], backend="triton")
    wide_v = make_inputs(Case(lq=7, dk=16, dv=129))
    with pytest.raises(fastattn.BackendUnavailable, match="V head dim <= 128"):
        fastattn.dif_attention(wide_v["q"], wide_v["k"], wide_v["v"], backend="triton")


def test_triton_needs_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton_unavailable_reason([torch.zeros(1)])
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "CUDA" in reason


def test_triton_tile_config_limits() -> None:
    assert tile_config(40, 32).block_dqk == 64
    assert tile_config(176, 64).block_dqk == 256
    with pytest.raises(ValueError, match="head dim"):
        tile_config(257, 64)
    with pytest.raises(ValueError, match="head dim"):
        tile_config(64, 129)


# ---------------------------------------------------------------- bad input
def _args(**over: object) -> dict:
    inputs = make_inputs(Case(lq=7, lk=9, causal=False))
    kwargs = dict(q=inputs["q"], k=inputs["k"], v=inputs["v"], attr_q=inputs["attr_q"], attr_k=inputs["attr_k"])
    kwargs.update(over)
    return kwargs


BAD_INPUTS = [
    (dict(q=torch.randn(2, 7, 24)), ValueError, r"q must have shape \(B, H, L, D\)"),
    (dict(k=[1, 2]), TypeError, "k must be a torch.Tensor"),
    (dict(k=torch.randn(2, 2, 9, 23)), ValueError, "k must have shape"),
    (dict(v=torch.randn(2, 2, 8, 24)), ValueError, "v must have shape"),
    (dict(v=torch.randn(2, 2, 9, 24, dtype=torch.float64)), TypeError, "v has dtype"),
    (dict(q=torch.randint(0, 3, (2, 2, 7, 24))), TypeError, "q must be float32"),
    (dict(attr_q=[torch.randn(2, 2, 7, 8)], attr_k=[]), ValueError, "attr_q and attr_k must have the same length"),
    (dict(attr_q=[torch.randn(2, 2, 6, 8)], attr_k=[torch.randn(2, 2, 9, 8)]), ValueError, r"attr_q\[0\] must have shape"),
    (dict(attr_q=[torch.randn(2, 2, 7, 8)], attr_k=[torch.randn(2, 2, 9, 5)]), ValueError, r"attr_k\[0\] must have shape"),
    (dict(attr_q=torch.randn(2, 2, 7, 8), attr_k=torch.randn(2, 2, 9, 8)), TypeError, "sequences of tensors"),
    (dict(key_padding_mask=torch.zeros(2, 7, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.zeros(2, 9)), TypeError, "key_padding_mask must be torch.bool"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be a float in"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be a float in"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite float"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(v=torch.randn(2, 2, 9, 24, device="meta")), ValueError, "v is on meta"),
]


@pytest.mark.parametrize("over,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(over: dict, exc: type, match: str) -> None:
    kwargs = _args(**over)
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    attr_q, attr_k = kwargs.pop("attr_q"), kwargs.pop("attr_k")
    with pytest.raises(exc, match=match):
        fastattn.dif_attention(q, k, v, attr_q, attr_k, causal=False, **kwargs)
