"""Fused decoupled attention of the C++ CPU kernels (backend="cpp") against the float64 reference.

The same checks as the Triton tests (test_attention.py, test_acd.py), plus what only the C++
kernels do: float64 inputs (gradcheck), head dims beyond the Triton tiles, thread-count
independence, and the operator contracts (torch.library.opcheck). The block sizes of
csrc/attention.cpp are 64 queries × 256 keys, so lengths 257 and 300 cross block boundaries.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn.ops.attention.function import DIFAttentionFunction
from fastattn.ops.attention.options import AttentionOptions

from attention_cases import (Case, check_dropout_own_mask, check_dropout_reproducible, check_keep_statistics, check_acd, check_against_truth, make_inputs, max_err, run_fastattn,
                             run_reference, with_grad)

from cpp_required import cpp_tests_mark

pytestmark = cpp_tests_mark()
from fastattn.ops.attention.cpp import CppAttentionKernels, cpp_dropout_keep_mask, cpp_dropout_keep_rows  # noqa: E402


# ---------------------------------------------------------------- against the float64 truth
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [1, 7, 50, 129, 300])
def test_lengths(length: int, causal: bool) -> None:
    check_against_truth(Case(lq=length, causal=causal), backend="cpp")


@pytest.mark.parametrize("dk,dv,attr_dims", [
    (8, 8, ()),
    (24, 24, (8,)),
    (50, 50, ()),
    (8, 50, (24,)),
    (50, 8, (8, 24)),
    (50, 24, (50, 50, 24)),
    (200, 160, (100,)),      # wider than any Triton tile: the C++ kernels take any head dim
])
@pytest.mark.parametrize("causal", [True, False])
def test_head_dims_and_streams(dk: int, dv: int, attr_dims: tuple, causal: bool) -> None:
    check_against_truth(Case(lq=50, dk=dk, dv=dv, attr_dims=attr_dims, causal=causal), backend="cpp")


@pytest.mark.parametrize("lq,lk", [(7, 50), (50, 7), (129, 50), (1, 129), (66, 65), (70, 300), (300, 70)])
@pytest.mark.parametrize("causal", [True, False])
def test_cross_lengths(lq: int, lk: int, causal: bool) -> None:
    check_against_truth(Case(lq=lq, lk=lk, causal=causal), backend="cpp")


@pytest.mark.parametrize("padding", ["left", "right", "full_row"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk", [(50, 50), (129, 129), (7, 50), (257, 257)])
def test_key_padding(padding: str, causal: bool, lq: int, lk: int) -> None:
    check_against_truth(Case(lq=lq, lk=lk, padding=padding, causal=causal), backend="cpp")


def test_odd_batch_heads_and_custom_scale() -> None:
    check_against_truth(Case(b=3, h=3, lq=50, dk=24, attr_dims=(8, 8), scale=0.37), backend="cpp")
    check_against_truth(Case(b=1, h=1, lq=129, dk=8, attr_dims=()), backend="cpp")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [
    Case(lq=50, dk=24, attr_dims=(8,)),
    Case(lq=129, dk=50, dv=24, attr_dims=(8, 24), padding="left"),
    Case(lq=7, lk=50, causal=False, padding="full_row"),
], ids=["self", "wide-padded", "cross-fullpad"])
def test_low_precision_error_bound(dtype: torch.dtype, case: Case) -> None:
    check_against_truth(case, dtype, backend="cpp")


def test_float64_matches_the_reference_tightly() -> None:
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


def test_rows_without_visible_key_are_zero_with_zero_grads() -> None:
    case = Case(b=2, lq=9, lk=9, padding="full_row", causal=True)
    inputs = with_grad(make_inputs(case))
    inputs["key_padding_mask"][1, :4] = True
    grad_out = torch.ones(case.b, case.h, case.lq, case.dk)
    out, _, grads = run_fastattn(case, inputs, "cpp", grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[0] == 0).all() and (out[1, :, :4] == 0).all()
    dq, dk, dv = grads[:3]
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (dq[1, :, :4] == 0).all()


@pytest.mark.parametrize("lq,lk", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences(lq: int, lk: int) -> None:
    case = Case(lq=lq, lk=lk, causal=False, n_domains=2)
    inputs = with_grad(make_inputs(case))
    out, acd, grads = run_fastattn(case, inputs, "cpp", torch.ones(2, 2, lq, 24), torch.ones(2, 2, lq))
    assert out.shape == (2, 2, lq, 24) and acd.shape == (2, 2, lq)
    assert (out == 0).all() and (acd == 0).all() and all((g == 0).all() for g in grads)


def test_non_contiguous_inputs() -> None:
    case = Case(b=2, h=3, lq=50, dk=24)
    inputs = make_inputs(case)
    for key in ("q", "k", "v"):
        inputs[key] = inputs[key].transpose(1, 2).contiguous().transpose(1, 2)
    grad_out = torch.randn(2, 3, 50, 24)
    out, _, grads = run_fastattn(case, with_grad(inputs), "cpp", grad_out)
    ref_out, _, ref_grads = run_reference(case, inputs, grad_out)
    assert max_err(out, ref_out) < 1e-5
    assert all(max_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))


def test_deterministic_and_independent_of_thread_count() -> None:
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


def test_auto_on_cpu_uses_the_cpp_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(CppAttentionKernels, "forward",
                        staticmethod(lambda *a, _f=CppAttentionKernels.forward: calls.append(1) or _f(*a)))
    inputs = make_inputs(Case(lq=7))
    fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"])
    assert calls


# ---------------------------------------------------------------- dropout
DROPOUT_CASES = [
    Case(lq=50, dropout_p=0.3),
    Case(lq=129, lk=300, causal=False, padding="left", dropout_p=0.1, attr_dims=(8, 24)),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=["self", "cross-padded"])
def test_dropout_matches_reference_with_kernel_mask(case: Case) -> None:
    check_dropout_own_mask(case, "cpp")


def test_dropout_reproducible_with_torch_manual_seed() -> None:
    check_dropout_reproducible(DROPOUT_CASES[0], "cpp")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(p: float) -> None:
    check_keep_statistics("cpp", p)


@pytest.mark.parametrize("seed,p,shape", [
    (0, 0.1, (2, 3, 70, 90)),
    (12345, 0.5, (1, 2, 129, 7)),
    (2**30 - 1, 0.3, (3, 1, 5, 300)),
    (1, 0.3, (2, 3, 9, 6)),  # seeds 1 and 2 (adjacent) and 4 (< B·H apart): see test_dropout_rng.py
    (2, 0.3, (2, 3, 9, 6)),
    (4, 0.3, (2, 3, 9, 6)),
    (2**62 + 2**33 + 5, 0.2, (2, 2, 3, 257)),  # both key words non-zero; Lk crosses a C++ key block
])
def test_dropout_mask_equals_triton(seed: int, p: float, shape: tuple) -> None:
    # Both backends run Philox-4x32-10 on the same key and counters (Triton in its interpreter here).
    from fastattn.ops.attention.triton_fwd import dropout_keep_mask

    cpp = cpp_dropout_keep_mask(seed, p, *shape)
    triton = dropout_keep_mask(seed, p, *shape, torch.device("cpu"))
    assert cpp.dtype == torch.bool and torch.equal(cpp, triton)


@pytest.mark.parametrize("lk,first_row", [
    (1001, 2**32 + 7),      # counter R·⌈Lk/4⌉ + j/4 ≈ 2**40: high counter word in use
    (6, 3 * 2**31 - 1),    # the flat element index crosses 2**32 inside the window
])
def test_dropout_rows_beyond_2_pow_32_equal_triton(lk: int, first_row: int) -> None:
    # A window of a call far too large to allocate (B·H·Lq·Lk > 2**32): both backends agree there.
    from fastattn.ops.attention.triton_fwd import dropout_keep_rows

    cpp = cpp_dropout_keep_rows(2**40 + 3, 0.25, lk, first_row, 3)
    triton = dropout_keep_rows(2**40 + 3, 0.25, lk, first_row, 3, torch.device("cpu"))
    assert cpp.shape == (3, lk) and torch.equal(cpp, triton)


def test_dropout_output_is_unbiased() -> None:
    case = Case(b=1, h=1, lq=16, dk=8, attr_dims=(), dropout_p=0.5)
    inputs = make_inputs(case)
    no_drop = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], backend="cpp")
    runs = torch.stack([fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], dropout_p=0.5, backend="cpp")
                        for _ in range(400)])
    spread = runs.std(0) / math.sqrt(len(runs))
    assert ((runs.mean(0) - no_drop).abs() <= 5 * spread + 1e-6).all()


# ---------------------------------------------------------------- a_cd
@pytest.mark.parametrize("which", ["out", "acd", "both"])
@pytest.mark.parametrize("n_domains", [1, 2, 5])
@pytest.mark.parametrize("length", [7, 50, 129, 300])
def test_acd_and_gradients(length: int, n_domains: int, which: str) -> None:
    acd = check_acd(Case(lq=length, n_domains=n_domains, attr_dims=(8, 24)), which, backend="cpp")
    if n_domains == 1:
        assert (acd == 0).all()


@pytest.mark.parametrize("which", ["acd", "both"])
@pytest.mark.parametrize("case", [
    Case(lq=50, padding="left", n_domains=2),
    Case(lq=50, padding="full_row", n_domains=3, causal=False),
    Case(lq=7, lk=50, n_domains=2, causal=False, padding="right"),
    Case(lq=129, lk=300, n_domains=5, causal=True),
    Case(lq=50, dk=50, dv=8, attr_dims=(50, 50), n_domains=2),
    Case(b=3, h=1, lq=1, n_domains=2),
], ids=["left-pad", "full-row", "cross", "cross-causal", "wide", "L1"])
def test_acd_with_every_option(case: Case, which: str) -> None:
    check_acd(case, which, backend="cpp")


@pytest.mark.parametrize("which", ["acd", "both"])
def test_acd_with_dropout_uses_probabilities_before_dropout(which: str) -> None:
    check_acd(Case(lq=300, n_domains=2, dropout_p=0.3, padding="left"), which, backend="cpp")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_acd_low_precision(dtype: torch.dtype) -> None:
    check_acd(Case(lq=50, n_domains=2, padding="left"), "both", dtype, backend="cpp")


# ---------------------------------------------------------------- gradcheck and opcheck
def _function(opts: AttentionOptions, pad: torch.Tensor | None, domains: tuple | None, dropout_seed: int | None):
    """out (and acd) of the autograd Function with the C++ kernels, as a function of the streams."""
    def fn(*streams: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if dropout_seed is not None:
            torch.manual_seed(dropout_seed)  # the same mask on every gradcheck evaluation
        out, acd = DIFAttentionFunction.apply(CppAttentionKernels, opts, pad, domains, *streams)
        return (out,) if acd is None else (out, acd)
    return fn


@pytest.mark.parametrize("causal,padding,n_domains,dropout_p", [
    (True, None, 0, 0.0),
    (False, "left", 0, 0.0),
    (True, "full_row", 2, 0.0),
    (False, None, 3, 0.0),
    (True, "right", 2, 0.3),
], ids=["causal", "padded", "fullrow-domains", "domains", "dropout-domains"])
def test_gradcheck_float64(causal: bool, padding: str | None, n_domains: int, dropout_p: float) -> None:
    case = Case(b=2, h=2, lq=5, lk=6, dk=4, attr_dims=(3,), causal=causal, padding=padding, n_domains=n_domains)
    inputs = with_grad(make_inputs(case, torch.float64))
    domains = inputs["domains"]
    opts = AttentionOptions(scale=0.5, causal=causal, dropout_p=dropout_p)
    fn = _function(opts, inputs["key_padding_mask"], domains, 11 if dropout_p else None)
    streams = (inputs["q"], inputs["k"], inputs["v"], *inputs["attr_q"], *inputs["attr_k"])
    # fast_mode checks random projections of the Jacobian: the full one costs ~200 evaluations.
    assert torch.autograd.gradcheck(fn, streams, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=n_domains != 2)


def _op_samples() -> list[tuple]:
    gen = torch.Generator().manual_seed(3)
    b, h, lq, lk, dqk, dv = 2, 2, 7, 9, 12, 5
    q, k, v = (torch.randn(*s, generator=gen) for s in ((b, h, lq, dqk), (b, h, lk, dqk), (b, h, lk, dv)))
    pad = torch.zeros(b, lk, dtype=torch.bool)
    pad[0, :3] = True
    dom_q, dom_k = torch.randint(0, 2, (b, lq), generator=gen), torch.randint(0, 2, (b, lk), generator=gen)
    return [
        (q, k, v, None, None, None, 0.3, True, 0.0, 0),
        (q, k, v, pad, dom_q, dom_k, 0.3, False, 0.2, 5),
        (q.double(), k.double(), v.double(), pad, None, None, 0.3, True, 0.0, 0),
        (q.half(), k.half(), v.half(), None, dom_q, dom_k, 0.3, True, 0.1, 7),
    ]


@pytest.mark.parametrize("idx", range(4))
def test_opcheck_attn_fwd_and_bwd(idx: int) -> None:
    args = _op_samples()[idx]
    q, k, v, pad, dom_q, dom_k, scale, causal, p, seed = args
    torch.library.opcheck(torch.ops.fastattn.attn_fwd.default, args)
    out, lse, acd = torch.ops.fastattn.attn_fwd(*args)
    dout = torch.randn_like(out)
    delta = (dout.double() * out.double()).sum(-1).to(lse.dtype)
    grad_acd = torch.randn_like(lse) if dom_q is not None else None
    torch.library.opcheck(torch.ops.fastattn.attn_bwd.default,
                          (q, k, v, dout, lse, delta, grad_acd, pad, dom_q, dom_k, scale, causal, p, seed))


def test_opcheck_attn_dropout_rows() -> None:
    torch.library.opcheck(torch.ops.fastattn.attn_dropout_rows.default, (3, 0.25, 7, 2**33, 5))


BAD_OP_ARGS = [
    (dict(q=torch.randn(2, 7, 12)), r"q must have shape \(B, H, Lq, DQK\)"),
    (dict(k=torch.randn(2, 2, 9, 11)), "k must have shape"),
    (dict(v=torch.randn(2, 2, 8, 5)), "v must have shape"),
    (dict(v=torch.randn(2, 2, 9, 5).double()), "k and v must have q's dtype"),
    (dict(q=torch.zeros(2, 2, 7, 12, dtype=torch.int64)), "q must be float32"),
    (dict(key_padding_mask=torch.zeros(2, 9)), "key_padding_mask must be bool"),
    (dict(key_padding_mask=torch.zeros(2, 7, dtype=torch.bool)), "key_padding_mask must have shape"),
    (dict(dom_q=torch.zeros(2, 7, dtype=torch.int64)), "dom_q and dom_k must be given together"),
    (dict(dom_q=torch.zeros(2, 7), dom_k=torch.zeros(2, 9)), "dom_q must be int64"),
    (dict(dom_q=torch.zeros(2, 7, dtype=torch.int64), dom_k=torch.zeros(2, 8, dtype=torch.int64)),
     r"dom_k must have shape \(B=2, L=9\)"),
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
]


@pytest.mark.parametrize("over,match", BAD_OP_ARGS, ids=[m for _, m in BAD_OP_ARGS])
def test_bad_op_input_names_the_argument(over: dict, match: str) -> None:
    args = dict(q=torch.randn(2, 2, 7, 12), k=torch.randn(2, 2, 9, 12), v=torch.randn(2, 2, 9, 5),
                key_padding_mask=None, dom_q=None, dom_k=None, scale=0.3, causal=True, dropout_p=0.0, seed=0)
    args.update(over)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastattn.attn_fwd(*args.values())


def test_bad_bwd_input_names_the_argument() -> None:
    q, k, v = torch.randn(2, 2, 7, 12), torch.randn(2, 2, 9, 12), torch.randn(2, 2, 9, 5)
    out, lse, _ = torch.ops.fastattn.attn_fwd(q, k, v, None, None, None, 0.3, True, 0.0, 0)
    rest = (None, None, None, 0.3, True, 0.0, 0)
    with pytest.raises(RuntimeError, match="dout must have shape"):
        torch.ops.fastattn.attn_bwd(q, k, v, out[..., :4], lse, lse, None, *rest)
    with pytest.raises(RuntimeError, match="delta must have shape"):
        torch.ops.fastattn.attn_bwd(q, k, v, out, lse, lse[..., :3], None, *rest)
    with pytest.raises(RuntimeError, match="attn_dropout_rows: dropout_p"):
        torch.ops.fastattn.attn_dropout_rows(0, -0.5, 2, 0, 2)
    with pytest.raises(RuntimeError, match="attn_dropout_rows: lk, first_row and num_rows"):
        torch.ops.fastattn.attn_dropout_rows(0, 0.5, 2, -1, 2)


def test_unavailable_extension_raises_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastattn.ops.attention.cpp as cpp_module

    monkeypatch.setattr(cpp_module, "cpp_unavailable_reason", lambda: "no compiler (test)")
    with pytest.raises(RuntimeError, match="no compiler"):
        cpp_module.cpp_dropout_keep_mask(0, 0.1, 1, 1, 2, 2)
