"""Every operator in the `fastattn` namespace passes `torch.library.opcheck` (schema, fake kernel,
autograd registration, AOT dispatch), and none is registered without a case here.

The op-specific suites (tests/ops/) opcheck the C++ kernels over more dtypes; this file is the
inventory: a new operator fails `test_every_operator_has_an_opcheck_case` until it gets one.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch

import fastattn  # noqa: F401  (registers every operator)
from cpp_required import cpp_tests_mark

pytestmark = cpp_tests_mark()
Args = tuple[Any, ...]


def _streams(d: int = 8, attr: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, 5, d + (attr if i < 2 else 0), generator=g) for i in range(3)]


def _grad(args: Args) -> Args:
    return tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


DOM = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])
PAD = torch.tensor([[True, False, False, False, False], [False] * 5])


# The C++ operators take the backend name as their last argument; the Triton ones (fastattn::*_triton,
# run here in the interpreter, on CPU tensors) have none.
def _attention_forward(*backend: str) -> list[Args]:
    q, k, v = _streams()
    qc, kc, vc = _streams(attr=4)
    return [_grad((q, k, v, None, None, None, None, 0.35, True, 0.0, *backend)),
            _grad((qc, kc, vc, PAD, DOM, DOM, None, 0.2, False, 0.0, *backend)),
            _grad((q, k, v, None, None, None, torch.tensor(7), 0.35, True, 0.25, *backend))]


def _attention_backward(forward: Callable[..., Any], *backend: str) -> list[Args]:
    cases = []
    for q, k, v, pad, dom_q, dom_k, seed, scale, causal, p, *_ in _attention_forward(*backend):
        q, k, v = q.detach(), k.detach(), v.detach()
        out, lse, acd = forward(q, k, v, pad, dom_q, dom_k, seed, scale, causal, p, *backend)
        dout = torch.randn_like(out)
        grad_acd = torch.randn_like(lse) if dom_q is not None else None
        acd = acd if dom_q is not None else None
        cases.append((q, k, v, dout, out, lse, acd, grad_acd, pad, dom_q, dom_k, seed, scale, causal, p, *backend))
    return cases


def _catalog(n: int = 6, v: int = 11, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g), torch.randn(v, d, generator=g), torch.randn(v, generator=g)


def _cross_entropy(*backend: str) -> list[Args]:
    hidden, weight, bias = _catalog()
    n = hidden.shape[0]
    hard = (torch.tensor([1, -1, 3, 10, 0, 4]), torch.full((n,), 0.9), torch.full((n,), 0.01), torch.ones(n),
            torch.zeros(n + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    soft = (torch.full((n,), -1), torch.zeros(n), torch.full((n,), 0.02), torch.ones(n),
            torch.tensor([0, 1, 2, 2, 3, 4, 6]), torch.tensor([3, 4, 5, 0, 1, 2]), torch.full((6,), 0.4))
    return [_grad((hidden, weight, bias, *hard, 0.5, True, *backend)),
            _grad((hidden, weight, None, *soft, 1.0, True, *backend))]


def _ce_kernels() -> list[Args]:
    hidden, weight, bias = _catalog()
    return [(hidden, weight, bias, 0.5), (hidden.double(), weight.double(), None, 1.0)]


def _ce_backward(dtype: Optional[torch.dtype] = None) -> list[Args]:
    """Cases of the kernels' backward (fastattn::ce_bwd); dtype: cast every case to it (the Triton
    kernels take no float64)."""
    cases = []
    for hidden, weight, bias, scale in _ce_kernels():
        if dtype is not None:
            hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
        lse = torch.ops.fastattn.ce_lse(hidden, weight, bias, scale)
        coef = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(2)).to(lse.dtype)
        cases.append((hidden, weight, bias, scale, lse, coef, coef / 11, torch.tensor([1, -1, 3, 10, 0, 4]), coef))
    return cases


def _sparse_scatter() -> list[Args]:
    """fastattn::ce_sparse_scatter: CSR entries of 4 rows (one empty, a duplicate item) over 7 items."""
    indptr, indices = torch.tensor([0, 2, 2, 5, 6]), torch.tensor([1, 6, 3, 3, 0, 5])
    gen = torch.Generator().manual_seed(4)
    values, x = torch.rand(6, generator=gen), torch.randn(4, 5, generator=gen)
    return [(indptr, indices, values, x, 7), (indptr, indices, values.double(), x.double(), 7)]


def _topk() -> list[Args]:
    hidden, weight, bias = _catalog()
    exclude = torch.tensor([[0, -1], [3, 3], [-1, -1], [10, 2], [5, 6], [1, -1]])
    return [(hidden, weight, 3, bias, exclude), (hidden, weight, 11, None, None)]


def _detached(args: Args) -> Args:
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


# The C++ kernels themselves are not differentiable (fastattn::dif_attention carries the autograd):
# their cases hold no tensor that requires grad.
def _cpp_attention_kernels() -> list[Args]:
    return [_detached(a[:6] + a[7:10] + (int(a[6]) if a[6] is not None else 0,)) for a in _attention_forward("cpp")]


def _cpp_attention_backward_kernels() -> list[Args]:
    cases = []
    for q, k, v, dout, out, lse, acd, grad_acd, pad, dom_q, dom_k, seed, scale, causal, p, _ in _attention_backward(
            torch.ops.fastattn.dif_attention, "cpp"):
        delta = (dout * out).sum(-1) + (grad_acd * acd if grad_acd is not None else 0)
        cases.append((q, k, v, dout, lse, delta, grad_acd, pad, dom_q, dom_k, scale, causal, p,
                      int(seed) if seed is not None else 0))
    return cases


def _cpp_stream_kernels() -> list[Args]:
    """attn_fwd_streams cases: one stream; two streams of different head dims with padding and
    domains; the streams as strided views of one (B, L, 3, H, D) projection, with dropout."""
    g = torch.Generator().manual_seed(4)
    q, k, v = _streams()
    qa, ka = torch.randn(2, 2, 5, 3, generator=g), torch.randn(2, 2, 5, 3, generator=g)
    qs, ks, vs = torch.randn(2, 5, 3, 2, 8, generator=g).permute(2, 0, 3, 1, 4).unbind(0)
    return [([q], [k], v, None, None, None, 0.35, True, 0.0, 0),
            ([q, qa], [k, ka], v, PAD, DOM, DOM, 0.2, False, 0.0, 0),
            ([qs], [ks], vs, PAD, None, None, 0.35, True, 0.25, 7)]


def _cpp_stream_backward_kernels() -> list[Args]:
    cases = []
    for qs, ks, v, pad, dom_q, dom_k, scale, causal, p, seed in _cpp_stream_kernels():
        out, lse, acd = torch.ops.fastattn.attn_fwd_streams(qs, ks, v, pad, dom_q, dom_k, scale, causal, p, seed)
        dout = torch.randn_like(out)
        grad_acd, acd = (torch.randn_like(lse), acd) if dom_q is not None else (None, None)
        cases.append((qs, ks, v, out, dout, lse, acd, grad_acd, pad, dom_q, dom_k, scale, causal, p, seed))
    return cases


def _stream_attention() -> list[Args]:
    """fastattn::dif_attention_streams cases (grads through the list streams too)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = _streams()
    qa, ka = (torch.randn(2, 2, 5, 3, generator=g).requires_grad_(True) for _ in range(2))
    q, k, v = _grad((q, k, v))
    return [(q, k, v, [], [], None, None, None, None, 0.35, True, 0.0),
            (q, k, v, [qa], [ka], PAD, DOM, DOM, None, 0.2, False, 0.0),
            (q, k, v, [qa], [ka], PAD, None, None, torch.tensor(7), 0.35, True, 0.25)]


