"""Cross-domain attention mass a_cd (domains=) of the fused kernels (Triton in the interpreter,
C++) and of the torch backend against the float64 reference, plus domain-argument checks.

The C++ cases reach Lk = 300, across the C++ 256-key block; the Triton cases stop at 129 (the
interpreter takes seconds per 300-long case) and Lk = 66 for cross attention.
"""
from __future__ import annotations

import pytest
import torch

import fastattn
from attention_cases import Case, check_acd, make_inputs
from backend_params import KERNEL_BACKENDS, per_backend

BACKENDS = KERNEL_BACKENDS


@pytest.mark.parametrize("which", ["out", "acd", "both"])
@pytest.mark.parametrize("n_domains", [1, 2, 5])
@pytest.mark.parametrize("backend,length", per_backend({"triton": [7, 50, 129], "cpp": [7, 50, 129, 300]}))
def test_acd_and_gradients(backend: str, length: int, n_domains: int, which: str) -> None:
    acd = check_acd(Case(lq=length, n_domains=n_domains, attr_dims=(8, 24)), which, backend=backend)
    if n_domains == 1:
        assert (acd == 0).all()  # one domain: no attention mass can cross


OPTION_CASES = {
    "triton": {
        "left-pad": Case(lq=50, padding="left", n_domains=2),
        "full-row": Case(lq=50, padding="full_row", n_domains=3, causal=False),
        "cross": Case(lq=7, lk=50, n_domains=2, causal=False, padding="right"),
        "cross-causal": Case(lq=129, lk=66, n_domains=5, causal=True),
        "wide": Case(lq=50, dk=50, dv=8, attr_dims=(50, 50), n_domains=2),  # 256-wide tiles
        "L1": Case(b=3, h=1, lq=1, n_domains=2),
    },
    "cpp": {
        "left-pad": Case(lq=50, padding="left", n_domains=2),
        "full-row": Case(lq=50, padding="full_row", n_domains=3, causal=False),
        "cross": Case(lq=7, lk=50, n_domains=2, causal=False, padding="right"),
        "cross-causal": Case(lq=129, lk=300, n_domains=5, causal=True),
        "wide": Case(lq=50, dk=50, dv=8, attr_dims=(50, 50), n_domains=2),
        "L1": Case(b=3, h=1, lq=1, n_domains=2),
    },
}


@pytest.mark.parametrize("which", ["acd", "both"])
@pytest.mark.parametrize("name", ["left-pad", "full-row", "cross", "cross-causal", "wide", "L1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_acd_with_every_option(backend: str, name: str, which: str) -> None:
    check_acd(OPTION_CASES[backend][name], which, backend=backend)


@pytest.mark.parametrize("which", ["acd", "both"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_acd_with_dropout_uses_probabilities_before_dropout(backend: str, which: str) -> None:
    length = 50 if backend == "triton" else 300  # interpreter time, as above
    check_acd(Case(lq=length, n_domains=2, dropout_p=0.3, padding="left"), which, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_acd_low_precision(backend: str, dtype: torch.dtype) -> None:
    check_acd(Case(lq=50, n_domains=2, padding="left"), "both", dtype, backend=backend)


def test_acd_torch_backend() -> None:
    check_acd(Case(lq=50, n_domains=3, padding="left"), "both", backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_domain_sequence_and_empty_rows_give_zero(backend: str) -> None:
    case = Case(lq=9, padding="full_row")
    inputs = make_inputs(case)
    same = torch.full((case.b, case.lq), 4, dtype=torch.int64)
    _, acd = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=same,
                                    key_padding_mask=inputs["key_padding_mask"], backend=backend)
    assert (acd == 0).all()
    alternating = torch.arange(case.lq).remainder(2).expand(case.b, -1)
    _, acd = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=alternating,
                                    key_padding_mask=inputs["key_padding_mask"], backend=backend)
    assert (acd[0] == 0).all()  # batch row 0: every key is padding
    assert (acd[1] > 0).any() and ((acd >= 0) & (acd <= 1)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_domains_are_accepted(backend: str) -> None:
    case = Case(lq=7, n_domains=2)
    inputs = make_inputs(case)
    d32 = inputs["domains"].to(torch.int32)
    _, a = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=d32, backend=backend)
    _, b = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=inputs["domains"],
                                  backend=backend)
    assert torch.equal(a, b)


BAD_DOMAINS = [
    (torch.zeros(2, 6, dtype=torch.int64), ValueError, r"domains must have shape \(B=2, L=7\)"),
    (torch.zeros(2, 7), TypeError, "domains must be an integer tensor"),
    (torch.zeros(2, 7, dtype=torch.bool), TypeError, "domains must be an integer tensor"),
    (torch.zeros(2, 7, dtype=torch.int64, device="meta"), ValueError, "domains is on meta"),
    ([1, 2, 3], TypeError, "domains must be a"),
    ((torch.zeros(2, 7, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64)), ValueError,
     r"domains\[1\] must have shape \(B=2, L=7\)"),
    ((torch.zeros(2, 7, dtype=torch.int64), "x"), TypeError, r"domains\[1\] must be a torch.Tensor"),
]


@pytest.mark.parametrize("domains,exc,match", BAD_DOMAINS, ids=[m for _, _, m in BAD_DOMAINS])
def test_bad_domains_raise(domains: object, exc: type, match: str) -> None:
    inputs = make_inputs(Case(lq=7))
    with pytest.raises(exc, match=match):
        fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=domains, backend="triton")


def test_cross_attention_needs_a_pair() -> None:
    inputs = make_inputs(Case(lq=7, lk=9))
    with pytest.raises(ValueError, match="must be a pair"):
        fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=torch.zeros(2, 7, dtype=torch.int64))
