"""The C++ attention kernels through the autograd Function and as operators: float64 gradcheck,
torch.library.opcheck of fastattn::attn_fwd / attn_bwd / attn_dropout_rows, bad operator input
named by the op, and the error when the extension is unavailable. End-to-end checks of every
backend: test_attention.py."""
from __future__ import annotations

import pytest
import torch

from fastattn.ops.attention.function import DIFAttentionFunction
from fastattn.ops.attention.options import AttentionOptions

from attention_cases import Case, make_inputs, with_grad
from cpp_required import cpp_tests_mark

pytestmark = cpp_tests_mark()  # a failed build fails loudly; FASTATTN_DISABLE_CPP=1 skips
from fastattn.ops.attention.cpp import CppAttentionKernels  # noqa: E402


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
    import fastattn.ops.cpp_extension as cpp_extension

    # The availability check lives in cpp_extension.cpp_ops, which every C++ entry point calls.
    monkeypatch.setattr(cpp_extension, "cpp_unavailable_reason", lambda: "no compiler (test)")
    with pytest.raises(RuntimeError, match="no compiler"):
        cpp_module.cpp_dropout_keep_mask(0, 0.1, 1, 1, 2, 2)
