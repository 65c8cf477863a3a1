"""Cross-domain attention mass a_cd (domains=) of the fused kernels against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import fastattn

from attention_cases import Case, check_acd, make_inputs


@pytest.mark.parametrize("which", ["out", "acd", "both"])
@pytest.mark.parametrize("n_domains", [1, 2, 5])
@pytest.mark.parametrize("length", [7, 50, 129])
def test_acd_and_gradients(length: int, n_domains: int, which: str) -> None:
    acd = check_acd(Case(lq=length, n_domains=n_domains, attr_dims=(8, 24)), which)
    if n_domains == 1:
        assert (acd == 0).all()  # one domain: no attention mass can cross


@pytest.mark.parametrize("which", ["acd", "both"])
@pytest.mark.parametrize("case", [
    Case(lq=50, padding="left", n_domains=2),
    Case(lq=50, padding="full_row", n_domains=3, causal=False),
    Case(lq=7, lk=50, n_domains=2, causal=False, padding="right"),   # cross attention
    Case(lq=129, lk=66, n_domains=5, causal=True),                   # cross attention, causal
    Case(lq=50, dk=50, dv=8, attr_dims=(50, 50), n_domains=2),       # 256-wide tiles
    Case(b=3, h=1, lq=1, n_domains=2),
], ids=["left-pad", "full-row", "cross", "cross-causal", "wide", "L1"])
def test_acd_with_every_option(case: Case, which: str) -> None:
    check_acd(case, which)


@pytest.mark.parametrize("which", ["acd", "both"])
def test_acd_with_dropout_uses_probabilities_before_dropout(which: str) -> None:
    check_acd(Case(lq=50, n_domains=2, dropout_p=0.3, padding="left"), which)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_acd_low_precision(dtype: torch.dtype) -> None:
    check_acd(Case(lq=50, n_domains=2, padding="left"), "both", dtype)


def test_acd_torch_backend() -> None:
    check_acd(Case(lq=50, n_domains=3, padding="left"), "both", backend="torch")


def test_single_domain_sequence_and_empty_rows_give_zero() -> None:
    case = Case(lq=9, padding="full_row")
    inputs = make_inputs(case)
    same = torch.full((case.b, case.lq), 4, dtype=torch.int64)
    _, acd = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=same,
                                    key_padding_mask=inputs["key_padding_mask"], backend="triton")
    assert (acd == 0).all()
    alternating = torch.arange(case.lq).remainder(2).expand(case.b, -1)
    _, acd = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=alternating,
                                    key_padding_mask=inputs["key_padding_mask"], backend="triton")
    assert (acd[0] == 0).all()  # batch row 0: every key is padding
    assert (acd[1] > 0).any() and ((acd >= 0) & (acd <= 1)).all()


def test_int32_domains_are_accepted() -> None:
    case = Case(lq=7, n_domains=2)
    inputs = make_inputs(case)
    d32 = inputs["domains"].to(torch.int32)
    _, a = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=d32, backend="triton")
    _, b = fastattn.dif_attention(inputs["q"], inputs["k"], inputs["v"], domains=inputs["domains"],
                                  backend="triton")
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