def _stream_attention_backward() -> list[Args]:
    cases = []
    for q, k, v, aq, ak, pad, dom_q, dom_k, seed, scale, causal, p in _stream_attention():
        q, k, v, aq, ak = q.detach(), k.detach(), v.detach(), [t.detach() for t in aq], [t.detach() for t in ak]
        out, lse, acd = torch.ops.fastattn.dif_attention_streams(q, k, v, aq, ak, pad, dom_q, dom_k, seed, scale,
                                                                 causal, p)
        grad_acd, acd = (torch.randn_like(lse), acd) if dom_q is not None else (None, None)
        cases.append((q, k, v, aq, ak, out, torch.randn_like(out), lse, acd, grad_acd, pad, dom_q, dom_k, seed,
                      scale, causal, p))
    return cases


# operator name → its argument tuples (built lazily: some need the extension or other ops).
CASES: dict[str, Callable[[], list[Args]]] = {
    "fastattn::dif_attention": lambda: _attention_forward("cpp"),
    "fastattn::dif_attention_backward": lambda: _attention_backward(torch.ops.fastattn.dif_attention, "cpp"),
    "fastattn::dif_attention_triton": _attention_forward,
    "fastattn::dif_attention_triton_backward": lambda: _attention_backward(torch.ops.fastattn.dif_attention_triton),
    "fastattn::full_item_cross_entropy": lambda: _cross_entropy("cpp") + _cross_entropy("torch"),
    "fastattn::full_item_cross_entropy_triton": lambda: [(*a, f) for a, f in zip(_cross_entropy(), (0.0, 0.05))],
    "fastattn::full_item_cross_entropy_triton_backward": lambda: [
        (*a, f) for a, f in zip(_ce_backward(torch.float32), (0.0, 0.05))],
    "fastattn::attn_fwd": _cpp_attention_kernels,
    "fastattn::attn_bwd": _cpp_attention_backward_kernels,
    "fastattn::dif_attention_streams": _stream_attention,
    "fastattn::dif_attention_streams_backward": _stream_attention_backward,
    "fastattn::attn_fwd_streams": _cpp_stream_kernels,
    "fastattn::attn_bwd_streams": _cpp_stream_backward_kernels,
    "fastattn::attn_dropout_rows": lambda: [(3, 0.25, 7, 2**33, 5)],
    "fastattn::ce_lse": _ce_kernels,
    "fastattn::ce_bwd": _ce_backward,
    "fastattn::ce_sparse_scatter": _sparse_scatter,
    "fastattn::ce_sparse_gather": lambda: [(p, i, v, torch.randn(7, 3, dtype=x.dtype)) for p, i, v, x, _ in
                                           _sparse_scatter()],
    "fastattn::topk_items": _topk,
    "fastattn::topk_items_chunked": _topk,
}


def registered_operators() -> set[str]:
    return {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastattn::")}


def test_every_operator_has_an_opcheck_case() -> None:
    missing = registered_operators() - set(CASES)
    assert not missing, f"operators without an opcheck case in {__file__}: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_operator_passes_opcheck(name: str) -> None:
    namespace, op = name.split("::")
    overload = getattr(getattr(torch.ops, namespace), op).default
    cases = CASES[name]()
    assert cases
    for args in cases:
        torch.library.opcheck(overload, args)
