"""Issue 15, attention: strided arguments on every backend, double backward, bad flags and empty input.

Every tensor argument of `fastattn.dif_attention` (q, k, v, attr_q[i], attr_k[i],
key_padding_mask, domains, and the incoming gradients dout, grad_acd) is given transposed,
sliced with a step, or expanded (stride 0), forward and backward, on backends "torch", "cpp" and
"triton" (interpreter), against the float64 reference run on contiguous copies.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import fastattn
from fastattn import nn as fnn

from attention_cases import FP32_TOL, Case, make_inputs, max_err, run_reference

BACKENDS = ("torch", "cpp", "triton")


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """Same values, last two dims swapped in memory (a (B, L) mask gets key stride B: `(tokens == 0).T`)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _stepped(t: torch.Tensor) -> torch.Tensor:
    """Same values, every dim sliced with step 2 out of a buffer twice as large in each dim."""
    big = t.new_zeros([2 * s for s in t.shape])
    view = big[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def _expanded(t: torch.Tensor) -> torch.Tensor:
    """Stride 0 in the batch dim (and, for 4-D streams, in the head dim): batch row 0's values everywhere."""
    if t.dim() == 4:
        return t[:1, :, :, :1].expand_as(t)
    return t[:1].expand_as(t)


def _expanded_along_sequence(t: torch.Tensor) -> torch.Tensor:
    """Stride 0 along the sequence (a mask's key axis, a stream's L): position 0's values everywhere."""
    return t[:, :1].expand_as(t) if t.dim() == 2 else t[:, :, :1].expand_as(t)


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "transposed": _transposed, "stepped": _stepped, "expanded": _expanded, "expanded_seq": _expanded_along_sequence}


