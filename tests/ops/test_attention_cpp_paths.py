"""The C++ attention's two paths and its stream-list operators against the float64 reference.

csrc/attention.cpp runs a whole (batch, head) at a time while Lq·Lk <= 1024² (kShortMaxScores:
one GEMM per score stream, exact softmax, one backward pass) and the blocked flash-style path
above that (the streams concatenated, 64×256 blocks, online softmax). test_attention.py's cases
are all below the threshold now, so here every flag combination runs on both sides of it
(Lq·Lk = 1030² crosses 64×256 block edges too), plus what the whole-(batch, head) path adds: strided
operands read in place (the (B, L, 3, H, D) views of a fused projection, expanded and transposed
tensors), per-stream gradients, the in-kernel D_i, and results independent of the thread count.
"""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.ops.attention.cpp import cpp_stream_attention
from fastattn.ops.attention.options import AttentionOptions
from fastattn.ops.attention.reference import dif_attention_reference

from attention_cases import Case, check_acd, check_against_truth, check_dropout_own_mask, max_err
from cpp_required import cpp_tests_mark

pytestmark = cpp_tests_mark()  # a failed build fails loudly; FASTATTN_DISABLE_CPP=1 skips

WHOLE = 50    # Lq·Lk well under the threshold
BLOCKED = 1030  # 1030² > 1024²: the blocked path, with partial 64-query and 256-key blocks
SMALL_DIMS = dict(dk=8, attr_dims=(4, 3), b=1, h=2)  # keeps the float64 reference at L = 1030 quick


@pytest.mark.parametrize("length", [WHOLE, BLOCKED], ids=["whole", "blocked"])
@pytest.mark.parametrize("causal,padding", [(True, None), (True, "left"), (False, "right"), (True, "full_row")])
def test_both_paths_match_the_truth(length: int, causal: bool, padding: str | None) -> None:
    dims = SMALL_DIMS if length == BLOCKED else dict(dk=24, dv=16, attr_dims=(8, 5), b=3, h=2)
    check_against_truth(Case(lq=length, causal=causal, padding=padding, **dims), backend="cpp")


@pytest.mark.parametrize("lq,lk", [(WHOLE, 70), (70, WHOLE), (BLOCKED, 1100), (1, 1100 * 1000)],
                         ids=["whole-wide", "whole-tall", "blocked", "blocked-one-query"])
def test_cross_attention_both_paths(lq: int, lk: int) -> None:
    dims = dict(SMALL_DIMS, b=1, h=1) if lq * lk > 1024 ** 2 else SMALL_DIMS
    check_against_truth(Case(lq=lq, lk=lk, causal=False, padding="left", **dims), backend="cpp")


@pytest.mark.parametrize("length", [WHOLE, BLOCKED], ids=["whole", "blocked"])
@pytest.mark.parametrize("which", ["out", "acd", "both"])
def test_acd_both_paths(length: int, which: str) -> None:
    dims = SMALL_DIMS if length == BLOCKED else dict(dk=16, attr_dims=(8,), b=2, h=3)
    check_acd(Case(lq=length, padding="left", n_domains=2, dropout_p=0.2, **dims), which, backend="cpp")


@pytest.mark.parametrize("length", [WHOLE, 129, BLOCKED], ids=["whole", "whole-odd", "blocked"])
def test_dropout_both_paths_match_the_reference_with_the_kernel_mask(length: int) -> None:
    # check_dropout_own_mask draws the mask with attn_dropout_rows (the blocked path's RNG loop)
    # and compares with the kernels' own draws in both passes.
    dims = dict(SMALL_DIMS, attr_dims=(4,)) if length == BLOCKED else dict(dk=16, attr_dims=(8, 3), b=2, h=2)
    check_dropout_own_mask(Case(lq=length, padding="left", dropout_p=0.3, **dims), "cpp")


# ---------------------------------------------------------------- strided operands, read in place
def _projection_views(b: int, length: int, h: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """q, k, v as (B, H, L, D) views of one (B, L, 3·H·D) projection, as DIFAttention splits its
    heads: rows 3·H·D apart, no copy."""
    x = torch.randn(b, length, 3 * h * d, generator=gen)
    return tuple(x.view(b, length, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0))


def _run(streams: tuple[torch.Tensor, ...], n_attr: int, **kwargs: object) -> list[torch.Tensor]:
    leaves = [t.detach().clone() if t.is_contiguous() else t.detach() for t in streams]
    leaves = [t.requires_grad_() for t in leaves]
    q, k, v, *attrs = leaves
    out = fastattn.dif_attention(q, k, v, attrs[:n_attr], attrs[n_attr:], **kwargs)
    gen = torch.Generator().manual_seed(9)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_strided_streams_equal_contiguous_copies(dropout_p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    b, length, h = 3, 37, 2
    q, k, v = _projection_views(b, length, h, 16, gen)
    qa, ka = _projection_views(b, length, h, 4, gen)[:2]
    kb = torch.randn(1, h, length, 16, generator=gen).expand(b, -1, -1, -1)  # batch stride 0
    vt = torch.randn(b, h, 16, length, generator=gen).transpose(-1, -2)  # last dim strided: copied
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, :5] = True
    for streams in ((q, k, v, qa, ka), (q, kb, vt, qa, ka)):
        assert not all(t.is_contiguous() for t in streams)
        kwargs = dict(key_padding_mask=pad, dropout_p=dropout_p, scale=0.3, backend="cpp")
        torch.manual_seed(3)
        strided = _run(streams, 1, **kwargs)
        torch.manual_seed(3)
        dense = _run(tuple(t.contiguous() for t in streams), 1, **kwargs)
        for s, d in zip(strided, dense):
            assert s.shape == d.shape and s.is_contiguous()
            assert max_err(s, d) <= 1e-6 * max(1.0, d.abs().max().item())


def test_strided_streams_match_the_truth_in_low_precision() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (t.to(torch.bfloat16) for t in _projection_views(2, 20, 2, 8, gen))
    got = _run((q, k, v), 0, backend="cpp")
    truth = [t.double().detach().requires_grad_() for t in (q, k, v)]
    opts = AttentionOptions(scale=8 ** -0.5, causal=True)
    out, _ = dif_attention_reference(*truth, (), (), opts)
    gen = torch.Generator().manual_seed(9)
    dout = torch.randn(out.shape, generator=gen).to(torch.bfloat16).double()
    expected = [out.detach(), *torch.autograd.grad(out, truth, dout)]
    for g, t in zip(got, expected):
        assert g.dtype == torch.bfloat16
        assert max_err(g, t) <= 2e-2 * max(1.0, t.abs().max().item())


# ---------------------------------------------------------------- the operators themselves
def _op_inputs(dtype: torch.dtype = torch.float32) -> tuple:
    gen = torch.Generator().manual_seed(5)
    b, h, lq, lk = 2, 2, 6, 9
    qs = [torch.randn(b, h, lq, d, generator=gen, dtype=dtype) for d in (7, 3)]
    ks = [torch.randn(b, h, lk, d, generator=gen, dtype=dtype) for d in (7, 3)]
    v = torch.randn(b, h, lk, 5, generator=gen, dtype=dtype)
    pad = torch.zeros(b, lk, dtype=torch.bool)
    pad[0, :4] = True
    dom_q, dom_k = torch.randint(0, 2, (b, lq), generator=gen), torch.randint(0, 2, (b, lk), generator=gen)
    return qs, ks, v, pad, dom_q, dom_k


@pytest.mark.parametrize("causal,dropout_p", [(True, 0.0), (False, 0.3)])
def test_stream_operators_equal_the_concatenated_ones(causal: bool, dropout_p: float) -> None:
    # attn_*_streams (per-stream GEMMs, D_i inside) vs attn_fwd / attn_bwd on [q | qa], [k | ka]
    # (one GEMM, D_i given): the same math up to float32 rounding, the same dropout draws.
    qs, ks, v, pad, dom_q, dom_k = _op_inputs()
    ops = torch.ops.fastattn
    args = (pad, dom_q, dom_k, 0.4, causal, dropout_p, 17)
    out, lse, acd = ops.attn_fwd_streams(qs, ks, v, *args)
    out_c, lse_c, acd_c = ops.attn_fwd(torch.cat(qs, -1), torch.cat(ks, -1), v, *args)
    for a, c in ((out, out_c), (lse, lse_c), (acd, acd_c)):  # lse: +inf on rows without a visible key
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    gen = torch.Generator().manual_seed(6)
    dout, grad_acd = torch.randn(out.shape, generator=gen), torch.randn(acd.shape, generator=gen)
    dqs, dks, dv = ops.attn_bwd_streams(qs, ks, v, out, dout, lse, acd, grad_acd, *args)
    delta = (dout * out).sum(-1) + grad_acd * acd
    dq_c, dk_c, dv_c = ops.attn_bwd(torch.cat(qs, -1), torch.cat(ks, -1), v, dout, lse, delta, grad_acd, *args)
    assert [t.shape for t in dqs] == [t.shape for t in qs] and [t.shape for t in dks] == [t.shape for t in ks]
    for a, c in ((torch.cat(dqs, -1), dq_c), (torch.cat(dks, -1), dk_c), (dv, dv_c)):
        assert max_err(a, c) <= 1e-5 * max(1.0, c.abs().max().item())


def test_stream_operators_float64_gradcheck() -> None:
    qs, ks, v, pad, dom_q, dom_k = _op_inputs(torch.float64)
    proj = torch.randn(2, 9, 3, 2, 4, dtype=torch.float64)  # strided streams in the gradcheck too
    qs.append(proj[:, :6, 0].transpose(1, 2))
    ks.append(proj[:, :, 1].transpose(1, 2))
    leaves = [t.detach().requires_grad_() for t in (*qs, *ks, v)]

    opts = AttentionOptions(scale=0.45, causal=True, dropout_p=0.2)

    def fn(*ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # backend="cpp" below dif_attention's float32 cast of acd: acd stays float64 here.
        n = len(qs)
        torch.manual_seed(2)  # the same dropout mask on every evaluation
        return cpp_stream_attention(ts[0], ts[n], ts[-1], ts[1:n], ts[n + 1:-1], opts, pad, (dom_q, dom_k))
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("length", [WHOLE, BLOCKED], ids=["whole", "blocked"])
def test_result_does_not_depend_on_the_thread_count(length: int) -> None:
    # Each work item owns the rows it writes (a whole (batch, head), or a block): no reduction
    # order depends on how items are spread over threads.
    gen = torch.Generator().manual_seed(8)
    b, h = (4, 3) if length == WHOLE else (1, 2)
    streams = [torch.randn(b, h, length, d, generator=gen) for d in (8, 8, 8, 4, 4)]
    kwargs = dict(dropout_p=0.1, backend="cpp")
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(4)
            runs.append(_run(tuple(streams), 1, **kwargs))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, c) for a, c in zip(*runs))