def _strided_inputs(case: Case, dtype: torch.dtype, layout: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """make_inputs(case) plus a random padding mask (row 0 partly padded), every tensor restrided,
    and dout, grad_acd restrided the same way."""
    inputs = make_inputs(case, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(case.b, case.keys, generator=gen) < 0.3
    # Batch row 0 (the one "expanded" copies) partly padded; key 0 (the one "expanded_seq" copies)
    # padding in row 0 only, so that layout has one fully padded and one unpadded row.
    mask[0, :2], mask[0, 2:4], mask[1:, 0] = True, False, False
    inputs["key_padding_mask"] = mask
    dout = torch.randn(case.b, case.h, case.lq, case.dv or case.dk, generator=gen).to(dtype)
    grad_acd = torch.randn(case.b, case.h, case.lq, generator=gen)
    f = LAYOUTS[layout]
    for key in ("q", "k", "v", "key_padding_mask"):
        inputs[key] = f(inputs[key])
    inputs["attr_q"] = [f(t) for t in inputs["attr_q"]]
    inputs["attr_k"] = [f(t) for t in inputs["attr_k"]]
    dom = inputs["domains"]
    inputs["domains"] = f(dom) if isinstance(dom, torch.Tensor) else (f(dom[0]), f(dom[1]))
    return inputs, f(dout), f(grad_acd)


def _contiguous(inputs: dict) -> dict:
    """The reference's copy of `inputs`: same values, contiguous."""
    dom = inputs["domains"]
    return dict(inputs, q=inputs["q"].contiguous(), k=inputs["k"].contiguous(), v=inputs["v"].contiguous(),
                attr_q=[t.contiguous() for t in inputs["attr_q"]], attr_k=[t.contiguous() for t in inputs["attr_k"]],
                key_padding_mask=inputs["key_padding_mask"].contiguous(),
                domains=dom.contiguous() if isinstance(dom, torch.Tensor) else tuple(d.contiguous() for d in dom))


STRIDED_CASES = {
    # self attention with one (B, L) domain tensor, causal; cross attention with a domain pair
    "self": Case(b=2, h=2, lq=6, dk=4, dv=3, attr_dims=(3, 5), causal=True, n_domains=2),
    "cross": Case(b=2, h=2, lq=5, lk=6, dk=4, dv=3, attr_dims=(3, 5), causal=False, n_domains=2),
}


@pytest.mark.parametrize("case_name", list(STRIDED_CASES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_argument_strided_matches_float64(backend: str, layout: str, case_name: str) -> None:
    case = STRIDED_CASES[case_name]
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs, dout, grad_acd = _strided_inputs(case, dtype, layout)
    assert not inputs["key_padding_mask"].is_contiguous() and not dout.is_contiguous()
    leaves = [inputs["q"], inputs["k"], inputs["v"], *inputs["attr_q"], *inputs["attr_k"]]
    for t in leaves:
        assert not t.is_contiguous()
        t.requires_grad_(True)
    out, acd = fastattn.dif_attention(
        inputs["q"], inputs["k"], inputs["v"], inputs["attr_q"], inputs["attr_k"], causal=case.causal,
        key_padding_mask=inputs["key_padding_mask"], domains=inputs["domains"], backend=backend)
    # dout and grad_acd reach the backward as given (strided), not as a product's fresh gradient.
    grads = torch.autograd.grad((out, acd), leaves, (dout, grad_acd))
    ref_out, ref_acd, ref_grads = run_reference(case, _contiguous(inputs), dout.contiguous(), grad_acd.contiguous())
    tol = FP32_TOL if dtype == torch.float32 else 1e-10
    # acd is returned as float32 on every backend (its documented dtype): one float32 rounding of values <= 1.
    assert acd.dtype == torch.float32 and max_err(acd, ref_acd) <= max(tol, 1e-7), f"acd: {max_err(acd, ref_acd):.2e}"
    for name, got, truth in zip(["out", "q", "k", "v", "aq0", "aq1", "ak0", "ak1"], [out, *grads], [ref_out, *ref_grads]):
        assert got.shape == truth.shape and torch.isfinite(got).all(), name
        assert max_err(got, truth) <= tol * max(1.0, truth.abs().max().item()), f"{name}: {max_err(got, truth):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_multihead_attention_sequence_first_transposed_mask(backend: str) -> None:
    # The realistic case: sequence-first tokens (L, N), padding mask (tokens == 0).T has key stride N.
    length, n, e, heads = 6, 3, 16, 2
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(e, heads, dtype=torch.float64).eval()
    tokens = torch.tensor([[0, 5, 0], [0, 3, 2], [4, 0, 7], [1, 2, 3], [9, 9, 0], [2, 0, 1]])
    padding = (tokens == 0).T
    assert padding.stride() == (1, n)
    x = torch.randn(length, n, e, dtype=torch.float64)
    causal = ~torch.ones(length, length, dtype=torch.bool).tril()
    expected, _ = ref(x, x, x, key_padding_mask=padding.contiguous(), attn_mask=causal, need_weights=False)
    dtype = torch.float32 if backend == "triton" else torch.float64
    ours = fnn.MultiheadAttention.from_torch(ref.to(dtype), backend=backend)
    got, _ = ours(x.to(dtype), x.to(dtype), x.to(dtype), key_padding_mask=padding, attn_mask=causal,
                  need_weights=False)
    defined = torch.isfinite(expected)  # torch gives NaN where a query sees no key; fastattn gives out_proj.bias
    assert torch.isfinite(got).all() and defined.any()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double()[defined], expected[defined], atol=tol, rtol=tol)


# ---------------------------------------------------------------- double backward
def _small(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(5)
    q, k, v, aq, ak = (torch.randn(2, 2, 4, d, generator=gen, dtype=dtype).requires_grad_() for d in (3, 3, 3, 2, 2))
    return q, k, v, aq, ak


@pytest.mark.parametrize("loss_kind", ["square", "sum"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_double_backward_on_a_fused_backend_raises(backend: str, loss_kind: str) -> None:
    # Before: the second derivative came back as zeros (float64, cpp: 0.0 where torch gives 195.2).
    q, k, v, aq, ak = _small(torch.float32 if backend == "triton" else torch.float64)
    mask = torch.tensor([[False, False, True, False], [True, False, False, False]])

    def loss() -> torch.Tensor:
        out = fastattn.dif_attention(q, k, v, (aq,), (ak,), key_padding_mask=mask, backend=backend)
        return (out ** 2).sum() if loss_kind == "square" else out.sum()

    first, = torch.autograd.grad(loss(), q)
    dq, = torch.autograd.grad(loss(), q, create_graph=True)
    torch.testing.assert_close(dq.detach(), first, atol=0, rtol=0)  # create_graph leaves the first derivative as is
    match = rf"dif_attention with backend='{backend}' cannot be differentiated twice.*backend='torch'"
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad(dq.sum(), k)
    with pytest.raises(RuntimeError, match=match):
        dq.sum().backward()


def test_double_backward_on_a_fused_backend_with_acd_raises() -> None:
    q, k, v, aq, ak = _small(torch.float64)
    domains = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    _, acd = fastattn.dif_attention(q, k, v, (aq,), (ak,), domains=domains, backend="cpp")
    dk, = torch.autograd.grad(acd.sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(dk.sum(), v, allow_unused=True)


def test_torch_backend_second_derivative_passes_gradgradcheck() -> None:
    # (acd is left out: it is returned as float32, too coarse for finite differences.)
    q, k, v, aq, ak = _small(torch.float64)
    mask = torch.tensor([[False, False, True, False], [True, False, False, False]])

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, aq: torch.Tensor, ak: torch.Tensor) -> torch.Tensor:
        return fastattn.dif_attention(q, k, v, (aq,), (ak,), key_padding_mask=mask, backend="torch")

    assert torch.autograd.gradgradcheck(fn, (q, k, v, aq, ak), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- bad flags
def _streams(dk: int = 4, dv: int = 4, da: int = 2) -> dict:
    return dict(q=torch.randn(2, 2, 5, dk), k=torch.randn(2, 2, 5, dk), v=torch.randn(2, 2, 5, dv),
                attr_q=(torch.randn(2, 2, 5, da),), attr_k=(torch.randn(2, 2, 5, da),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,match", [
    (dict(dk=0), r"q has head dim D = 0"),
    (dict(dv=0), r"v has head dim D = 0"),
    (dict(da=0), r"attr_q\[0\] has head dim D = 0"),
])
def test_zero_head_dim_is_rejected_naming_the_argument(backend: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fastattn.dif_attention(**_streams(**kwargs), backend=backend)


@pytest.mark.parametrize("causal", ["no", 1, None, torch.tensor(True)])
def test_causal_must_be_a_bool(causal: object) -> None:
    with pytest.raises(TypeError, match="causal must be a bool"):
        fastattn.dif_attention(**_streams(), causal=causal)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="causal must be a bool"):
        fnn.DIFAttention(8, 2, causal=causal)  # type: ignore[arg-type]


def test_integer_padding_masks_are_rejected_as_torch_does() -> None:
    # torch 2.13's MultiheadAttention (and scaled_dot_product_attention) accept bool and float masks
    # only; fastattn matches it and says how to convert (nonzero may mean padding or token).
    mask = torch.zeros(2, 5, dtype=torch.uint8)
    mask[0, :2] = 1
    with pytest.raises(TypeError, match=r"key_padding_mask must be torch.bool .*mask\.bool\(\)"):
        fastattn.dif_attention(**_streams(), key_padding_mask=mask)
    x = torch.randn(5, 2, 8)
    torch_mha = torch.nn.MultiheadAttention(8, 2)
    with pytest.raises(AssertionError, match="only bool and floating types of key_padding_mask"):
        torch_mha(x, x, x, key_padding_mask=mask, need_weights=False)
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool or float tensor .*mask\.bool\(\)"):
        fnn.MultiheadAttention.from_torch(torch_mha)(x, x, x, key_padding_mask=mask, need_weights=False)
    layer = fnn.DIFAttention(8, 2, use_position=False)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor .*mask\.bool\(\)"):
        layer(x.transpose(0, 1), key_padding_mask=mask)
    # what torch accepts, fastattn accepts: bool, and float additive (0 / -inf) masks
    for accepted in (mask.bool(), torch.zeros(2, 5).masked_fill(mask.bool(), float("-inf"))):
        expected, _ = torch_mha(x, x, x, key_padding_mask=accepted, need_weights=False)
        got, _ = fnn.MultiheadAttention.from_torch(torch_mha)(x, x, x, key_padding_mask=accepted, need_weights=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dif_attention_layer_single_attribute_tensor_says_sequence() -> None:
    layer = fnn.DIFAttention(8, 2, attribute_dims=(4,), use_position=False)
    hidden, attribute = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match=r"attributes must be a sequence of \(B, L, Da_f\) tensors.*single tensor"):
        layer(hidden, attributes=attribute)
    assert layer(hidden, attributes=[attribute]).shape == (2, 5, 8)


# ---------------------------------------------------------------- empty and fully masked input
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,lq,lk,mask", [
    (0, 4, 4, "none"), (2, 0, 4, "none"), (2, 4, 0, "none"), (2, 0, 0, "none"), (2, 4, 4, "all"), (2, 3, 5, "all"),
], ids=["B=0", "Lq=0", "Lk=0", "Lq=Lk=0", "all-masked", "all-masked-cross"])
def test_empty_and_fully_masked_give_zeros_not_nan(backend: str, b: int, lq: int, lk: int, mask: str) -> None:
    gen = torch.Generator().manual_seed(6)
    q, aq = torch.randn(b, 2, lq, 4, generator=gen), torch.randn(b, 2, lq, 2, generator=gen)
    k, v, ak = (torch.randn(b, 2, lk, d, generator=gen) for d in (4, 3, 2))
    leaves = [t.requires_grad_() for t in (q, k, v, aq, ak)]
    padding = torch.ones(b, lk, dtype=torch.bool) if mask == "all" else None
    domains = (torch.zeros(b, lq, dtype=torch.int64), torch.ones(b, lk, dtype=torch.int64))
    for dropout_p in (0.0, 0.25):
        out, acd = fastattn.dif_attention(q, k, v, (aq,), (ak,), key_padding_mask=padding, causal=lq == lk,
                                          dropout_p=dropout_p, domains=domains, backend=backend)
        assert out.shape == (b, 2, lq, 3) and acd.shape == (b, 2, lq)
        grads = torch.autograd.grad((out, acd), leaves, (torch.ones_like(out), torch.ones_like(acd)))
        for t in (out, acd, *grads):
            assert torch.isfinite(t).all() and (t == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy matmul
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_reach_only_the_documented_rows(backend: str) -> None:
    # The docstring's contract: NaN/Inf in q stays in its query row; in k it never reaches a row
    # that cannot see that key (padding or causal); in v it may reach the whole (batch, head).
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=gen) for _ in range(3))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = True
    q[1, 0, 2, 0], k[0, 1, 1, 0], k[1, 1, 3, 0] = float("nan"), float("inf"), float("nan")
    out = fastattn.dif_attention(q, k, v, key_padding_mask=mask, backend=backend)
    bad = ~torch.isfinite(out).all(-1)
    expected = torch.zeros_like(bad)
    expected[1, 0, 2] = True  # the NaN query
    expected[1, 1, 3:] = True  # causal rows that see the NaN key 3 (the padded Inf key 1 of batch 0 reaches none)
    assert torch.equal(bad, expected)
